"""Mask logits for evaluation and inference from the student, the teacher or their average
(TAO `use_teacher_test` / `use_mixed_model_test`), optionally averaged with the mirrored crop
(`use_flip_test`)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from groundlab.models.mal.network import MALNetwork


class MALPredictor(nn.Module):
    """forward(images (N, 3, S, S), areas (N,)) -> logits (N, 1, S/4, S/4)."""

    def __init__(self, student: MALNetwork, teacher: Optional[MALNetwork] = None, use_teacher: bool = False,
                 mixed: bool = False, flip: bool = False):
        super().__init__()
        if (use_teacher or mixed) and teacher is None:
            raise ValueError("use_teacher_test / use_mixed_model_test need the teacher's weights")
        self.nets = nn.ModuleList([teacher, student] if mixed else [teacher if use_teacher else student])
        self.flip = flip

    def _once(self, images: torch.Tensor, areas: torch.Tensor) -> torch.Tensor:
        return torch.stack([net(images, areas).float() for net in self.nets]).mean(0)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, areas: torch.Tensor) -> torch.Tensor:
        logits = self._once(images, areas)
        if self.flip:
            logits = (logits + self._once(images.flip(-1), areas).flip(-1)) / 2
        return logits
