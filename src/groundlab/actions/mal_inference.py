"""action=inference for MAL (model=mal): masks for the boxes of a COCO json (inference.ann_path /
inference.img_dir; by default with dataset=mal_synthetic, its box-only training json).

Writes inference.label_dump_path: the input json with an RLE `segmentation` on every box it could process
(`area` = the mask's pixel count), so it trains mask_gdino as a COCO dataset with masks. Boxes it could
not process (zero area, outside the image, image missing, image that cannot be decoded) keep their annotation
untouched and are listed under `mal_skipped` in the json and in the log (an undecodable image: one line naming
it, its boxes with the reason "image could not be decoded: ..."). With inference.load_mask the json's own masks
score the predictions (mIoU, and `mal_iou` per annotation). Also writes annotated images (inference.draw_images).
Without inference.checkpoint, the latest checkpoint of the train run with the same model and run_name labels the
boxes (engine/run_dirs.py)."""

from __future__ import annotations

import copy
import json
import logging
import os
from collections import defaultdict
from typing import Dict

import numpy as np
import torch
from omegaconf import DictConfig
from tqdm import tqdm

from groundlab.actions.mal_evaluate import UndecodableBoxes, load_predictor
from groundlab.ops.atomic_write import atomic_write_text
from groundlab.config import ConfigError
from groundlab.data.mal_sources import mal_paths
from groundlab.data.mal_dataset import MALCropDataset, collate_crops
from groundlab.data.mal_instances import read_mal_instances
from groundlab.data.sources import open_images
from groundlab.engine.run_dirs import chained_settings
from groundlab.io.remote_files import local_path
from groundlab.ops.masks import encode_mask
from groundlab.deploy.mask_overlay import overlay_masks
from groundlab.eval.mask_miou import MaskIoUMeter
from groundlab.eval.mask_miou import score_batch

log = logging.getLogger(__name__)


def _inputs(cfg: DictConfig) -> tuple:
    inf = cfg.inference
    if inf.ann_path:
        if not inf.img_dir:
            raise ConfigError("inference.img_dir is required with inference.ann_path")
        return inf.ann_path, inf.img_dir
    if cfg.dataset.type == "mal_synthetic":
        paths = mal_paths(cfg)
        return paths["train_ann"], paths["train_img"]
    raise ConfigError("inference.ann_path (a COCO json with boxes) and inference.img_dir are required")


def run(cfg: DictConfig) -> Dict[str, float]:
    inf = cfg.inference
    if not inf.label_dump_path:
        raise ConfigError("inference.label_dump_path is required: where the json with masks goes.")
    inf = chained_settings(cfg, "inference")  # no checkpoint given: the train run's latest
    predictor = load_predictor(cfg, inf)
    ann_path, img_dir = _inputs(cfg)
    ann_path = local_path(ann_path, cfg.cache_dir, "inference.ann_path")  # an s3:// / https:// json: fetched once
    source = open_images(img_dir, "inference.img_dir", cfg.cache_dir)
    data = read_mal_instances(ann_path, source, need_masks=inf.load_mask, skip_missing=True, keep_data=True)
    dataset = MALCropDataset(data, source, predictor.crop_size, False, (0.0, 0.0),
                             cfg.model.test_margin_rate, with_gt=inf.load_mask)
    loader = torch.utils.data.DataLoader(dataset, batch_size=inf.batch_size, collate_fn=collate_crops,
                                         num_workers=cfg.dataset.num_workers_per_gpu)
    meter = MaskIoUMeter(len(data.class_names))
    out = copy.deepcopy(data.data)
    anns = out.get("annotations", [])
    drawn: Dict[str, list] = defaultdict(list)  # file name -> [(region, place, label, box)] for the annotated images
    sizes: Dict[str, tuple] = {}  # file name -> the json's (height, width)
    empty = []  # boxes whose predicted mask has no pixel: written (area 0) and reported
    limit = inf.draw_images if inf.draw_images >= 0 else float("inf")
    undecodable = UndecodableBoxes(data, "its boxes keep their annotations, listed under 'mal_skipped'")
    for batch in tqdm(loader, desc="inference", unit="batch"):
        undecodable.add(batch)
        if "teacher" not in batch:
            continue
        masks = predictor(batch)
        ious = score_batch(masks, batch, meter) if inf.load_mask else [None] * len(masks)
        for (region, (x1, y1, x2, y2)), index, iou in zip(masks, batch["index"].tolist(), ious):
            rec = data.instances[index]
            full = np.zeros((rec["height"], rec["width"]), dtype=bool)
            full[y1:y2, x1:x2] = region.numpy()
            ann = anns[rec["ann_index"]]
            ann["segmentation"], ann["area"] = encode_mask(full), float(full.sum())
            if not ann["area"]:
                empty.append(rec["ann_id"])
            if iou is not None:
                ann["mal_iou"] = iou
            if rec["file_name"] in drawn or len(drawn) < limit:
                drawn[rec["file_name"]].append((region, (x1, y1, x2, y2), rec["label"], rec["box"]))
                sizes[rec["file_name"]] = (rec["height"], rec["width"])
    skipped = sorted(data.skipped + undecodable.boxes, key=lambda b: b["ann_index"])
    out["mal_skipped"] = skipped
    path = os.path.abspath(os.path.expanduser(inf.label_dump_path))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write_text(path, json.dumps(out))
    image_dir = os.path.join(cfg.results_dir, "inference", "images")
    os.makedirs(image_dir, exist_ok=True)
    for name, items in drawn.items():
        image = dataset.image(name, *sizes[name])  # as the crops saw it (EXIF orientation, see decode_rgb)
        masks = []
        for region, (x1, y1, x2, y2), _, _ in items:
            full = np.zeros(image.shape[:2], dtype=bool)
            full[y1:y2, x1:x2] = region.numpy()
            masks.append(full)
        # the path inside the source, flattened: same-named images in different folders stay apart
        target = os.path.join(image_dir, name.replace("/", "__").rsplit(".", 1)[0] + ".jpg")
        overlay_masks(image, masks, [i[2] for i in items], [i[3] for i in items], data.class_names).save(target,
                                                                                                      quality=92)
    if empty:
        log.warning("%d boxes got an empty mask (area 0), e.g. annotation ids %s", len(empty), empty[:5])
    for s in data.skipped:  # the undecodable images' boxes were named with their image, one line each image
        log.warning("box not labelled: annotation id %s (image %s): %s", s["ann_id"], s["image_id"], s["reason"])
    written = len(data.instances) - len(undecodable.boxes)
    log.info("wrote %s: %d masks, %d boxes left without one (listed under 'mal_skipped'); %d annotated images in %s",
             path, written, len(skipped), len(drawn), image_dir)
    metrics = {"masks_written": float(written), "boxes_skipped": float(len(skipped)),
               "empty_masks": float(len(empty)), "images_skipped": float(len(undecodable.images))}
    if inf.load_mask:
        result = meter.compute(data.class_names)
        metrics.update({k: float(v) for k, v in result.items() if k.startswith("mIoU") and v is not None})
    return metrics
