"""Instance masks from COCO `segmentation` objects (polygons, uncompressed or compressed RLE),
decoded with pycocotools."""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

import numpy as np
from pycocotools import mask as mask_utils

from groundlab.errors import DataError


def check_segmentation(seg: Any, where: Optional[str] = None, image_hw: Optional[Tuple[Any, Any]] = None) -> None:
    """Validate a segmentation's structure at read time, so a bad one fails naming its place. With `image_hw`
    (the record's (height, width), either may be None when the file does not say), an RLE's `size` must match
    it: such a mask was made for another image (or a resized one) and would misplace every pixel. Polygons are
    pixel coordinates that decode at any size."""
    if isinstance(seg, list):
        if not seg or not all(isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 for p in seg):
            raise DataError("polygon segmentation must be a list of [x1, y1, x2, y2, ...] with >= 3 points", where)
        return
    if isinstance(seg, dict) and "counts" in seg and "size" in seg and len(seg["size"]) == 2:
        if image_hw is not None and None not in image_hw:
            h, w = (int(v) for v in image_hw)
            if [int(v) for v in seg["size"]] != [h, w]:
                raise DataError(f"mask RLE size {[int(v) for v in seg['size']]} (height, width) differs from the "
                                f"image's height/width {[h, w]}", where)
        return
    raise DataError(f"segmentation must be polygons or an RLE dict with 'size' and 'counts', got {type(seg).__name__}", where)


def decode_segmentation(seg: Any, height: int, width: int, where: Optional[str] = None) -> np.ndarray:
    """(height, width) bool mask of one instance. RLE sizes must match the image."""
    check_segmentation(seg, where)
    if isinstance(seg, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
    else:
        if [int(v) for v in seg["size"]] != [height, width]:
            raise DataError(f"RLE size {list(seg['size'])} differs from the image size {[height, width]}", where)
        if isinstance(seg["counts"], list):
            rle = mask_utils.frPyObjects(seg, height, width)
        else:
            counts = seg["counts"]
            rle = {"size": [height, width], "counts": counts.encode() if isinstance(counts, str) else counts}
    return mask_utils.decode(rle).astype(bool)


def encode_mask(mask: np.ndarray) -> dict:
    """COCO compressed RLE of a (H, W) bool mask, with `counts` as str (json-ready)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def encode_masks(masks: np.ndarray) -> List[dict]:
    """encode_mask of each of (K, H, W) bool masks, in one pycocotools call (K RLEs; [] for K = 0)."""
    if len(masks) == 0:
        return []
    rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles
