"""COCO datasets made from predictions, for the auto-label pipeline (action=autolabel):

- `detections_to_coco`: Grounding DINO's detections on raw images (inference's results.json + images.json) as a
  box-only COCO dataset json, MAL's training and labelling input;
- `fill_missing_masks`: MAL's labelled json made trainable for Mask Grounding DINO, whose reader needs a mask on
  every box. A box MAL could not label (listed under `mal_skipped`) or labelled with an empty mask gets its
  rectangle as its mask, or its image is left out (`policy`); either way each one is counted by reason, never
  dropped silently.

Annotation dicts are COCO's: {"id", "image_id", "category_id", "bbox": [x, y, w, h], "area", "segmentation"?}.
"""

from __future__ import annotations

import copy
from collections import Counter
from typing import Dict, List, Mapping, Sequence, Tuple

import numpy as np

from groundlab.ops.masks import encode_mask


def detections_to_coco(detections: Sequence[Mapping], images: Sequence[Mapping], categories: Sequence[Mapping],
                        threshold: float) -> dict:
    """A COCO dataset json of the detections scoring >= `threshold`: the `images` (each {"id", "file_name",
    "height", "width"}), `categories` ({"id", "name"}) and one box annotation per kept detection
    ({"image_id", "category_id", "bbox", "score"}), with its `score` kept. Images without a kept detection stay
    in the json: they are negatives for the detector."""
    annotations = []
    for det in detections:
        if det["score"] < threshold:
            continue
        x, y, w, h = (float(v) for v in det["bbox"])
        if w <= 0 or h <= 0:
            continue
        annotations.append({"id": len(annotations) + 1, "image_id": int(det["image_id"]),
                            "category_id": int(det["category_id"]), "bbox": [x, y, w, h], "area": w * h,
                            "iscrowd": 0, "score": float(det["score"])})
    keep = ("id", "file_name", "height", "width")
    return {"images": [{k: im[k] for k in keep} for im in images],
            "categories": [{"id": int(c["id"]), "name": c["name"]} for c in categories],
            "annotations": annotations}


def box_mask(bbox: Sequence[float], height: int, width: int) -> np.ndarray:
    """(height, width) bool: the pixels whose centres lie inside the xywh box, clamped to the image."""
    x, y, w, h = (float(v) for v in bbox)
    cols = np.arange(width) + 0.5
    rows = np.arange(height) + 0.5
    inside_x = (cols >= x) & (cols <= x + w)
    inside_y = (rows >= y) & (rows <= y + h)
    return inside_y[:, None] & inside_x[None, :]


def _reasons(data: Mapping) -> Dict[int, str]:
    """annotation id -> why MAL gave it no mask (its `mal_skipped` list)."""
    return {int(s["ann_id"]): str(s.get("reason") or "not labelled") for s in data.get("mal_skipped", [])}


def fill_missing_masks(data: Mapping, policy: str) -> Tuple[dict, Dict[str, object]]:
    """(json, counts) from MAL's labelled json. `policy` "box": a box without a mask gets its rectangle (RLE);
    "drop_image": every image holding such a box is removed with all its annotations. counts: {"boxes",
    "pseudo_masks" (boxes with MAL's own non-empty mask), "missing_masks", "missing_by_reason" {reason: n},
    "box_masks" (rectangles given), "images_dropped", "annotations_dropped"}."""
    if policy not in ("box", "drop_image"):
        raise ValueError(f"policy must be box or drop_image, got {policy!r}")
    out = copy.deepcopy(dict(data))
    images = {im["id"]: im for im in out.get("images", [])}
    skipped = _reasons(out)
    reasons: Counter = Counter()
    missing: List[dict] = []
    for ann in out.get("annotations", []):
        seg, area = ann.get("segmentation"), ann.get("area")
        if not seg or (isinstance(seg, dict) and not area):
            reasons["empty mask" if seg else skipped.get(int(ann["id"]), "not labelled")] += 1
            missing.append(ann)
    counts: Dict[str, object] = {"boxes": len(out.get("annotations", [])), "missing_masks": len(missing),
                                 "missing_by_reason": dict(reasons), "box_masks": 0, "images_dropped": 0,
                                 "annotations_dropped": 0}
    counts["pseudo_masks"] = counts["boxes"] - len(missing)
    if policy == "box":
        for ann in missing:
            im = images.get(ann["image_id"])
            if im is None:
                continue
            mask = box_mask(ann["bbox"], int(im["height"]), int(im["width"]))
            ann["segmentation"], ann["area"] = encode_mask(mask), float(mask.sum())
            counts["box_masks"] += 1
        return out, counts
    dropped = {ann["image_id"] for ann in missing}
    kept = [a for a in out.get("annotations", []) if a["image_id"] not in dropped]
    counts["annotations_dropped"] = len(out.get("annotations", [])) - len(kept)
    counts["images_dropped"] = len(dropped)
    out["annotations"] = kept
    out["images"] = [im for im in out.get("images", []) if im["id"] not in dropped]
    return out, counts
