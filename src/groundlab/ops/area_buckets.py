"""COCO's object size buckets by area in original-image pixels: small (<= 32^2), medium (<= 96^2), large."""

from __future__ import annotations

import torch

AREA_BUCKETS = ((0.0, 32.0 ** 2), (32.0 ** 2, 96.0 ** 2), (96.0 ** 2, float("inf")))
BUCKET_NAMES = ("small", "medium", "large")


def area_bucket(areas: torch.Tensor) -> torch.Tensor:
    """(N,) box areas in original-image pixels -> (N,) bucket index 0 small / 1 medium / 2 large."""
    return (areas > AREA_BUCKETS[0][1]).long() + (areas > AREA_BUCKETS[1][1]).long()
