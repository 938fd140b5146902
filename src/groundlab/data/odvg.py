"""ODVG jsonl reader (TAO and Open-GroundingDino layout).

One image per line; the image key is `file_name` (TAO) or `filename` (Open-GroundingDino).
- detection: {"detection": {"instances": [{"bbox": [x1, y1, x2, y2], "label": 3, "category": "cat",
  "mask": <COCO polygons or RLE, optional>}]}} with a label map file {"0": "person", ...}.
- grounding: {"grounding": {"caption": "...", "regions": [{"bbox": [...], "phrase": "a dog",
  "tokens_positive": [[start, end]] (optional), "mask": <optional>}]}}.
- referring (VG, TAO's mask_grounding_dino): a grounding record with one referring expression,
  {"grounding": {"expression": "the largest red shape" (or "caption"), "regions": [{"bbox": [...],
  "mask": <COCO polygons or RLE>, "tokens_positive": [[4, 21]], "phrase": <optional>}], "empty": false}}:
  the regions are every object the expression refers to. A region's phrase defaults to the text of its first
  tokens_positive span, else the whole expression. "empty": true (under "grounding" or at the line's top
  level) marks an expression that refers to nothing, and then the line has no regions (a referring line
  without regions and without "empty" is read as empty too).
Records are streamed into a RecordIndex; errors name `file:line`. A line's height/width, when given, are
the size its boxes were drawn on (see `exif_orientation` for photos whose EXIF would turn them).
"""

from __future__ import annotations

import json
from typing import Any, Dict, Iterator, List, Optional, Tuple

from groundlab.data.box_checks import clean_box, parse_box
from groundlab.data.exif_orientation import OrientationCheck
from groundlab.errors import DataError
from groundlab.data.image_source import ImageSource
from groundlab.data.json_files import iter_jsonl, load_json
from groundlab.ops.masks import check_segmentation
from groundlab.data.read_stats import ReadStats
from groundlab.data.record_index import RecordIndex


def read_label_map(path: str) -> Tuple[List[str], Dict[int, int]]:
    """(class names ordered by label id, {label id: class index}) from {"0": "name", ...}."""
    raw = load_json(path, "label map file")
    if not isinstance(raw, dict) or not raw:
        raise DataError('label map must be a non-empty object {"0": "name", ...}', path)
    try:
        items = sorted((int(k), str(v)) for k, v in raw.items())
    except ValueError:
        raise DataError("label map keys must be integer ids", path) from None
    return [name for _, name in items], {label: idx for idx, (label, _) in enumerate(items)}


def _image_fields(obj: Dict[str, Any], where: str) -> Tuple[str, Optional[int], Optional[int]]:
    name = obj.get("file_name", obj.get("filename"))
    if not isinstance(name, str) or not name:
        raise DataError("record has neither 'file_name' nor 'filename'", where)
    h, w = obj.get("height"), obj.get("width")
    return name, (int(h) if h is not None else None), (int(w) if w is not None else None)


def _masks_complete(masks: List[Any], where: str, stats: ReadStats) -> bool:
    """True when every instance has a mask; a partial set is counted, since it cannot train a mask head."""
    present = sum(m is not None for m in masks)
    if 0 < present < len(masks):
        stats.add("records with masks on only some instances (masks not used)", where)
    return bool(masks) and present == len(masks)


def _count(masks: List[Any]) -> int:
    return sum(m is not None for m in masks)


def _detection(obj, label_to_idx, h, w, where, stats) -> Dict[str, Any]:
    if label_to_idx is None:
        raise DataError("detection records need a label map (data source key 'label_map')", where)
    boxes, labels, masks = [], [], []
    instances = obj["detection"].get("instances", []) or []
    for k, inst in enumerate(instances):
        box = clean_box(parse_box(inst.get("bbox"), where), h, w, where, stats)
        label = inst.get("label")
        if not isinstance(label, int) or label not in label_to_idx:
            raise DataError(f"label {label!r} is not in the label map", where)
        mask = inst.get("mask")
        if mask is not None:
            check_segmentation(mask, f"{where} (instance {k})", (h, w))
        if box is None:
            continue
        boxes.append(box)
        labels.append(label_to_idx[label])
        masks.append(mask)
    has_masks = _masks_complete(masks, where, stats)
    return {"kind": "detection", "boxes": boxes, "labels": labels, "masks": masks if has_masks else None,
            "num_masks": _count(masks)}


def _empty_flag(obj: Dict[str, Any], g: Dict[str, Any], where: str) -> Optional[bool]:
    """The line's `empty` (at grounding.empty or the top level), or None when it says nothing."""
    value = g.get("empty", obj.get("empty"))
    if value is not None and not isinstance(value, bool):
        raise DataError(f"'empty' must be true or false, not {value!r}", where)
    return value


def _region_phrase(region: Dict[str, Any], text: str, referring: bool, k: int, where: str):
    """(phrase, tokens_positive) of a region. A referring region may leave out its phrase: it is the text of its
    first tokens_positive span, or the whole expression (then spanning all of it)."""
    phrase, tp = region.get("phrase"), region.get("tokens_positive")
    if isinstance(phrase, str) and phrase.strip():
        return phrase, tp
    if not referring:
        raise DataError("grounding region needs a non-empty 'phrase'", where)
    if not tp:
        return text, [[0, len(text)]]
    try:
        start, end = (int(v) for v in tp[0])
    except (TypeError, ValueError):
        raise DataError(f"region {k}: tokens_positive must be [[start, end], ...], not {tp!r}", where) from None
    if not 0 <= start < end <= len(text):
        raise DataError(f"region {k}: tokens_positive span [{start}, {end}] is outside the expression "
                        f"({len(text)} characters)", where)
    return text[start:end], tp


