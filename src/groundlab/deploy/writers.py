"""Inference outputs as TAO writes them: KITTI label files, COCO results json, annotated images.

Every function takes one image's detection result
    {"scores": (K,), "labels": (K,) int class index, "boxes": (K, 4) xyxy pixels[, "masks": (K, H, W) bool]}
as torch tensors or numpy arrays (see models.gdino.postprocess), sorted or not. "masks" (Mask Grounding DINO,
at the original image size) adds an RLE "segmentation" to the COCO results; KITTI files have no place for it.
Masks are drawn by deploy.mask_overlay.
"""

from __future__ import annotations

import json
import re
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np
from PIL import Image, ImageColor, ImageDraw

from groundlab.ops.atomic_write import atomic_write_text
from groundlab.ops.masks import encode_mask

# Distinct, saturated colours for boxes of classes that the color map does not name (by label).
PALETTE = ["#e6194b", "#3cb44b", "#ffe119", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6",
           "#bcf60c", "#fabebe", "#008080", "#e6beff", "#9a6324", "#800000", "#aaffc3", "#000075"]


def _to_np(x) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, without importing torch here
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def detection_arrays(result: Mapping[str, object]):
    """(scores (K,) float64, labels (K,) int64, boxes (K, 4) float64) as numpy."""
    scores = _to_np(result["scores"]).astype(np.float64).reshape(-1)
    labels = _to_np(result["labels"]).astype(np.int64).reshape(-1)
    boxes = _to_np(result["boxes"]).astype(np.float64).reshape(-1, 4)
    if not len(scores) == len(labels) == len(boxes):
        raise ValueError(f"result has {len(scores)} scores, {len(labels)} labels and {len(boxes)} boxes")
    return scores, labels, boxes


def result_masks(result: Mapping[str, object]) -> Optional[np.ndarray]:
    """result["masks"] as (K, H, W) bool numpy (nonzero = inside), or None when the result has no masks."""
    if "masks" not in result:
        return None
    masks = _to_np(result["masks"])
    n = len(_to_np(result["scores"]).reshape(-1))
    if masks.ndim != 3 or len(masks) != n:
        raise ValueError(f"result masks must be (K, H, W) for its {n} detections, got shape {masks.shape}")
    return masks.astype(bool, copy=False)


def class_name(names: Sequence[str], label: int) -> str:
    if not 0 <= label < len(names):
        raise ValueError(f"label {label} is outside the {len(names)} class names")
    return names[label]


def kitti_name(name: str) -> str:
    """A class name as one KITTI field: whitespace runs become "_" ("traffic light" -> "traffic_light").

    TAO's grounding_dino inference (deformable_detr save_inference_prediction) writes the name as is,
    which splits a multi-word name into several fields and breaks every KITTI reader; we deviate there."""
    return re.sub(r"\s+", "_", name.strip())


def kitti_lines(result: Mapping[str, object], class_names: Sequence[str], conf_threshold: float = 0.0) -> List[str]:
    """One KITTI line per detection with score >= conf_threshold, in the result's order:
    "{name} 0.00 0 0.00 {x1:.2f} {y1:.2f} {x2:.2f} {y2:.2f} 0.00 0.00 0.00 0.00 0.00 0.00 0.00 {score:.3f}"
    (type, truncated, occluded, alpha, bbox, 3-D dims, location, rotation_y, score). TAO prints the
    bbox with 3 decimals; 2 (0.01 px) is what KITTI tools expect and loses nothing meaningful."""
    scores, labels, boxes = detection_arrays(result)
    lines = []
    for score, label, (x1, y1, x2, y2) in zip(scores, labels, boxes):
        if score < conf_threshold:
            continue
        name = kitti_name(class_name(class_names, int(label)))
        lines.append(f"{name} 0.00 0 0.00 {x1:.2f} {y1:.2f} {x2:.2f} {y2:.2f} "
                     f"0.00 0.00 0.00 0.00 0.00 0.00 0.00 {score:.3f}")
    return lines


def write_kitti(path: str, result: Mapping[str, object], class_names: Sequence[str],
                conf_threshold: float = 0.0) -> None:
    """KITTI label file of one image (empty file when nothing is detected); parent folders are made."""
    lines = kitti_lines(result, class_names, conf_threshold)
    atomic_write_text(path, "".join(line + "\n" for line in lines))


