"""Mask Grounding DINO's losses: Grounding DINO's (groundlab.models.gdino.criterion) plus, on every decoder
layer (final and auxiliary, each matched on its own; not the encoder proposals nor the denoising queries, as in
TAO), a sigmoid focal loss and a dice loss between the matched queries' stride-4 mask logits and the
ground-truth masks sampled at stride 4.

Extra inputs: each decoder layer's outputs carry MaskGroundingDINO's "mask_params", "mask_refs",
"mask_features", "mask_stride" and "image_sizes"; targets carry "masks" (N_b, h_b, w_b) bool in the augmented
image's pixels (unpadded). Extra loss keys: "loss_mask", "loss_dice" (+ "_{i}" for aux layer i).

Normalization (TAO's): focal = per-mask mean over pixels, summed over matched queries, / num_boxes;
dice = 1 - (2 |P.G| + 1) / (|P| + |G| + 1) per mask (P the sigmoid probabilities), summed, / num_boxes.
Ground truth at stride 4: the pixel at (4i + 2, 4j + 2) of the mask zero-padded to the batch's padded size.
"""

from __future__ import annotations

from typing import Dict, List, Sequence

import torch
from torch import Tensor

from groundlab.models.gdino.criterion import LOSS_KEYS, SetCriterion, sigmoid_focal_loss
from groundlab.models.gdino.matcher import Indices
from groundlab.models.mask_gdino.dynamic_mask import MASK_OUT_STRIDE, query_masks
from groundlab.models.mask_gdino.region_loss import region_losses

# TAO's mask focal loss uses the focal defaults whatever model.focal_alpha / focal_gamma say
MASK_FOCAL_ALPHA = 0.25
MASK_FOCAL_GAMMA = 2.0


def masks_at_stride4(masks: Tensor, height: int, width: int) -> Tensor:
    """(N, h, w) bool masks -> (N, height, width) float: pixel (4i + 2, 4j + 2), zero beyond the mask's own
    extent (the batch padding)."""
    out = masks.new_zeros((masks.shape[0], height, width), dtype=torch.float32)
    start = MASK_OUT_STRIDE // 2
    sampled = masks[:, start::MASK_OUT_STRIDE, start::MASK_OUT_STRIDE][:, :height, :width]
    out[:, : sampled.shape[1], : sampled.shape[2]] = sampled.float()
    return out


def dice_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """(K, N) logits and 0/1 targets -> (K,) 1 - soft dice (+1 smoothing, so empty masks are defined)."""
    prob = logits.sigmoid()
    return 1 - (2 * (prob * targets).sum(1) + 1) / (prob.sum(1) + targets.sum(1) + 1)


class MaskSetCriterion(SetCriterion):
    """SetCriterion with "masks" in `losses` (weights "loss_mask", "loss_dice" in weight_dict)."""

    loss_keys = {**LOSS_KEYS, "masks": ("loss_mask", "loss_dice")}

    def forward(self, outputs, targets, return_indices: bool = False):
        if "masks" in self.losses and "mask_features" in outputs and all("masks" in t for t in targets):
            features = outputs["mask_features"]
            factor = int(outputs["mask_stride"]) // MASK_OUT_STRIDE
            h, w = features.shape[-2] * factor, features.shape[-1] * factor
            targets = [dict(t, masks_s4=masks_at_stride4(t["masks"].to(features.device), h, w)) for t in targets]
        result = super().forward(outputs, targets, return_indices)
        if "union_mask_logits" in outputs and all("masks" in t for t in targets):
            losses = result[0] if return_indices else result
            device = outputs["union_mask_logits"].device
            losses.update(region_losses(outputs, [t["masks"].to(device) for t in targets], int(outputs["mask_stride"])))
        return result

    def layer_losses(self, layer: Dict[str, Tensor], targets: Sequence[Dict[str, Tensor]], indices: Indices,
                     token_mask: Tensor, num_boxes: float) -> Dict[str, Tensor]:
        out = super().layer_losses(layer, targets, indices, token_mask, num_boxes)
        if "masks" in self.losses and "mask_params" in layer and all("masks_s4" in t for t in targets):
            out.update(self._loss_masks(layer, targets, indices, num_boxes))
        return out

    def _loss_masks(self, layer: Dict[str, Tensor], targets: Sequence[Dict[str, Tensor]], indices: Indices,
                    num_boxes: float) -> Dict[str, Tensor]:
        device = layer["mask_features"].device
        batch_idx = torch.cat([torch.full_like(q, b) for b, (q, _) in enumerate(indices)]).to(device)
        query_idx = torch.cat([q for q, _ in indices]).to(device)
        logits = query_masks(layer, batch_idx, query_idx).float()  # (K, H4, W4)
        if logits.shape[0] == 0:  # nothing matched (images without objects): zero, head still in the graph
            zero = logits.sum()
            return {"loss_mask": zero, "loss_dice": zero}
        gt: List[Tensor] = [t["masks_s4"][j.to(device)] for t, (_, j) in zip(targets, indices)]
        target = torch.cat(gt).flatten(1)
        logits = logits.flatten(1)
        focal = sigmoid_focal_loss(logits, target, MASK_FOCAL_ALPHA, MASK_FOCAL_GAMMA).mean(1).sum() / num_boxes
        return {"loss_mask": focal, "loss_dice": dice_loss(logits, target).sum() / num_boxes}
