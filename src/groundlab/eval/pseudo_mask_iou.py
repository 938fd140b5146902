"""How good are pseudo-masks: the IoU of every pseudo-labelled box's mask with its true mask, matched by
annotation id between two COCO jsons of the same boxes, reduced as MAL reports mIoU (mean over classes of the
per-class mean IoU; groundlab.eval.mask_miou.MaskIoUMeter, also per size bucket).

A box whose pseudo-mask is missing (MAL could not label it) or empty scores 0: a failure is counted, never left
out of the mean."""

from __future__ import annotations

from typing import Dict, Mapping

import numpy as np

from groundlab.eval.mask_miou import MaskIoUMeter
from groundlab.ops.masks import decode_segmentation


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def pseudo_mask_iou(pseudo: Mapping, truth: Mapping) -> Dict[str, object]:
    """{"mIoU", "mIoU_small", "mIoU_medium", "mIoU_large", "num_instances" (boxes scored: those with a true
    mask), "missing" (of those, boxes without a pseudo-mask or with an empty one), "per_class"} of `pseudo` (a
    COCO json whose annotations carry predicted `segmentation`s) against `truth` (the same annotation ids with
    true masks). Sizes come from the image entries of `truth`."""
    images = {im["id"]: im for im in truth.get("images", [])}
    categories = sorted(int(c["id"]) for c in truth.get("categories", []))
    index = {cid: i for i, cid in enumerate(categories)}
    names = {int(c["id"]): c["name"] for c in truth.get("categories", [])}
    predicted = {int(a["id"]): a for a in pseudo.get("annotations", [])}
    meter = MaskIoUMeter(len(categories))
    missing = 0
    labels, ious, areas = [], [], []
    for ann in truth.get("annotations", []):
        if not ann.get("segmentation"):
            continue
        im = images[ann["image_id"]]
        h, w = int(im["height"]), int(im["width"])
        true = decode_segmentation(ann["segmentation"], h, w, f"annotation id {ann['id']}")
        pred_ann = predicted.get(int(ann["id"]))
        seg = pred_ann.get("segmentation") if pred_ann else None
        pred = decode_segmentation(seg, h, w, f"annotation id {ann['id']}") if seg else None
        if pred is None or not pred.any():
            missing += 1
            iou = 0.0
        else:
            iou = _iou(pred, true)
        labels.append(index[int(ann["category_id"])])
        ious.append(iou)
        areas.append(float(ann["bbox"][2]) * float(ann["bbox"][3]))
    meter.update(labels, ious, np.asarray(areas, dtype=np.float32))
    out = meter.compute([names[c] for c in categories])
    out["missing"] = missing
    return out
