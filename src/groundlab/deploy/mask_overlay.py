"""Instance masks drawn over an image (MAL's annotated images): each mask tinted in its class colour
at half opacity, its box outlined and named with deploy.writers.draw_detections."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageColor

from groundlab.deploy.writers import PALETTE, draw_detections


def overlay_masks(image: np.ndarray, masks: Sequence[np.ndarray], labels: Sequence[int], boxes: Sequence[Sequence[float]],
                  names: Sequence[str], alpha: float = 0.5) -> Image.Image:
    """image (H, W, 3) uint8; masks: (H, W) bool each; labels: class indices; boxes: [x1, y1, x2, y2]."""
    out = image.astype(np.float32).copy()
    for mask, label in zip(masks, labels):
        colour = np.array(ImageColor.getrgb(PALETTE[int(label) % len(PALETTE)]), dtype=np.float32)
        out[mask] = out[mask] * (1 - alpha) + colour * alpha
    result = {"scores": np.ones(len(labels), dtype=np.float32), "labels": np.asarray(labels, dtype=np.int64),
              "boxes": np.asarray(boxes, dtype=np.float32).reshape(-1, 4)}
    return draw_detections(np.clip(out, 0, 255).astype(np.uint8), result, names)
