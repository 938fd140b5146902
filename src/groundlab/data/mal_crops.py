"""Box-expanded crops for MAL, and the way back: the crop's mask pasted into the full image.

A crop is the box grown by a margin on each side (random in training: `train.margin_rate` [lo, hi],
shared between the two sides of an axis; fixed in evaluation/inference: `model.test_margin_rate[0] / 2`
per side), taken from the image with mirrored pixels where it leaves the image (the CRF compares real
colours, so a constant fill would invent edges), then resized to `crop_size` x `crop_size`."""

from __future__ import annotations

import math
from typing import Sequence, Tuple

import numpy as np
from PIL import Image


def expand_box(box: Sequence[float], margins: Sequence[float]) -> Tuple[int, int, int, int]:
    """[x1, y1, x2, y2] grown by margins (left, top, right, bottom) x half-size -> integer crop box."""
    x1, y1, x2, y2 = box
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    ex1 = cx - (cx - x1) * (1 + margins[0])
    ey1 = cy - (cy - y1) * (1 + margins[1])
    ex2 = cx + (x2 - cx) * (1 + margins[2])
    ey2 = cy + (y2 - cy) * (1 + margins[3])
    return math.floor(ex1), math.floor(ey1), max(math.ceil(ex2), math.floor(ex1) + 1), \
        max(math.ceil(ey2), math.floor(ey1) + 1)


def random_margins(rng: np.random.Generator, margin_rate: Sequence[float]) -> np.ndarray:
    """(4,) margins: a rate in [lo, hi] per side, split between left/right and top/bottom by a random gate."""
    lo, hi = margin_rate
    rates = rng.random(4) * (hi - lo) + lo
    gate = rng.random(2)
    return rates * np.array([gate[0], gate[1], 1 - gate[0], 1 - gate[1]])


def eval_margins(test_margin_rate: Sequence[float]) -> np.ndarray:
    return np.full(4, test_margin_rate[0] * 0.5)


def crop_region(image: np.ndarray, ext: Sequence[int]) -> np.ndarray:
    """(H, W, ...) array -> (y2-y1, x2-x1, ...) crop at ext = (x1, y1, x2, y2), mirrored outside the image."""
    h, w = image.shape[:2]
    x1, y1, x2, y2 = ext
    inner = image[max(y1, 0):min(y2, h), max(x1, 0):min(x2, w)]
    if inner.size == 0:  # crop entirely outside: cannot happen for boxes inside the image
        raise ValueError(f"crop {ext} does not overlap the {w}x{h} image")
    pad = [(max(0, -y1), max(0, y2 - h)), (max(0, -x1), max(0, x2 - w))] + [(0, 0)] * (image.ndim - 2)
    return np.pad(inner, pad, mode="symmetric") if any(p != (0, 0) for p in pad) else inner


def crop_resized(image: np.ndarray, ext: Sequence[int], size: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (size, size, 3) uint8 crop of `ext`, bilinear."""
    return np.asarray(Image.fromarray(np.ascontiguousarray(crop_region(image, ext))).resize((size, size),
                                                                                          Image.BILINEAR))


def box_mask_in_crop(box: Sequence[float], ext: Sequence[int], size: int) -> np.ndarray:
    """(size, size) float32 mask of the box inside the resized crop: 1 for pixels whose centre is inside."""
    x1, y1, x2, y2 = ext
    sx, sy = size / (x2 - x1), size / (y2 - y1)
    centres = np.arange(size) + 0.5
    cols = (centres >= (box[0] - x1) * sx) & (centres < (box[2] - x1) * sx)
    rows = (centres >= (box[1] - y1) * sy) & (centres < (box[3] - y1) * sy)
    return (rows[:, None] & cols[None, :]).astype(np.float32)
