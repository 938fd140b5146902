"""COCO json reader (validation/test data, COCO-format training data, MAL's box-only data).

Category ids may be anything (1, 5, 90): they are remapped to contiguous class indices inside, in
ascending id order, and `category_ids[idx]` maps every output back. `segmentation` is optional
(polygons or RLE). Crowd annotations are kept and flagged (`iscrowd`), so training can skip them and
evaluation can pass them to COCOeval.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

from groundlab.data.box_checks import clean_box, parse_box
from groundlab.errors import DataError
from groundlab.data.image_source import ImageSource
from groundlab.data.json_files import load_json
from groundlab.ops.masks import check_segmentation
from groundlab.data.read_stats import ReadStats
from groundlab.data.record_index import RecordIndex


def load_coco_json(json_file: str) -> Dict[str, Any]:
    """The parsed json, with `images`, `annotations` and `categories` checked to be lists."""
    data = load_json(json_file)
    if not isinstance(data, dict):
        raise DataError("a COCO file must hold one JSON object", json_file)
    for key in ("images", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(f"COCO file needs a list '{key}'", json_file)
    if not isinstance(data.get("annotations", []), list):
        raise DataError("COCO 'annotations' must be a list", json_file)
    return data


def read_coco(
    json_file: str, source: Optional[ImageSource] = None, skip_missing: bool = False, use_masks: bool = True
) -> Tuple[RecordIndex, List[str], List[int], ReadStats]:
    """(records, class names, category_ids, stats); class index i is COCO category id category_ids[i].

    Record keys: kind "detection", file_name, height, width, image_id (the COCO id), where,
    boxes [[x1, y1, x2, y2]] pixels, labels (class indices), iscrowd [0/1], areas, ann_ids,
    masks (segmentations, or None when `use_masks` is off or any annotation lacks one)."""
    data = load_coco_json(json_file)
    cats = sorted(data["categories"], key=lambda c: c["id"])
    category_ids = [int(c["id"]) for c in cats]
    names = [str(c.get("name", c["id"])) for c in cats]
    cat_to_idx = {cid: i for i, cid in enumerate(category_ids)}
    if len(cat_to_idx) != len(cats):
        raise DataError("duplicate category ids in 'categories'", json_file)

    images: Dict[int, Dict[str, Any]] = {}
    for img in data["images"]:
        if "id" not in img or "file_name" not in img:
            raise DataError(f"image entry needs 'id' and 'file_name': {str(img)[:120]}", json_file)
        images[int(img["id"])] = img
    anns_by_image: Dict[int, List[Dict[str, Any]]] = {i: [] for i in images}
    for ann in data.get("annotations", []):
        where = f"{json_file}: annotation id {ann.get('id')}"
        if ann.get("image_id") not in anns_by_image:
            raise DataError(f"image_id {ann.get('image_id')!r} is not in 'images'", where)
        if ann.get("category_id") not in cat_to_idx:
            raise DataError(f"category_id {ann.get('category_id')!r} is not in 'categories'", where)
        anns_by_image[ann["image_id"]].append(ann)

    stats = ReadStats(json_file)

    def records():
        for image_id, img in images.items():
            where_img = f"{json_file}: image id {image_id} ({img['file_name']})"
            if source is not None and not source.exists(img["file_name"]):
                if not skip_missing:
                    raise DataError(
                        f"image {img['file_name']!r} not found in {source.path} "
                        f"(set dataset.skip_missing_images=true to skip)", where_img,
                    )
                stats.add("missing images skipped", where_img)
                continue
            h, w = img.get("height"), img.get("width")
            h, w = (int(h) if h is not None else None), (int(w) if w is not None else None)
            rec = {"kind": "detection", "file_name": img["file_name"], "height": h, "width": w,
                   "image_id": image_id, "where": where_img, "boxes": [], "labels": [], "iscrowd": [],
                   "areas": [], "ann_ids": [], "masks": []}
            for ann in anns_by_image[image_id]:
                where = f"{json_file}: annotation id {ann.get('id')}"
                x, y, bw, bh = parse_box(ann.get("bbox"), where)
                box = clean_box([x, y, x + bw, y + bh], h, w, where, stats)
                seg = ann.get("segmentation") if use_masks else None
                if seg is not None:
                    check_segmentation(seg, where)
                if box is None:
                    continue
                rec["boxes"].append(box)
                rec["labels"].append(cat_to_idx[ann["category_id"]])
                rec["iscrowd"].append(int(ann.get("iscrowd", 0)))
                rec["areas"].append(float(ann.get("area", (box[2] - box[0]) * (box[3] - box[1]))))
                rec["ann_ids"].append(ann.get("id"))
                rec["masks"].append(seg)
            if not rec["masks"] or any(m is None for m in rec["masks"]):
                rec["masks"] = None
            stats.records += 1
            stats.boxes += len(rec["boxes"])
            yield rec

    index = RecordIndex.build(records())
    stats.log()
    return index, names, category_ids, stats
