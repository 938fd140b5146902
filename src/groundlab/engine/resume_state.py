"""Exact resume: a checkpoint carries the random states (python, numpy, torch, CUDA) and its place in the
epoch, so a run killed and restarted ends where an uninterrupted run ends.

The random states are saved with every checkpoint and put back just before the first training batch after
a resume, i.e. at the same point of the computation where the uninterrupted run took them. The place in the
epoch (optimizer-step batches done) is read from Lightning's loop when saving; the data module's
ResumableSampler skips those batches. Augmentation is seeded per (seed, epoch, sample) in the datasets, and the
loaders draw worker seeds from their own generator, so nothing else depends on the global random state."""

from __future__ import annotations

import random
from typing import Any, Dict, List, Optional

import lightning as L
import numpy as np
import torch


def random_states() -> Dict[str, Any]:
    """Every random state this process's training step can draw from (torch tensors and plain types only, so
    the checkpoint loads with weights_only=True); CUDA: the current device's generator."""
    py = random.getstate()
    np_state = np.random.get_state()
    states = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def set_random_states(states: Dict[str, Any]) -> None:
    py = states["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = states["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


class ResumeState(L.Callback):
    """Saves every rank's random states in each checkpoint (rank 0 writes the file, so the others' are gathered);
    restores each rank's own on resume."""

    def __init__(self):
        self._pending: Optional[List[Dict[str, Any]]] = None

    def state_dict(self) -> Dict[str, Any]:
        states: List[Any] = [random_states()]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            states = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(states, random_states())  # every rank saves: a collective
        return {"random_per_rank": states}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self._pending = state_dict.get("random_per_rank")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._pending is not None:
            if trainer.global_rank < len(self._pending):  # a run resumed on as many ranks as it was saved from
                set_random_states(self._pending[trainer.global_rank])
            self._pending = None


def batches_done_in_epoch(trainer: L.Trainer) -> int:
    """Training batches of the current epoch that reached an optimizer step (what a resumed epoch skips): under
    gradient accumulation a partial group is not in the checkpoint's weights, so it is replayed."""
    processed = int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)
    return processed - processed % max(1, int(trainer.accumulate_grad_batches))
