"""Box conversions, IoU / generalized IoU and class-wise NMS in pure torch (no torchvision).

Boxes are (..., 4) tensors, either normalized or pixel `cxcywh` (center x, center y, width, height)
or `xyxy` (x1, y1, x2, y2) with x2 >= x1 and y2 >= y1. Everything here is batched tensor math, so it
runs on any device and traces for export (NMS excepted: its iteration count depends on the data).
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

# Guards divisions by a zero union / enclosing area (degenerate zero-size boxes): IoU is then 0, not NaN.
_EPS = 1e-12


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """(..., 4) cxcywh -> (..., 4) xyxy."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """(..., 4) xyxy -> (..., 4) cxcywh."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], dim=-1)


def box_area(boxes: Tensor) -> Tensor:
    """(..., 4) xyxy -> (...,) areas (negative for malformed boxes; callers check well-formedness)."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tuple[Tensor, Tensor]:
    """Pairwise IoU of (N, 4) and (M, 4) xyxy boxes.

    Returns (iou (N, M), union (N, M)); the union is returned because generalized_box_iou reuses it.
    A pair with zero union (two empty boxes) has IoU 0."""
    area1 = box_area(boxes1)
    area2 = box_area(boxes2)
    lt = torch.max(boxes1[:, None, :2], boxes2[None, :, :2])  # (N, M, 2) intersection top-left
    rb = torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:])  # (N, M, 2) intersection bottom-right
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1[:, None] + area2[None, :] - inter
    return inter / union.clamp(min=_EPS), union


def _check_well_formed(boxes: Tensor, name: str) -> None:
    # DETR asserts this too: a box with x2 < x1 (e.g. from a diverged regression head) makes GIoU
    # silently wrong, so fail loudly instead.
    if not bool((boxes[:, 2:] >= boxes[:, :2]).all()):
        raise ValueError(f"{name}: boxes must be xyxy with x2 >= x1 and y2 >= y1 (got a malformed box)")


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise generalized IoU (https://giou.stanford.edu/) of (N, 4) and (M, 4) xyxy boxes -> (N, M).

    GIoU = IoU - (|C| - |A u B|) / |C| with C the smallest box enclosing both; in [-1, 1].
    Raises ValueError on a malformed box (x2 < x1 or y2 < y1), as DETR's assertion does."""
    _check_well_formed(boxes1, "generalized_box_iou boxes1")
    _check_well_formed(boxes2, "generalized_box_iou boxes2")
    iou, union = box_iou(boxes1, boxes2)
    lt = torch.min(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = torch.max(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    enclosing = wh[..., 0] * wh[..., 1]
    return iou - (enclosing - union) / enclosing.clamp(min=_EPS)


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy NMS over all boxes regardless of class.

    boxes (N, 4) xyxy, scores (N,). Returns (K,) long indices into boxes of the kept boxes, sorted by
    decreasing score. A box is dropped when its IoU with a kept, higher-scoring box is > iou_threshold.

    Instead of a Python loop over boxes, iterates the fixed point keep_i = not any_{j before i}
    (keep_j and IoU_ji > thr) from "keep everything". Boxes whose suppression chain is shorter than
    t are final after t rounds, and the greedy answer is the map's only fixed point, so the result
    equals greedy NMS exactly; rounds = longest suppression chain + 1 (usually a handful)."""
    n = boxes.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    # Stable sort: equal scores keep their input order, so the result is deterministic.
    order = torch.sort(scores, descending=True, stable=True).indices
    b = boxes[order]
    iou, _ = box_iou(b, b)
    # over[j, i]: j ranks before i and overlaps it enough to suppress it when j is kept.
    over = torch.triu(iou > iou_threshold, diagonal=1)
    keep = torch.ones(n, dtype=torch.bool, device=boxes.device)
    for _ in range(n + 1):  # converges in <= n rounds; the bound only guards against a bug looping forever
        new_keep = ~(over & keep[:, None]).any(dim=0)
        if torch.equal(new_keep, keep):
            break
        keep = new_keep
    return order[keep]


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """Class-wise NMS: boxes only suppress boxes with the same idxs value.

    boxes (N, 4) xyxy, scores (N,), idxs (N,) integer class (or any group) ids.
    Returns (K,) long indices into boxes, sorted by decreasing score; empty for N == 0.

    Uses torchvision's coordinate trick: each class's boxes are shifted by class * (extent + 1) so
    boxes of different classes never overlap, and one NMS handles all classes. The shift runs in
    float64, because in float32 large offsets (many classes x pixel coordinates) would round the
    coordinates by whole pixels and change IoUs near the threshold."""
    if boxes.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    b = boxes.to(torch.float64)
    lo = b.min()
    b = b - lo  # offsets start from 0 whatever the coordinate range (negative coordinates too)
    offsets = idxs.to(torch.float64) * (b.max() + 1)
    return nms(b + offsets[:, None], scores, iou_threshold)
