"""MAL's unit of data: one box of a COCO json (MAL segments one object per crop).

The json is read by the shared COCO reader (`data.coco.read_coco_file`), so MAL gets Grounding DINO's
checks and error sentences (duplicate categories, images missing from the source, malformed boxes and
segmentations, boxes clamped into the image). On top of it MAL leaves out what it cannot segment: every
annotation either becomes an instance or is listed in `skipped` with its reason (the reader's: image missing,
zero-area box, box outside the image; MAL's: crowd, under 1 pixel, under `min_obj_size` / over
`max_obj_size`), so training counts what it left out and inference can write those boxes back untouched."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from groundlab.data.coco import read_coco_file
from groundlab.data.image_source import ImageSource
from groundlab.data.record_index import RecordIndex
from groundlab.errors import DataError

log = logging.getLogger(__name__)


@dataclass
class MALInstances:
    """instances: RecordIndex of dicts with keys file_name, image_id, height, width, ann_id, ann_index
    (position in the json's annotations), box
    ([x1, y1, x2, y2] clamped into the image), area (the box's, original pixels), label (contiguous
    class index), category_id, segmentation (COCO polygons/RLE or None), in json order.
    skipped: [{"ann_id", "ann_index", "image_id", "reason"}] in json order. data: the parsed json
    (inference writes it back)."""

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
    coco = read_coco_file(json_file, source, skip_missing, use_masks=True, partial_masks=True,
                          keep_data=keep_data)
    out = MALInstances(json_file, RecordIndex.build([]), coco.class_names, coco.category_ids,
                       skipped=list(coco.dropped), data=coco.data)
    used: List[Dict[str, Any]] = []
    for rec in coco.records:
        ih, iw = rec["height"], rec["width"]
        if rec["boxes"] and (ih is None or iw is None):
            # crops are cut from the json's image size, and boxes must be clamped into it
            raise DataError(f"image {rec['file_name']!r} needs 'height' and 'width'", rec["where"])
        masks = rec["masks"] or [None] * len(rec["boxes"])
        for j, box in enumerate(rec["boxes"]):
            ann_id, ann_index = rec["ann_ids"][j], rec["ann_indices"][j]

            def skip(reason: str) -> None:
                out.skipped.append({"ann_id": ann_id, "ann_index": ann_index, "image_id": rec["image_id"],
                                    "reason": reason})

            if rec["iscrowd"][j]:
                skip("crowd annotation")
                continue
            if box[2] - box[0] < 1 or box[3] - box[1] < 1:
                # under a pixel inside the image: no crop to segment (the reader keeps it, a detector may not care)
                skip("box under 1 pixel inside the image")
                continue
            out.clamped += rec["clamped"][j]
            area = (box[2] - box[0]) * (box[3] - box[1])
            if area < min_obj_size:
                skip(f"box area under dataset.min_obj_size={min_obj_size:g}")
                continue
            if area > max_obj_size:
                skip(f"box area over dataset.max_obj_size={max_obj_size:g}")
                continue
            if need_masks and masks[j] is None:
                raise DataError("evaluating MAL needs a 'segmentation' on every box (this json has boxes only); "
                                "evaluate on a COCO json with masks", f"{json_file}: annotation id {ann_id}")
            used.append({"file_name": rec["file_name"], "image_id": rec["image_id"], "height": ih, "width": iw,
                         "ann_id": ann_id, "ann_index": ann_index, "box": box, "area": float(area),
                         "label": rec["labels"][j], "category_id": coco.category_ids[rec["labels"][j]],
                         "segmentation": masks[j]})
    used.sort(key=lambda r: r["ann_index"])  # json order, as MAL has always listed them
    out.skipped.sort(key=lambda s: s["ann_index"])
    out.instances = RecordIndex.build(used)
    (log.warning if out.skipped or out.clamped else log.info)(out.summary())
    return out