def _grounding(obj, h, w, where, stats, referring: bool = False) -> Dict[str, Any]:
    g = obj["grounding"]
    empty = _empty_flag(obj, g, where)
    # a referring (VG) line: named so by its source, or by its own "expression" or "empty" key
    referring = referring or "expression" in g or empty is not None
    text = g.get("expression", g.get("caption")) if referring else g.get("caption")
    if not isinstance(text, str) or not text.strip():
        raise DataError("referring record needs a non-empty 'expression' (or 'caption')" if referring else
                        "grounding record needs a non-empty 'caption'", where)
    regions = g.get("regions", []) or []
    if empty and regions:
        raise DataError(f"the line says empty: true (an expression that refers to nothing) but has "
                        f"{len(regions)} region(s)", where)
    if empty is False and not regions and referring:
        raise DataError("the line says empty: false but has no regions (an expression that refers to nothing "
                        "says empty: true)", where)
    phrases: List[str] = []
    spans: List[Optional[List[List[int]]]] = []
    key_to_id: Dict[Tuple, int] = {}
    boxes, labels, masks = [], [], []
    for k, region in enumerate(regions):
        phrase, tp = _region_phrase(region, text, referring, k, where)
        key = (phrase, json.dumps(tp))
        if key not in key_to_id:
            key_to_id[key] = len(phrases)
            phrases.append(phrase)
            spans.append(tp)
        box = clean_box(parse_box(region.get("bbox"), where), h, w, where, stats)
        if region.get("mask") is not None:
            check_segmentation(region["mask"], f"{where} (region {k})", (h, w))
        if box is None:
            continue
        boxes.append(box)
        labels.append(key_to_id[key])
        masks.append(region.get("mask"))
    has_masks = _masks_complete(masks, where, stats)
    return {"kind": "grounding", "boxes": boxes, "labels": labels, "masks": masks if has_masks else None,
            "num_masks": _count(masks), "caption": text, "phrases": phrases, "spans": spans,
            "referring": referring, "empty": referring and not regions, "expression": text if referring else None}


def iter_odvg(
    json_file: str, label_to_idx: Optional[Dict[int, int]], source: Optional[ImageSource],
    skip_missing: bool, stats: ReadStats, orientation: Optional[OrientationCheck] = None, data_type: str = "OD",
) -> Iterator[Dict[str, Any]]:
    """Parse and validate each line into a record dict (see read_odvg); `orientation` notes the images
    read as stored (EXIF not applied) because the line's height/width are their stored size."""
    for lineno, where, obj in iter_jsonl(json_file):
        name, h, w = _image_fields(obj, where)
        if source is not None and not source.exists(name):
            if not skip_missing:
                raise DataError(
                    f"image {name!r} not found in {source.path} (set dataset.skip_missing_images=true to skip)",
                    where,
                )
            stats.add("missing images skipped", where)
            continue
        if orientation is not None:
            orientation.check(name, h, w)
        if "detection" in obj:
            if data_type == "VG":
                raise DataError("a data_type=VG source holds referring expressions ('grounding' records with an "
                                "'expression'), not 'detection' records", where)
            rec = _detection(obj, label_to_idx, h, w, where, stats)
        elif "grounding" in obj:
            rec = _grounding(obj, h, w, where, stats, referring=data_type == "VG")
        else:
            raise DataError("record has neither 'detection' nor 'grounding'", where)
        rec.update({"file_name": name, "height": h, "width": w, "image_id": lineno, "where": where})
        stats.records += 1
        stats.boxes += len(rec["boxes"])
        yield rec


def read_odvg(
    json_file: str, label_map: Optional[str] = None, source: Optional[ImageSource] = None,
    skip_missing: bool = False, data_type: str = "OD",
) -> Tuple[RecordIndex, List[str], ReadStats]:
    """(records, class names from the label map (empty without one), read stats).

    Record keys: kind ("detection"|"grounding"), file_name, height, width (None if absent), image_id
    (the line number), where ("file:line"), boxes [[x1, y1, x2, y2]] pixels, labels (class index for
    detection, phrase index for grounding), masks (list of segmentations, or None unless every box has one),
    num_masks (how many boxes have one: `data.mask_checks` names records with only some); grounding records
    add caption, phrases, spans (per phrase: [[start, end], ...] or None), referring (bool), empty (bool: a
    referring expression that refers to nothing) and expression (the caption of a referring record, else None).
    An RLE mask whose size is not the line's height/width (when given) is a DataError naming the line and instance.

    data_type="VG": every line must be a grounding record, read as a referring expression (see the module
    docstring); with "OD" a grounding line is referring when it has an "expression" or "empty" key."""
    names, label_to_idx = read_label_map(label_map) if label_map else ([], None)
    stats = ReadStats(json_file)
    orientation = OrientationCheck(json_file, source)
    index = RecordIndex.build(iter_odvg(json_file, label_to_idx, source, skip_missing, stats, orientation,
                                        data_type))
    stats.log()
    orientation.log()
    return index, names, stats
