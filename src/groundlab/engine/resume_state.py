"""Exact resume: a checkpoint carries the random states (python, numpy, torch, CUDA) and its place in the
epoch, so a run killed and restarted ends where an uninterrupted run ends.

The random states are saved with every checkpoint and put back just before the first training batch after
a resume, i.e. at the same point of the computation where the uninterrupted run took them. The place in the
epoch (optimizer-step batches done) is read from Lightning's loop when saving; the data module's
ResumableSampler skips those batches. Augmentation is seeded per (seed, epoch, sample) in the datasets, and the
loaders draw worker seeds from their own generator, so nothing else depends on the global random state."""

from __future__ import annotations

import random
from typing import Any, Dict, Optional

import lightning as L
import numpy as np
import torch


def random_states() -> Dict[str, Any]:
    """Every random state the training step can draw from (torch tensors and plain types only, so the
    checkpoint loads with weights_only=True)."""
    py = random.getstate()
    np_state = np.random.get_state()
    states = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_random_states(states: Dict[str, Any]) -> None:
    py = states["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = states["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class ResumeState(L.Callback):
    """Saves the random states and the epoch position in each checkpoint; restores both on resume."""

    def __init__(self):
        self._pending: Optional[Dict[str, Any]] = None

    def state_dict(self) -> Dict[str, Any]:
        return {"random": random_states()}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self._pending = state_dict.get("random")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._pending is not None:
            set_random_states(self._pending)
            self._pending = None


def batches_done_in_epoch(trainer: L.Trainer) -> int:
    """Training batches of the current epoch whose step has run (what a resumed epoch must skip)."""
    progress = trainer.fit_loop.epoch_loop.batch_progress.current
    return int(progress.processed)
