"""The region head's losses (referring segmentation): no-target cross-entropy, minimap and union-mask BCE.

The target of every sample is the union of its ground-truth masks: every object the prompt refers to (one
expression in VG data, the prompt's classes in OD data), all background for an expression that refers to nothing.
ReLA (GRES) trains the three outputs with hard cross-entropy against the union mask bilinearly resized and
truncated to {0, 1}; here both the minimap and the union mask learn against *soft* targets, the area fraction of
the union inside each cell, so a cell half-covered by a small object is not simply background:
  loss_nt      = CE(no_targets (B, 2), empty)                              [target, no target]
  loss_minimap = BCE(minimap fg - bg logit (B, R), union area-pooled to the sqrt(R) x sqrt(R) grid of the image)
  loss_union   = BCE(union fg - bg logit (B, H_s, W_s), union area-pooled to stride s), over the image's cells,
                 + the soft dice of the same (per sample, mean over the batch)
(the two-class softmax against (1 - t, t) is exactly the BCE of the logit difference against t). The dice term is
ours: referred objects cover a few percent of an image, and with BCE alone the union learned to be background
everywhere, which the intersection-over-instance filter then turns into "nothing found". Weights:
model.rela_nt_loss_coef / rela_minimap_loss_coef / rela_union_mask_loss_coef (1.0 / 0.5 / 2.0). An empty sample
contributes to all three: its targets are "no target" and an all-background union.
"""

from __future__ import annotations

from typing import Dict, Sequence, Tuple

import torch
from torch import Tensor
from torch.nn import functional as F

REGION_LOSS_KEYS = ("loss_nt", "loss_minimap", "loss_union")


def union_targets(masks: Sequence[Tensor], stride: int, grid: Tuple[int, int], side: int
                  ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-sample (N_b, h_b, w_b) bool masks (augmented image, unpadded) -> (union at stride `stride` on the
    padded grid (B, H_s, W_s) float in [0, 1], its valid-cell mask (B, H_s, W_s) bool, minimap (B, side*side)
    float in [0, 1], empty (B,) long)."""
    H, W = grid
    device = masks[0].device
    union = torch.zeros(len(masks), 1, H * stride, W * stride, device=device)
    valid = torch.zeros_like(union)
    minimap, empty = [], []
    for b, m in enumerate(masks):
        h, w = min(m.shape[-2], H * stride), min(m.shape[-1], W * stride)
        u = m.any(0).float() if m.shape[0] else m.new_zeros(m.shape[-2:], dtype=torch.float32)
        union[b, 0, :h, :w] = u[:h, :w]
        valid[b, 0, :h, :w] = 1.0
        minimap.append(F.adaptive_avg_pool2d(u[None, None], side).flatten())
        empty.append(int(m.shape[0] == 0))
    pooled = F.avg_pool2d(union, stride)[:, 0]
    cells = F.avg_pool2d(valid, stride)[:, 0] > 0
    return pooled, cells, torch.stack(minimap), torch.tensor(empty, device=device)


def region_losses(outputs: Dict[str, Tensor], masks: Sequence[Tensor], stride: int) -> Dict[str, Tensor]:
    """{"loss_nt", "loss_minimap", "loss_union"} (unweighted) from the region head's outputs ("no_targets",
    "minimap_logits", "union_mask_logits") and each sample's (N_b, h_b, w_b) bool ground-truth masks."""
    union_logits = outputs["union_mask_logits"].float()
    minimap_logits = outputs["minimap_logits"].float()
    side = int(round(minimap_logits.shape[1] ** 0.5))
    union_t, cells, minimap_t, empty = union_targets(masks, stride, tuple(union_logits.shape[-2:]), side)
    union_diff = union_logits[:, 1] - union_logits[:, 0]
    per_cell = F.binary_cross_entropy_with_logits(union_diff, union_t, reduction="none")
    loss_union = (per_cell * cells).sum() / cells.sum().clamp(min=1)
    prob = union_diff.sigmoid() * cells
    dice = 1 - (2 * (prob * union_t).flatten(1).sum(1) + 1) / (prob.flatten(1).sum(1) + union_t.flatten(1).sum(1) + 1)
    minimap_diff = minimap_logits[..., 1] - minimap_logits[..., 0]
    return {
        "loss_nt": F.cross_entropy(outputs["no_targets"].float(), empty),
        "loss_minimap": F.binary_cross_entropy_with_logits(minimap_diff, minimap_t),
        "loss_union": loss_union + dice.mean(),
    }
