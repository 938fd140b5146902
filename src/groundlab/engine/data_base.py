"""The data-module side of exact resume, shared by every model: training loaders draw their order from a
ResumableSampler (per-epoch permutation from the seed, sharded over ranks), and the data module's state in a
checkpoint says how many batches of which epoch were trained, so a resumed epoch skips exactly those."""

from __future__ import annotations

import functools
import random
from typing import Any, Callable, Dict, Optional

import lightning as L
import numpy as np
import torch

from groundlab.config import ConfigError
from groundlab.engine.resumable_sampler import ResumableSampler
from groundlab.engine.resume_state import batches_done_in_epoch


def seed_worker(seed: int, rank: int, worker_id: int) -> None:
    """A data-loader worker's python, numpy and torch random states from (seed, epoch, rank, worker)."""
    info = torch.utils.data.get_worker_info()
    epoch = int(getattr(info.dataset, "epoch", 0)) if info is not None else 0
    state = np.random.SeedSequence([seed, epoch, rank, worker_id]).generate_state(2)
    random.seed(int(state[0]))
    np.random.seed(int(state[1]))
    torch.manual_seed(int(state[0]) << 32 | int(state[1]))


class ResumableDataModule(L.LightningDataModule):
    """Subclasses build their datasets and call `loader(...)` from train_dataloader / val_dataloader."""

    def __init__(self, seed: int):
        super().__init__()
        self.seed = int(seed)
        self._resume: Optional[Dict[str, int]] = None

    def _rank(self):
        t = self.trainer
        return (t.global_rank, t.world_size) if t is not None else (0, 1)

    def loader(self, dataset, batch_size: int, train: bool, num_workers: int, collate: Callable,
               pin_memory: bool = False) -> torch.utils.data.DataLoader:
        rank, world = self._rank()
        if not train and len(dataset) < world:
            # unpadded validation (each sample on one rank): a rank without a sample would miss the epoch-end
            # collectives of the others and every process would wait forever
            raise ConfigError(f"the validation set has {len(dataset)} images for {world} training processes: give "
                              f"it at least {world}, or train with fewer processes (train.num_gpus / num_nodes).")
        sampler = ResumableSampler(dataset, batch_size, self.seed, shuffle=train, rank=rank, world_size=world)
        if train:
            sampler.set_epoch(self.trainer.current_epoch if self.trainer is not None else 0)
            if self._resume is not None:
                sampler.set_epoch(self._resume["epoch"])  # Lightning sets it again before the epoch starts
                sampler.skip_batches(self._resume["epoch"], self._resume["batches_done"])
        return torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, collate_fn=collate,
            pin_memory=pin_memory and torch.cuda.is_available(), drop_last=False,
            persistent_workers=False,  # re-created each epoch so they see set_epoch()
            # the loader draws from its own generator, so the global random state stays the training step's, and
            # each worker's random state is a function of (seed, epoch, rank, worker), whatever ran before
            generator=torch.Generator().manual_seed(self.seed),
            worker_init_fn=functools.partial(seed_worker, self.seed, rank))

    def state_dict(self) -> Dict[str, Any]:
        if self.trainer is None:
            return {}
        return {"epoch": int(self.trainer.current_epoch), "batches_done": batches_done_in_epoch(self.trainer)}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self._resume = dict(state_dict) if state_dict else None