def coco_results(image_id: int, result: Mapping[str, object], category_ids: Optional[Sequence[int]] = None,
                 conf_threshold: float = 0.0) -> List[Dict[str, object]]:
    """COCO detection results of one image: [{"image_id", "category_id", "bbox": [x, y, w, h], "score"}], each
    with "segmentation" (compressed RLE {"size": [H, W], "counts": str}) when the result has masks.

    category_id is category_ids[label] when given (contiguous class index -> the dataset's COCO
    category id), else the label itself. bbox is rounded to 0.01 px and score to 1e-5: finer digits
    only bloat the json and do not change AP."""
    scores, labels, boxes = detection_arrays(result)
    masks = result_masks(result)
    out = []
    for k, (score, label, (x1, y1, x2, y2)) in enumerate(zip(scores, labels, boxes)):
        if score < conf_threshold:
            continue
        if category_ids is not None and not 0 <= label < len(category_ids):
            raise ValueError(f"label {label} is outside the {len(category_ids)} category ids")
        cat = int(category_ids[label]) if category_ids is not None else int(label)
        out.append({
            "image_id": int(image_id),
            "category_id": cat,
            "bbox": [round(float(x1), 2), round(float(y1), 2), round(float(x2 - x1), 2), round(float(y2 - y1), 2)],
            "score": round(float(score), 5),
        })
        if masks is not None:  # only the kept detections' masks are encoded
            out[-1]["segmentation"] = encode_mask(masks[k])
    return out


class CocoResultsWriter:
    """Accumulates COCO results over images and writes them as one json list (atomically).

    writer = CocoResultsWriter(path, category_ids); writer.add(image_id, result) per image;
    writer.write() -> path. Note pycocotools' COCO.loadRes rejects an empty list; callers
    evaluating a run without detections must check len(writer) first."""

    def __init__(self, path: str, category_ids: Optional[Sequence[int]] = None, conf_threshold: float = 0.0):
        self.path = path
        self.category_ids = list(category_ids) if category_ids is not None else None
        self.conf_threshold = conf_threshold
        self.results: List[Dict[str, object]] = []

    def add(self, image_id: int, result: Mapping[str, object]) -> None:
        self.results.extend(coco_results(image_id, result, self.category_ids, self.conf_threshold))

    def __len__(self) -> int:
        return len(self.results)

    def write(self) -> str:
        atomic_write_text(self.path, json.dumps(self.results))
        return self.path


def _text_colour(fill) -> str:
    """Black or white, whichever reads better on `fill` (ITU-R BT.601 luma)."""
    rgb = ImageColor.getrgb(fill) if isinstance(fill, str) else tuple(fill)
    return "black" if 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2] > 140 else "white"


def box_colour(name: str, label: int, color_map: Optional[Mapping[str, str]] = None) -> str:
    """A detection's colour (any PIL colour string): color_map[name] when the map names the class, else
    PALETTE[label] (cycling). Boxes, label pads and mask tints of a class share it."""
    return (color_map or {}).get(name) or PALETTE[int(label) % len(PALETTE)]


def draw_detections(
    image: np.ndarray,
    result: Mapping[str, object],
    names: Sequence[str],
    color_map: Optional[Mapping[str, str]] = None,
    outline_width: int = 2,
    conf_threshold: float = 0.0,
) -> Image.Image:
    """Annotated copy of image (H, W, 3) uint8: each detection with score >= conf_threshold as a box
    outline and a "name score" label on a filled pad above the box (inside it when the box touches
    the top edge). Colour: color_map[name] (any PIL colour string) when the map names the class, else
    PALETTE[label]. TAO draws only classes in its color map; here every detection is drawn."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3), got {image.shape}")
    scores, labels, boxes = detection_arrays(result)
    out = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8))
    draw = ImageDraw.Draw(out)
    # Low scores first, so the most confident boxes end up on top.
    for k in np.argsort(scores, kind="stable"):
        score, label = float(scores[k]), int(labels[k])
        if score < conf_threshold:
            continue
        name = class_name(names, label)
        colour = box_colour(name, label, color_map)
        x1, y1, x2, y2 = (float(v) for v in boxes[k])
        draw.rectangle([x1, y1, max(x1, x2), max(y1, y2)], outline=colour, width=outline_width)
        text = f"{name} {score:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text)
        tw, th = right - left + 4, bottom - top + 4
        ty = y1 - th if y1 - th >= 0 else y1 + outline_width  # keep the label on the image
        draw.rectangle([x1, ty, x1 + tw, ty + th], fill=colour)
        draw.text((x1 + 2 - left, ty + 2 - top), text, fill=_text_colour(colour))
    return out
