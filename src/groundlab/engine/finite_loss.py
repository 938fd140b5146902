"""The stop on a non-finite loss shared by every training loop: the message names the step, epoch and
batch, says the last good checkpoint is kept, and suggests the model's own remedies."""

from __future__ import annotations

import torch


def check_finite_loss(total: torch.Tensor, step: int, epoch: int, batch_idx: int, remedy: str) -> None:
    """Raise FloatingPointError when `total` is nan/inf; `remedy` names the config keys to try."""
    if not torch.isfinite(total):
        raise FloatingPointError(
            f"loss is {total.item()} at global step {step} (epoch {epoch}, batch {batch_idx}); training stopped, "
            f"the last good checkpoint is kept. {remedy}")
