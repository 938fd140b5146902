"""MAL's unit of data: one box of a COCO json (MAL segments one object per crop).

Every annotation either becomes an instance or is listed in `skipped` with its reason (zero-area box,
box outside the image, under `min_obj_size` / over `max_obj_size`, crowd, image missing), so training
counts what it left out and inference can write those boxes back untouched and say so."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from groundlab.data.box_checks import parse_box
from groundlab.data.coco import load_coco_json
from groundlab.errors import DataError
from groundlab.data.image_source import ImageSource
from groundlab.ops.masks import check_segmentation
from groundlab.data.record_index import RecordIndex

log = logging.getLogger(__name__)


@dataclass
class MALInstances:
    """instances: RecordIndex of dicts with keys file_name, image_id, height, width, ann_id, ann_index
    (position in the json's annotations), box
    ([x1, y1, x2, y2] clamped into the image), area (the box's, original pixels), label (contiguous
    class index), category_id, segmentation (COCO polygons/RLE or None).
    skipped: [{"ann_id", "ann_index", "image_id", "reason"}]. data: the parsed json (inference writes it back)."""

    json_file: str
    instances: RecordIndex
    class_names: List[str]
    category_ids: List[int]
    skipped: List[Dict[str, Any]] = field(default_factory=list)
    clamped: int = 0
    data: Optional[Dict[str, Any]] = None

    def summary(self) -> str:
        reasons: Dict[str, int] = {}
        for s in self.skipped:
            reasons[s["reason"]] = reasons.get(s["reason"], 0) + 1
        parts = [f"{self.json_file}: {len(self.instances)} boxes used"]
        if self.clamped:
            parts.append(f"{self.clamped} clamped to the image")
        parts += [f"{n} skipped: {r}" for r, n in sorted(reasons.items())]
        return "; ".join(parts)


def read_mal_instances(json_file: str, source: Optional[ImageSource] = None, min_obj_size: float = 0.0,
                       max_obj_size: float = float("inf"), need_masks: bool = False, skip_missing: bool = False,
                       keep_data: bool = False) -> MALInstances:
    """Read `json_file` (see MALInstances). `need_masks`: every used box must carry a segmentation
    (evaluation), else DataError naming the file. A missing image is a DataError unless `skip_missing`."""
    data = load_coco_json(json_file)
    cats = sorted(data["categories"], key=lambda c: c["id"])
    category_ids = [int(c["id"]) for c in cats]
    cat_to_idx = {cid: i for i, cid in enumerate(category_ids)}
    images: Dict[Any, Dict[str, Any]] = {}
    for img in data["images"]:
        if "id" not in img or "file_name" not in img:
            raise DataError(f"image entry needs 'id' and 'file_name': {str(img)[:120]}", json_file)
        images[img["id"]] = img
    out = MALInstances(json_file, RecordIndex.build([]), [str(c.get("name", c["id"])) for c in cats], category_ids)
    present: Dict[Any, bool] = {}
    records: List[Dict[str, Any]] = []
    for ann_index, ann in enumerate(data.get("annotations", [])):
        where = f"{json_file}: annotation id {ann.get('id')}"
        img = images.get(ann.get("image_id"))
        if img is None:
            raise DataError(f"image_id {ann.get('image_id')!r} is not in 'images'", where)
        if ann.get("category_id") not in cat_to_idx:
            raise DataError(f"category_id {ann.get('category_id')!r} is not in 'categories'", where)

        def skip(reason: str) -> None:
            out.skipped.append({"ann_id": ann.get("id"), "ann_index": ann_index, "image_id": ann.get("image_id"),
                                "reason": reason})

        if source is not None:
            if img["id"] not in present:
                present[img["id"]] = source.exists(img["file_name"])
            if not present[img["id"]]:
                if not skip_missing:
                    raise DataError(f"image {img['file_name']!r} not found in {source.path} "
                                    f"(set dataset.skip_missing_images=true to skip its boxes)", where)
                skip("image missing")
                continue
        if int(ann.get("iscrowd", 0)):
            skip("crowd annotation")
            continue
        x, y, w, h = parse_box(ann.get("bbox"), where)
        if w <= 0 or h <= 0:
            skip("zero-area box")
            continue
        box = [x, y, x + w, y + h]
        ih, iw = img.get("height"), img.get("width")
        if ih is None or iw is None:
            raise DataError(f"image {img['file_name']!r} needs 'height' and 'width'", where)
        clamped = [min(max(box[0], 0.0), iw), min(max(box[1], 0.0), ih), min(max(box[2], 0.0), iw),
                   min(max(box[3], 0.0), ih)]
        if clamped[2] - clamped[0] < 1 or clamped[3] - clamped[1] < 1:
            skip("box outside the image")
            continue
        out.clamped += clamped != box
        area = (clamped[2] - clamped[0]) * (clamped[3] - clamped[1])
        if area < min_obj_size:
            skip(f"box area under dataset.min_obj_size={min_obj_size:g}")
            continue
        if area > max_obj_size:
            skip(f"box area over dataset.max_obj_size={max_obj_size:g}")
            continue
        seg = ann.get("segmentation")
        if seg is not None and seg != []:
            check_segmentation(seg, where)
        else:
            seg = None
        if need_masks and seg is None:
            raise DataError("evaluating MAL needs a 'segmentation' on every box (this json has boxes only); "
                            "evaluate on a COCO json with masks", where)
        records.append({"file_name": img["file_name"], "image_id": img["id"], "height": int(ih), "width": int(iw),
                        "ann_id": ann.get("id"), "ann_index": ann_index, "box": clamped, "area": float(area),
                        "label": cat_to_idx[ann["category_id"]], "category_id": int(ann["category_id"]),
                        "segmentation": seg})
    out.instances = RecordIndex.build(records)
    out.data = data if keep_data else None
    (log.warning if out.skipped or out.clamped else log.info)(out.summary())
    return out
