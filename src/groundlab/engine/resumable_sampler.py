"""The training sampler that makes resume exact: the order of epoch e is a permutation drawn from
(seed, e) alone, sharded over the ranks here (so Lightning's DistributedSampler wrapper is not needed), and
a resumed epoch skips the batches its checkpoint had already trained on, without loading them."""

from __future__ import annotations

from typing import Iterator, Optional

import torch
from torch.utils.data import Sampler


class ResumableSampler(Sampler[int]):
    """Indices of one rank for one epoch. `set_epoch(e)` (Lightning calls it before each epoch's loader starts,
    also when a run resumes mid-epoch) picks the permutation and hands the epoch to the dataset (its augmentation
    and sampled prompts are seeded per epoch); `skip_batches(e, k)` makes epoch e start after its first k batches
    of `batch_size`. dataset: anything with `__len__` (and `set_epoch`, if its samples depend on the epoch).
    pad (default: shuffle, i.e. training): every rank gets the same count by repeating the first samples (DDP
    steps must match); without it (validation) each sample goes to exactly one rank, so a metric summed over
    ranks (MAL's mIoU meter) never counts a sample twice."""

    def __init__(self, dataset, batch_size: int, seed: int, shuffle: bool = True, rank: int = 0,
                 world_size: int = 1, pad: Optional[bool] = None):
        self.dataset = dataset
        self.num_samples, self.batch_size, self.seed, self.shuffle = len(dataset), batch_size, seed, shuffle
        self.pad = shuffle if pad is None else bool(pad)
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self._skip_epoch, self._skip = -1, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(self.epoch)

    def skip_batches(self, epoch: int, batches: int) -> None:
        self._skip_epoch, self._skip = int(epoch), int(batches)

    def _rank_indices(self) -> list:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.num_samples, generator=g).tolist()
        else:
            order = list(range(self.num_samples))
        if self.pad:
            per_rank = -(-self.num_samples // self.world_size)
            total = per_rank * self.world_size
            order = (order * -(-total // max(1, len(order))))[:total]  # repeat so every rank takes the same steps
        return order[self.rank :: self.world_size]

    def __len__(self) -> int:
        if self.pad:
            return -(-self.num_samples // self.world_size)
        return len(range(self.rank, self.num_samples, self.world_size))

    def __iter__(self) -> Iterator[int]:
        indices = self._rank_indices()
        if self.epoch == self._skip_epoch:
            indices = indices[self._skip * self.batch_size :]
        return iter(indices)
