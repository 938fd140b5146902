"""MAL's losses on the student's mask probabilities, both from the box alone:

- MIL (projection) loss: every row and column crossing the box holds some object pixel, none outside
  it does; the max over each row/column of the prediction must match the box's, by dice.
- CRF loss: dice between the student and the mean-field refinement of the student+teacher average
  inside the box (the pseudo-label).
Each is ramped in linearly over its first `loss_*_step` steps and weighted."""

from __future__ import annotations

from typing import Dict

import torch
from torch import nn
from torch.nn import functional as F

from groundlab.models.mal.mean_field import MeanFieldCRF


def dice_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(N, ...) probabilities and targets -> (N,) 1 - dice (squared denominators, +1e-3 smoothing)."""
    pred, target = pred.flatten(1).float(), target.flatten(1).float()
    inter = (pred * target).sum(1)
    return 1 - 2 * inter / (pred.pow(2).sum(1) + target.pow(2).sum(1) + 2e-3)


def mil_loss(prob: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """(N, H, W) probabilities and box masks -> (N,) dice of the column projections + of the row projections."""
    return dice_loss(prob.amax(1), box.amax(1)) + dice_loss(prob.amax(2), box.amax(2))


def ramp(step: int, ramp_steps: int) -> float:
    return 1.0 if ramp_steps <= 0 else min(1.0, step / ramp_steps)


class MALCriterion(nn.Module):
    """forward(student_logits (N, 1, h, w), teacher_logits (N, 1, h, w), image (N, 3, S, S) the teacher view,
    box_mask (N, 1, S, S), step) -> {"loss_mil", "loss_crf", "pseudo_mask" (N, h', w') detached}."""

    def __init__(self, train_cfg):
        super().__init__()
        self.mil_weight, self.crf_weight = train_cfg.loss_mil_weight, train_cfg.loss_crf_weight
        self.mil_step, self.crf_step = int(train_cfg.loss_mil_step), int(train_cfg.loss_crf_step)
        self.crf_size_ratio = float(train_cfg.crf_size_ratio)
        self.crf = MeanFieldCRF(train_cfg.crf_kernel_size, train_cfg.crf_zeta, train_cfg.crf_num_iter,
                                train_cfg.crf_value_low_thres, train_cfg.crf_value_high_thres)

    def forward(self, student_logits, teacher_logits, image, box_mask, step: int) -> Dict[str, torch.Tensor]:
        n, _, h, w = student_logits.shape
        student = student_logits.float().sigmoid()[:, 0]
        teacher = teacher_logits.float().sigmoid()[:, 0]
        box = F.interpolate(box_mask.float(), size=(h, w), mode="bilinear", align_corners=False)[:, 0]
        loss_mil = mil_loss(student, box).mean() * self.mil_weight * ramp(step, self.mil_step)

        size = (int(h * self.crf_size_ratio), int(w * self.crf_size_ratio))
        def at_crf(x):  # noqa: E306
            return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        s, t, b = at_crf(student[:, None])[:, 0], at_crf(teacher[:, None])[:, 0], at_crf(box_mask.float())[:, 0]
        pseudo = self.crf(at_crf(image.float()), (s.detach() + t) / 2, b)
        loss_crf = dice_loss(s, pseudo).mean() * self.crf_weight * ramp(step, self.crf_step)
        return {"loss_mil": loss_mil, "loss_crf": loss_crf, "pseudo_mask": pseudo}
