"""Masks of selected detections at the original image size: the mask head runs for those queries only.

For each detection, its prompt chunk's outputs give stride-4 logits: precomputed for every query under
"pred_masks" (B, Q, H/4, W/4) by an exported graph (TAO's contract), else computed for the selected queries by
`query_masks` from MaskGroundingDINO's outputs. As in TAO's PostProcess they are resized to the padded network
input (x4), cropped to the unpadded input (its size comes from the predictor: the padding mask) and resized to
the original image (bilinear both times), then thresholded on the probability. Work is done in groups of
PASTE_GROUP masks, so 300 detections on a large image never hold 300 float masks at full size at once.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Sequence

import torch
import torch.nn.functional as F

from groundlab.models.mask_gdino.dynamic_mask import MASK_OUT_STRIDE, query_masks

PASTE_GROUP = 32


def stride4_logits(out: Dict[str, Any], image: int, queries: torch.Tensor) -> torch.Tensor:
    """(G, H4, W4) float mask logits of `queries` (G,) of batch image `image`."""
    if "pred_masks" in out:
        return out["pred_masks"][image, queries.to(out["pred_masks"].device)].float()
    q = queries.to(out["mask_params"].device)
    return query_masks(out, torch.full_like(q, image), q).float()


def paste_query_masks(outputs: Sequence[Dict[str, Any]], image: int, chunks: torch.Tensor, queries: torch.Tensor,
                      input_size: torch.Tensor, orig_size: torch.Tensor, threshold: float) -> torch.Tensor:
    """outputs: per prompt chunk, the backend's outputs for the batch ("pred_masks", or MaskGroundingDINO's mask
    outputs); image: the batch index; chunks, queries: (K,) long, each detection's chunk and query; input_size:
    (2,) (h, w) of the image in the network input without its padding; orig_size: (2,) (h, w). Returns (K, h, w)
    bool, probability > threshold."""
    H, W = (int(v) for v in orig_size.tolist())
    in_h, in_w = (int(v) for v in input_size.tolist())
    K = int(queries.numel())
    masks = torch.zeros(K, H, W, dtype=torch.bool, device=queries.device)
    if K == 0:
        return masks
    # sigmoid(x) > t  <=>  x > logit(t); thresholds at 0 or 1 keep everything / nothing
    cut = -math.inf if threshold <= 0 else math.inf if threshold >= 1 else math.log(threshold / (1 - threshold))
    for k in chunks.unique().tolist():
        rows = (chunks == k).nonzero().flatten()
        for group in rows.split(PASTE_GROUP):
            logits = stride4_logits(outputs[k], image, queries[group])[:, None]  # (G, 1, H4, W4)
            h4, w4 = logits.shape[-2:]
            logits = F.interpolate(logits, size=(h4 * MASK_OUT_STRIDE, w4 * MASK_OUT_STRIDE), mode="bilinear",
                                   align_corners=False)[:, :, :in_h, :in_w]
            if (in_h, in_w) != (H, W):  # the original was resized for the network
                logits = F.interpolate(logits, size=(H, W), mode="bilinear", align_corners=False)
            masks[group.to(masks.device)] = (logits[:, 0] > cut).to(masks.device)
    return masks
