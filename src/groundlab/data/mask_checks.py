"""What Mask Grounding DINO asks of its data, checked when the datasets are built, before the first step.

A record that lacks a mask would otherwise fail only when its sample is loaded, possibly hours into training, and
a validation file without segmentations only when COCO's segm evaluation starts. Both are scanned here in full
(every record; the json's every annotation) so the run fails at once with one sentence naming the file and the
first offending record, and how many others share the problem.

Records are the readers' dicts (`data.coco`, `data.odvg`): "boxes", "masks" (None unless every box has one),
"num_masks" (boxes with a mask), "where" (file:line or file: image id).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

from groundlab.data.coco import load_coco_json
from groundlab.data.grounding_dataset import AnnotatedSource
from groundlab.errors import DataError


def _masked(rec: Dict) -> int:
    """How many of the record's boxes carry a mask."""
    return len(rec["boxes"]) if rec["masks"] is not None else int(rec.get("num_masks") or 0)


def check_masks_on_every_box(sources: Sequence[AnnotatedSource], key: str) -> None:
    """Every record with boxes, in every source, has a mask on each box; records without boxes (images without
    objects) need none. `key` is the config key of the sources (e.g. "dataset.train_data_sources").

    A source with boxes and not a single mask is named as such (the wrong file, or a box-only export); otherwise
    the first record with missing masks is named, with the count of the others. DataError either way."""
    maskless: List[str] = []
    first: Optional[Tuple[Dict, int]] = None  # (record, boxes with a mask)
    others: Dict[str, int] = {}  # source name -> records lacking masks, besides the first
    for source in sources:
        boxed = masked_any = False
        for rec in source.records:
            n = len(rec["boxes"])
            if not n:
                continue
            boxed = True
            k = _masked(rec)
            masked_any = masked_any or k > 0
            if k < n:
                if first is None:
                    first = (rec, k)
                else:
                    others[source.name] = others.get(source.name, 0) + 1
        if boxed and not masked_any:
            maskless.append(source.name)
    if maskless:
        raise DataError(f"model=mask_gdino trains a mask head, but {maskless} carry no instance masks "
                        f"({key}: give every box a COCO polygon or RLE mask, or train model=gdino)")
    if first is None:
        return
    rec, k = first
    n = len(rec["boxes"])
    if k:
        has = f"masks on only {k} of its {n} boxes"
    else:
        has = f"no mask on any of its {n} boxes" if n > 1 else "no mask on its box"
    count = sum(others.values())
    if count:
        spread = ", ".join(f"{c} in {name}" for name, c in others.items())
        records = f"1 other record of {key} lacks" if count == 1 else f"{count} other records of {key} lack"
        tail = f", and {records} masks too ({spread})"
    else:
        tail = f", the only record of {key} that lacks one"
    raise DataError(f"model=mask_gdino needs a mask on every box, but this record has {has}{tail}", rec["where"])


def check_segm_ground_truth(json_file: str) -> None:
    """A COCO json that COCO segm evaluation can score (`eval.coco_eval.CocoEvaluator` with "segm"): height and
    width on every image, a segmentation on every annotation. The json is read again, since COCOeval scores
    every annotation of the file, also those the reader left out (zero-area boxes, boxes outside the image).
    DataError naming the file, the first image or annotation at fault and how many others are."""
    data = load_coco_json(json_file)
    sizeless = [img for img in data["images"] if img.get("height") is None or img.get("width") is None]
    if sizeless:
        img = sizeless[0]
        raise DataError(f"model=mask_gdino validates masks (COCO segm evaluation), which needs height and width on "
                        f"every image, but image id {img.get('id')} ({img.get('file_name')}) has none"
                        f"{_others(len(sizeless) - 1, 'image')}", json_file)
    bare = [ann for ann in data.get("annotations", []) if not ann.get("segmentation")]
    if bare:
        ann = bare[0]
        raise DataError(f"model=mask_gdino validates masks (COCO segm evaluation), which needs a segmentation on "
                        f"every annotation, but annotation id {ann.get('id')} (image id {ann.get('image_id')}) has "
                        f"none{_others(len(bare) - 1, 'annotation')}", json_file)


def _others(count: int, what: str) -> str:
    return f" ({count} other {what}{'s' if count > 1 else ''} too)" if count else ""
