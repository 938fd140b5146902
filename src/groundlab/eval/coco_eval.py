"""COCO detection and instance-segmentation evaluation with pycocotools (evaluate action, validation).

    ev = CocoEvaluator(gt_json, iou_types=("bbox", "segm"), class_ids=None)
    ev.update(image_id, result, category_ids)      # once per image, detections or not
    metrics = ev.summarize()                       # {"bbox": {...}, "segm": {...}}

A result is one image's detections as models.gdino.postprocess returns them:
{"scores": (K,), "labels": (K,) contiguous class index, "boxes": (K, 4) xyxy pixels[, "masks": (K, H, W)]},
torch tensors or numpy arrays; "rles" (K compressed RLEs, ops.masks.encode_masks) may stand in for "masks" when
the caller has encoded them already (the evaluate action writes them to detections.json too). Labels are
mapped back to the dataset's COCO category ids through `category_ids` (data.coco.read_coco's third return
value); None means the labels already are ids.

Only images passed to update() are evaluated (COCOeval imgIds is restricted to them), so validating on
a subset of the GT file gives that subset's numbers, and images without any detection still count
against recall. Distributed: each rank calls state(); rank 0 merges the gathered states (its own may be
among them) and summarizes. All state is plain dicts/lists/str, so it pickles and json-dumps.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from groundlab.errors import DataError
from groundlab.io.remote_files import redact
from groundlab.ops.atomic_write import atomic_write_text
from groundlab.ops.masks import check_segmentation, encode_masks

# COCOeval.stats in its order (summarize() prints them in this order too).
STAT_NAMES = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]
IOU_TYPES = ("bbox", "segm")
STATE_VERSION = 1


def _silent_coco(dataset: Dict[str, Any], buf: io.StringIO) -> COCO:
    """A COCO api object over an in-memory dataset; its "creating index..." chatter goes to buf."""
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(buf):
        coco.createIndex()
    return coco


def _complete_gt(data: Mapping[str, Any]) -> Dict[str, Any]:
    """A copy of a GT dataset with the annotation keys COCOeval indexes unconditionally filled in.

    Hand-made or converted COCO files often omit `iscrowd` and `area`; COCOeval would KeyError on them.
    Missing area falls back to the box area (w * h), which is what decides small/medium/large."""
    out = dict(data)
    anns = []
    for ann in data.get("annotations", []):
        if "iscrowd" not in ann or "area" not in ann:
            ann = dict(ann)
            ann.setdefault("iscrowd", 0)
            if "area" not in ann:
                _, _, w, h = ann["bbox"]
                ann["area"] = float(w) * float(h)
        anns.append(ann)
    out["annotations"] = anns
    out.setdefault("categories", [])
    return out


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        x = x.detach().cpu()
        x = (x.float() if x.is_floating_point() else x).numpy()  # numpy has no bfloat16
    return np.asarray(x)


def _encode_masks(masks: np.ndarray) -> List[Dict[str, Any]]:
    """(K, H, W) masks -> K compressed RLEs with str counts (bytes do not survive json)."""
    if masks.ndim == 4 and masks.shape[1] == 1:  # (K, 1, H, W) as mask heads often emit
        masks = masks[:, 0]
    if masks.ndim != 3:
        raise ValueError(f"masks must be (K, H, W), got shape {masks.shape}")
    # Float masks are probabilities; anything else is a 0/1 mask.
    binary = masks > 0.5 if np.issubdtype(masks.dtype, np.floating) else masks != 0
    return encode_masks(binary)


def _nan_to_none(value: Any) -> Any:
    """Metrics as json-safe plain values: numpy scalars -> float/int, nan/inf -> None, recursively."""
    if isinstance(value, Mapping):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nan_to_none(v) for v in value]
    if isinstance(value, np.ndarray):
        return _nan_to_none(value.tolist())
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


class CocoEvaluator:
    """Accumulates per-image detections and computes COCO metrics with pycocotools' COCOeval.

    gt: a COCO json path, its parsed dict, or a pycocotools COCO object (used as is).
    iou_types: any of "bbox", "segm" ("segm" needs result["masks"] and GT segmentations).
    class_ids: evaluate only these original category ids (TAO's dataset.eval_class_ids); None = all."""

    def __init__(self, gt: Union[str, Dict[str, Any], COCO], iou_types: Sequence[str] = ("bbox",),
                 class_ids: Optional[Sequence[int]] = None):
        self._log = io.StringIO()
        self._gt_file = str(gt) if isinstance(gt, (str, os.PathLike)) else None  # named by GT errors
        if isinstance(gt, COCO):
            self.coco_gt = gt
        else:
            if isinstance(gt, (str, os.PathLike)):
                with open(gt) as f:
                    gt = json.load(f)
            if not isinstance(gt, Mapping) or not isinstance(gt.get("images"), list):
                raise ValueError("gt must be a COCO json path, a COCO dict with an 'images' list, or a COCO object")
            self.coco_gt = _silent_coco(_complete_gt(gt), self._log)

        self.iou_types = tuple(iou_types)
        bad = [t for t in self.iou_types if t not in IOU_TYPES]
        if bad or not self.iou_types:
            raise ValueError(f"iou_types must be a non-empty subset of {IOU_TYPES}, got {list(iou_types)}")
        if "segm" in self.iou_types:
            self._check_gt_for_segm()

        known = sorted(self.coco_gt.getCatIds())
        if class_ids is not None:
            class_ids = sorted({int(c) for c in class_ids})
            unknown = [c for c in class_ids if c not in set(known)]
            # An empty list would mean "all categories" to pycocotools, the opposite of what was asked.
            if not class_ids or unknown:
                raise ValueError(f"class_ids {list(class_ids)} must be a non-empty subset of the GT "
                                 f"category ids {known}")
        self.class_ids: List[int] = list(class_ids) if class_ids is not None else known
        # image id -> {iou_type: [COCO result dicts]}; insertion order = order of first update.
        self._images: Dict[int, Dict[str, List[Dict[str, Any]]]] = {}

    def _check_gt_for_segm(self) -> None:
        """DataError (a ValueError) naming the GT file and the image or annotation that cannot be scored for masks:
        at construction, rather than inside pycocotools once every image has been predicted."""
        for img in self.coco_gt.dataset["images"]:
            if img.get("height") is None or img.get("width") is None:
                raise DataError(f"segm evaluation needs image height/width in GT (image id {img.get('id')})",
                                self._gt_file)
        for ann in self.coco_gt.dataset.get("annotations", []):
            where = f"{self._gt_file or 'GT'}: annotation id {ann.get('id')}"
            if not ann.get("segmentation"):
                raise DataError("segm evaluation (masks) needs a segmentation on every GT annotation, this one "
                                "has none", where)
            check_segmentation(ann["segmentation"], where)

    # ---------------------------------------------------------------- accumulate
    def update(self, image_id: int, result: Mapping[str, Any], category_ids: Optional[Sequence[int]]) -> None:
        """Record one image's detections (possibly none). Calling it again for the same image replaces
        that image's detections: DistributedSampler pads ranks with repeated images, and a repeat must
        not count twice."""
        image_id = int(image_id)
        if image_id not in self.coco_gt.imgs:
            raise ValueError(f"image id {image_id} is not in the GT file")
        scores = _to_numpy(result["scores"]).astype(np.float64).reshape(-1)
        labels = _to_numpy(result["labels"]).astype(np.int64).reshape(-1)
        boxes = _to_numpy(result["boxes"]).astype(np.float64).reshape(-1, 4)
        if not len(scores) == len(labels) == len(boxes):
            raise ValueError(f"result has {len(scores)} scores, {len(labels)} labels and {len(boxes)} boxes")
        if category_ids is not None:
            if len(labels) and (labels.min() < 0 or labels.max() >= len(category_ids)):
                raise ValueError(f"labels {labels.tolist()} fall outside the {len(category_ids)} category ids")
            cats = [int(category_ids[i]) for i in labels]
        else:
            cats = [int(i) for i in labels]

        per_type: Dict[str, List[Dict[str, Any]]] = {}
        if "bbox" in self.iou_types:
            per_type["bbox"] = [
                {"image_id": image_id, "category_id": c, "score": float(s),
                 "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)]}
                for s, c, (x1, y1, x2, y2) in zip(scores, cats, boxes)
            ]
        if "segm" in self.iou_types:
            if len(scores) == 0:
                rles = []  # nothing detected: masks may be absent or shaped oddly, and are not needed
            elif "rles" in result:
                rles = list(result["rles"])
            elif "masks" not in result:
                raise ValueError("segm evaluation needs result['masks']")
            else:
                rles = _encode_masks(_to_numpy(result["masks"]))
            if len(rles) != len(scores):
                raise ValueError(f"result has {len(rles)} masks for {len(scores)} detections")
            img = self.coco_gt.imgs[image_id]
            if rles and list(rles[0]["size"]) != [int(img["height"]), int(img["width"])]:
                raise ValueError(f"masks are {rles[0]['size']} but GT image {image_id} is "
                                 f"{img['height']}x{img['width']}; resize masks to the original image first")
            # No "bbox" key: loadRes would then take the box area as the mask's area (wrong area ranges).
            per_type["segm"] = [{"image_id": image_id, "category_id": c, "score": float(s), "segmentation": r}
                                for s, c, r in zip(scores, cats, rles)]
        self._images[image_id] = per_type

    def __len__(self) -> int:
        """Number of images recorded so far."""
        return len(self._images)

    # ---------------------------------------------------------------- distributed
    def state(self) -> Dict[str, Any]:
        """Everything update() recorded, as plain lists/dicts (picklable, json-able) for all_gather."""
        return {
            "version": STATE_VERSION,
            "iou_types": list(self.iou_types),
            "image_ids": list(self._images),
            "results": {t: [d for per in self._images.values() for d in per.get(t, [])] for t in self.iou_types},
        }

    def merge(self, states: Iterable[Mapping[str, Any]]) -> "CocoEvaluator":
        """Fold other evaluators' state() into this one. Images present in several states keep the last
        one's detections, so merging this evaluator's own state (all_gather includes it) is harmless."""
        for st in states:
            if list(st.get("iou_types", [])) != list(self.iou_types):
                raise ValueError(f"cannot merge a state for iou_types {st.get('iou_types')} "
                                 f"into {list(self.iou_types)}")
            incoming: Dict[int, Dict[str, List[Dict[str, Any]]]] = {
                int(i): {t: [] for t in self.iou_types} for i in st["image_ids"]}
            for t in self.iou_types:
                for det in st["results"].get(t, []):
                    incoming[int(det["image_id"])][t].append(det)
            self._images.update(incoming)
        return self

    # ---------------------------------------------------------------- metrics
    def summarize(self) -> Dict[str, Dict[str, Any]]:
        """{iou_type: {12 STAT_NAMES floats, "per_class_AP", "per_class_AP_by_id", "num_images",
        "num_detections", "empty", "report"}}.

        Stats follow COCOeval: -1.0 where no GT exists for a setting. per_class_AP is keyed by category
        name (id as str when a name is missing or shared), per_class_AP_by_id by int id; a class without
        GT in the evaluated images has AP None. "empty" is True when there were no detections at all
        (pycocotools' loadRes cannot load an empty list, so an empty result set is built directly and
        COCOeval scores it: 0 where GT exists). "report" is pycocotools' printed summary (its 12 stat lines)."""
        return {t: self._summarize_type(t) for t in self.iou_types}

    def _summarize_type(self, iou_type: str) -> Dict[str, Any]:
        # loadRes adds keys (id, area, iscrowd, ...) to every dict it gets but never changes nested
        # values, so shallow copies keep our state clean at a fraction of deepcopy's cost.
        dets = [dict(d) for per in self._images.values() for d in per.get(iou_type, [])]
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            if dets:
                coco_dt = self.coco_gt.loadRes(dets)
            else:
                coco_dt = _silent_coco({"images": list(self.coco_gt.dataset["images"]), "annotations": [],
                                        "categories": copy.deepcopy(self.coco_gt.dataset.get("categories", []))},
                                       buf)
            ev = COCOeval(self.coco_gt, coco_dt, iouType=iou_type)
            ev.params.catIds = list(self.class_ids)
            ev.params.imgIds = sorted(self._images)
            if self._images:
                ev.evaluate()
                ev.accumulate()
                ev.summarize()
        if self._images:
            stats = [float(v) for v in ev.stats]
            per_id = self._per_class_ap(ev)
        else:
            # No image at all: getAnnIds([]) would mean "every image" to pycocotools, so don't run it.
            stats = [-1.0] * len(STAT_NAMES)
            per_id = {c: None for c in self.class_ids}
            buf.write("no images were evaluated\n")

        out: Dict[str, Any] = dict(zip(STAT_NAMES, stats))
        out["per_class_AP"] = self._by_name(per_id)
        out["per_class_AP_by_id"] = per_id
        out["num_images"] = len(self._images)
        out["num_detections"] = len(dets)
        out["empty"] = not dets
        # the 12 stat lines; pycocotools' progress lines ("Loading and preparing results...") are not the user's
        out["report"] = "\n".join(line for line in buf.getvalue().splitlines()
                                  if line.lstrip().startswith("Average") or line.startswith("no images"))
        return out

    @staticmethod
    def _per_class_ap(ev: COCOeval) -> Dict[int, Optional[float]]:
        """AP per category from precision[T, R, K, A, M]: all IoUs 0.50:0.95, area "all", the last
        maxDets (100); -1 marks "no GT" and is left out, and a class that is all -1 has AP None."""
        precision = ev.eval["precision"]
        area = ev.params.areaRngLbl.index("all")
        out: Dict[int, Optional[float]] = {}
        for k, cat_id in enumerate(ev.params.catIds):
            p = precision[:, :, k, area, -1]
            p = p[p > -1]
            out[int(cat_id)] = float(p.mean()) if p.size else None
        return out

    def _by_name(self, per_id: Mapping[int, Optional[float]]) -> Dict[str, Optional[float]]:
        names = {cid: self.coco_gt.cats.get(cid, {}).get("name") for cid in per_id}
        counts: Dict[Any, int] = {}
        for n in names.values():
            counts[n] = counts.get(n, 0) + 1
        # A missing or duplicated name would lose or merge classes; fall back to the id there.
        return {(str(names[c]) if names[c] is not None and counts[names[c]] == 1 else str(c)): ap
                for c, ap in per_id.items()}


def write_results_json(path: str, metrics: Mapping[str, Any], extra: Optional[Mapping[str, Any]] = None) -> str:
    """Write {"metrics": metrics, **extra} as json atomically (temp file + os.replace); returns the path.

    `path` is the file, or an existing folder to write results.json into. nan/inf become null and numpy
    scalars plain numbers; int dict keys (per_class_AP_by_id) become strings, as json requires. A URI recorded
    (the checkpoint evaluated) loses its user info and query string (credentials, signatures)."""
    if os.path.isdir(path):
        path = os.path.join(path, "results.json")
    payload: Dict[str, Any] = dict(extra or {})
    if "metrics" in payload:
        raise ValueError("extra must not have a 'metrics' key")
    payload["metrics"] = metrics
    text = redact(json.dumps(_nan_to_none(payload), indent=2, allow_nan=False))
    return atomic_write_text(path, text)
