"""The parts of exact resume: the sampler's order depends on (seed, epoch) alone and skips trained batches, ranks
share an epoch without overlap, workers' random states depend on (seed, epoch, rank, worker) alone, and the saved
random states survive a weights_only checkpoint load."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from groundlab.engine.data_base import seed_worker
from groundlab.engine.resumable_sampler import ResumableSampler
from groundlab.engine.resume_state import random_states, set_random_states


class _Data(torch.utils.data.Dataset):
    """Items draw from the worker's global random states, as a careless dataset would."""

    def __init__(self, n=12):
        self.n, self.epoch = n, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.tensor([i, float(torch.rand(())), float(np.random.rand()), random.random()])


def test_order_depends_on_seed_and_epoch_and_skips_trained_batches():
    data = _Data(10)
    s = ResumableSampler(data, batch_size=3, seed=7)
    s.set_epoch(2)
    torch.rand(5)  # the global random state plays no part
    order = list(s)
    assert sorted(order) == list(range(10)) and data.epoch == 2  # the epoch reaches the dataset too
    s.set_epoch(3)
    assert list(s) != order
    again = ResumableSampler(data, batch_size=3, seed=7)
    again.skip_batches(2, 2)
    again.set_epoch(2)
    assert list(again) == order[6:]  # two batches of 3 already trained
    again.set_epoch(3)
    assert len(list(again)) == 10  # the skip belongs to its epoch only


def test_ranks_split_an_epoch_without_overlap():
    data = _Data(10)
    parts = []
    for rank in range(3):
        s = ResumableSampler(data, batch_size=2, seed=1, rank=rank, world_size=3)
        s.set_epoch(0)
        parts.append(list(s))
    assert all(len(p) == 4 for p in parts)  # padded to equal steps
    assert set(sum(parts, [])) == set(range(10)) and len(sum(parts, [])) == 12


def test_validation_ranks_take_every_sample_once():
    """Unpadded (validation): a metric summed over ranks (MAL's mIoU meter) must not count a sample twice."""
    data = _Data(10)
    parts = [ResumableSampler(data, batch_size=2, seed=1, shuffle=False, rank=r, world_size=3) for r in range(3)]
    assert [len(s) for s in parts] == [len(list(s)) for s in parts] == [4, 3, 3]
    assert sorted(sum((list(s) for s in parts), [])) == list(range(10))


def test_worker_random_states_depend_only_on_seed_epoch_rank_worker():
    def draw(noise):
        torch.manual_seed(noise)  # whatever ran before in the main process
        data = _Data()
        sampler = ResumableSampler(data, batch_size=4, seed=3, shuffle=False)
        sampler.set_epoch(1)
        loader = torch.utils.data.DataLoader(data, batch_size=4, sampler=sampler, num_workers=2,
                                             generator=torch.Generator().manual_seed(3),
                                             worker_init_fn=lambda w: seed_worker(3, 0, w))
        return torch.cat(list(loader))

    a, b = draw(0), draw(123)
    assert torch.equal(a, b)
    assert len(set(a[:, 1].tolist())) == len(a)  # workers do not repeat each other's draws


def test_random_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    torch.manual_seed(5), np.random.seed(5), random.seed(5)
    states = random_states()
    expected = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    torch.save({"random": states}, tmp_path / "s.pth")
    torch.rand(10), np.random.rand(10), random.random()
    set_random_states(torch.load(tmp_path / "s.pth", weights_only=True)["random"])
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert [random.random() for _ in range(3)] == expected[2]


def test_a_validation_set_smaller_than_the_process_count_is_one_sentence():
    """Unpadded validation gives each sample to one rank: with fewer samples than ranks one rank would have none
    and the others would wait for it at the epoch's end; it is refused before any loader starts."""
    from types import SimpleNamespace

    from groundlab.config import ConfigError
    from groundlab.engine.data_base import ResumableDataModule

    module = ResumableDataModule(seed=0)
    module.trainer = SimpleNamespace(global_rank=0, world_size=4, current_epoch=0)
    with pytest.raises(ConfigError, match="the validation set has 3 images for 4 training processes"):
        module.loader(list(range(3)), 2, train=False, num_workers=0, collate=list)
    assert len(module.loader(list(range(3)), 2, train=True, num_workers=0, collate=list).sampler) == 1
