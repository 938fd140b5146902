"""Pasting a crop's mask probabilities back into the image it was cut from (MAL, mask heads)."""

from __future__ import annotations

from typing import Sequence, Tuple

import torch
from torch.nn import functional as F


def paste_mask(prob: torch.Tensor, ext: Sequence[int], box: Sequence[float], height: int, width: int
               ) -> Tuple[torch.Tensor, Tuple[int, int, int, int]]:
    """(h, w) crop probabilities -> the part inside the image, resized to the crop's pixels and zero
    outside the box: ((y1'-y0', x1'-x0') probabilities, (x0', y0', x1', y1') its place in the image)."""
    x1, y1, x2, y2 = ext
    full = F.interpolate(prob[None, None].float(), size=(y2 - y1, x2 - x1), mode="bilinear",
                         align_corners=False)[0, 0]
    ix1, iy1, ix2, iy2 = max(x1, 0), max(y1, 0), min(x2, width), min(y2, height)
    region = full[iy1 - y1:iy2 - y1, ix1 - x1:ix2 - x1]
    ys = torch.arange(iy1, iy2, dtype=torch.float32) + 0.5
    xs = torch.arange(ix1, ix2, dtype=torch.float32) + 0.5
    inside = ((ys >= box[1]) & (ys < box[3]))[:, None] & ((xs >= box[0]) & (xs < box[2]))[None, :]
    return region * inside, (ix1, iy1, ix2, iy2)
