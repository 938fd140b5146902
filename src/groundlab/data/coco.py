"""COCO json reader, the one for every model: Grounding DINO / Mask Grounding DINO data (training,
validation, test) and MAL's boxes (`mal_instances` builds its per-box list from these records).

Category ids may be anything (1, 5, 90): they are remapped to contiguous class indices inside, in
ascending id order, and `category_ids[idx]` maps every output back. Two categories may not share an id
or a name (a text prompt could not tell them apart). `segmentation` is optional (polygons or RLE; `[]`,
which box-only exporters write, counts as none). Crowd annotations are kept and flagged (`iscrowd`), so
training can skip them and evaluation can pass them to COCOeval. Every annotation left out at read time
(image missing, zero-area box, box outside the image) is listed with its reason in `CocoFile.dropped`.
Images whose width/height are their stored size while EXIF would turn them are read as stored, and the
log says so once (`exif_orientation`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from groundlab.data.box_checks import clean_box, parse_box
from groundlab.data.exif_orientation import OrientationCheck
from groundlab.data.image_source import ImageSource
from groundlab.data.json_files import load_json
from groundlab.data.read_stats import ReadStats
from groundlab.data.record_index import RecordIndex
from groundlab.errors import DataError
from groundlab.ops.masks import check_segmentation

# Why an annotation was left out at read time (CocoFile.dropped[i]["reason"]).
IMAGE_MISSING = "image missing"
ZERO_AREA = "zero-area box"
OUTSIDE = "box outside the image"


@dataclass
class CocoFile:
    """A read COCO json.

    records: RecordIndex, one dict per image (keys in `read_coco_file`). class_names[i] / category_ids[i]:
    the name and COCO id of class index i. stats: what was clamped/dropped/skipped (logged once).
    dropped: one dict per annotation left out, {"ann_id", "ann_index" (position in the json's
    'annotations'), "image_id", "reason"} in json order. data: the parsed json (only with keep_data)."""

    json_file: str
    records: RecordIndex
    class_names: List[str]
    category_ids: List[int]
    stats: ReadStats
    dropped: List[Dict[str, Any]] = field(default_factory=list)
    data: Optional[Dict[str, Any]] = None


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


def read_categories(data: Dict[str, Any], json_file: str) -> Tuple[List[str], List[int]]:
    """(class names, category ids), in ascending id order. Ids and names must be unique: names are
    compared ignoring case and surrounding spaces, as an uncased text encoder sees them."""
    for c in data["categories"]:
        if not isinstance(c, dict) or "id" not in c:
            raise DataError(f"category entry needs an 'id': {str(c)[:120]}", json_file)
    cats = sorted(data["categories"], key=lambda c: c["id"])
    category_ids = [int(c["id"]) for c in cats]
    names = [str(c.get("name", c["id"])) for c in cats]
    if len(set(category_ids)) != len(category_ids):
        raise DataError("duplicate category ids in 'categories'", json_file)
    seen: Dict[str, Tuple[int, str]] = {}
    for cid, name in zip(category_ids, names):
        key = name.strip().casefold()
        if key in seen:
            first, first_name = seen[key]
            raise DataError(f"categories {first} ({first_name!r}) and {cid} ({name!r}) have the same name: a text "
                            "prompt cannot tell them apart; rename one or merge them", json_file)
        seen[key] = (cid, name)
    return names, category_ids


def read_coco_file(
    json_file: str, source: Optional[ImageSource] = None, skip_missing: bool = False, use_masks: bool = True,
    partial_masks: bool = False, keep_data: bool = False,
) -> CocoFile:
    """Read and check `json_file` (see CocoFile); images are looked up in `source` when given.

    Record keys: kind "detection", file_name, height, width (None if the json lacks them), image_id (the
    COCO id), where, and per kept box: boxes [[x1, y1, x2, y2]] pixels clamped into the image, labels
    (class indices), iscrowd [0/1], areas, ann_ids, ann_indices (positions in 'annotations'), clamped
    [bool], masks (segmentations; None when `use_masks` is off or, unless `partial_masks`, when any box
    lacks one; with `partial_masks` a list holding None for boxes without one), num_masks (how many kept boxes
    have a segmentation, even when `masks` is None for lacking some: `data.mask_checks` names such records).
    A missing image is a DataError unless `skip_missing` (then its annotations are dropped and listed).
    A malformed bbox or segmentation, or an RLE whose size is not the image's height/width, is a DataError
    naming the annotation, wherever it would go."""
    data = load_coco_json(json_file)
    names, category_ids = read_categories(data, json_file)
    cat_to_idx = {cid: i for i, cid in enumerate(category_ids)}

    images: Dict[int, Dict[str, Any]] = {}
    for img in data["images"]:
        if not isinstance(img, dict) or "id" not in img or "file_name" not in img:
            raise DataError(f"image entry needs 'id' and 'file_name': {str(img)[:120]}", json_file)
        images[int(img["id"])] = img
    anns_by_image: Dict[int, List[Tuple[int, Dict[str, Any]]]] = {i: [] for i in images}
    for ann_index, ann in enumerate(data.get("annotations", [])):
        where = f"{json_file}: annotation id {ann.get('id')}"
        if ann.get("image_id") not in anns_by_image:
            raise DataError(f"image_id {ann.get('image_id')!r} is not in 'images'", where)
        if ann.get("category_id") not in cat_to_idx:
            raise DataError(f"category_id {ann.get('category_id')!r} is not in 'categories'", where)
        anns_by_image[ann["image_id"]].append((ann_index, ann))

    out = CocoFile(json_file, RecordIndex.build([]), names, category_ids, ReadStats(json_file),
                   data=data if keep_data else None)
    orientation = OrientationCheck(json_file, source)

    def drop(ann_index: int, ann: Dict[str, Any], reason: str) -> None:
        out.dropped.append({"ann_id": ann.get("id"), "ann_index": ann_index, "image_id": ann.get("image_id"),
                            "reason": reason})

    def records():
        for image_id, img in images.items():
            where_img = f"{json_file}: image id {image_id} ({img['file_name']})"
            if source is not None and not source.exists(img["file_name"]):
                if not skip_missing:
                    raise DataError(
                        f"image {img['file_name']!r} not found in {source.path} "
                        f"(set dataset.skip_missing_images=true to skip)", where_img,
                    )
                out.stats.add("missing images skipped", where_img)
                for ann_index, ann in anns_by_image[image_id]:
                    drop(ann_index, ann, IMAGE_MISSING)
                continue
            h, w = img.get("height"), img.get("width")
            h, w = (int(h) if h is not None else None), (int(w) if w is not None else None)
            orientation.check(img["file_name"], h, w)  # only to tell it once: decode_rgb applies the rule
            rec = {"kind": "detection", "file_name": img["file_name"], "height": h, "width": w,
                   "image_id": image_id, "where": where_img, "boxes": [], "labels": [], "iscrowd": [],
                   "areas": [], "ann_ids": [], "ann_indices": [], "clamped": [], "masks": []}
            for ann_index, ann in anns_by_image[image_id]:
                where = f"{json_file}: annotation id {ann.get('id')}"
                x, y, bw, bh = parse_box(ann.get("bbox"), where)
                raw = [x, y, x + bw, y + bh]
                box = clean_box(raw, h, w, where, out.stats)
                seg = ann.get("segmentation") if use_masks else None
                if seg is not None and seg != []:
                    check_segmentation(seg, f"{where_img}, annotation id {ann.get('id')}", (h, w))
                else:
                    seg = None
                if box is None:
                    drop(ann_index, ann, ZERO_AREA if bw <= 0 or bh <= 0 else OUTSIDE)
                    continue
                rec["boxes"].append(box)
                rec["labels"].append(cat_to_idx[ann["category_id"]])
                rec["iscrowd"].append(int(ann.get("iscrowd", 0)))
                rec["areas"].append(float(ann.get("area", (box[2] - box[0]) * (box[3] - box[1]))))
                rec["ann_ids"].append(ann.get("id"))
                rec["ann_indices"].append(ann_index)
                rec["clamped"].append(box != raw)
                rec["masks"].append(seg)
            rec["num_masks"] = sum(m is not None for m in rec["masks"])
            if not use_masks or not rec["masks"] or (not partial_masks and any(m is None for m in rec["masks"])):
                rec["masks"] = None
            out.stats.records += 1
            out.stats.boxes += len(rec["boxes"])
            yield rec

    out.records = RecordIndex.build(records())
    out.dropped.sort(key=lambda d: d["ann_index"])
    out.stats.log()
    orientation.log()
    return out


def read_coco(
    json_file: str, source: Optional[ImageSource] = None, skip_missing: bool = False, use_masks: bool = True
) -> Tuple[RecordIndex, List[str], List[int], ReadStats]:
    """(records, class names, category_ids, stats) of `read_coco_file`; class index i is COCO category
    id category_ids[i]."""
    f = read_coco_file(json_file, source, skip_missing, use_masks)
    return f.records, f.class_names, f.category_ids, f.stats
