"""action=evaluate for MAL (model=mal): mask mIoU of a MAL checkpoint on a COCO json with true masks
(dataset.val_ann_path / val_img_dir, or the synthetic val split). Each box is cropped with the test
margins, its mask predicted (student, teacher or both, optionally with flip test), pasted back into the
image and scored against the true mask. Writes <results_dir>/evaluate/results.json: mIoU, mIoU
small/medium/large, per-class mIoU by name and by category id. The boxes of an image that cannot be decoded
are left out of the score, the image named in the log and listed in results.json ("skipped_images", and its
boxes under "skipped_boxes" with the reason). Without evaluate.checkpoint, the latest checkpoint of the train
run with the same model and run_name is evaluated (engine/run_dirs.py)."""

from __future__ import annotations

import logging
import os
from typing import Any, Dict, List

import torch
from omegaconf import DictConfig
from tqdm import tqdm

from groundlab.config import ConfigError
from groundlab.data.bad_images import BadImage, log_skipped
from groundlab.data.mal_instances import MALInstances
from groundlab.data.mal_sources import mal_paths, read_split
from groundlab.data.mal_dataset import MALCropDataset, collate_crops
from groundlab.eval.coco_eval import write_results_json
from groundlab.engine.devices import run_device
from groundlab.engine.run_dirs import chained_settings
from groundlab.eval.mask_miou import MaskIoUMeter
from groundlab.eval.mask_miou import score_batch
from groundlab.io.remote_files import local_path, redact
from groundlab.predict.mal import MALPredictor

log = logging.getLogger(__name__)


def load_predictor(cfg: DictConfig, options: DictConfig) -> MALPredictor:
    """The MAL predictor of `options.checkpoint` (evaluate / inference settings: teacher, mixed, flip, device);
    dataset.crop_size is for training, so another value there is reported, not used."""
    checkpoint = local_path(options.checkpoint, cfg.cache_dir, f"{cfg.action.name}.checkpoint")  # s3:// etc.
    try:
        predictor = MALPredictor.from_checkpoint(checkpoint, cfg.model.mask_thres,
                                                 run_device(options.num_gpus, options.gpu_ids),
                                                 options.use_teacher_test, options.use_mixed_model_test,
                                                 options.use_flip_test)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"evaluate/inference checkpoint {redact(options.checkpoint)!r}: {e}") from None
    if cfg.dataset.crop_size != predictor.crop_size:
        log.info("crops at the checkpoint's crop size %d (dataset.crop_size=%d applies to training)",
                 predictor.crop_size, cfg.dataset.crop_size)
    return predictor


class UndecodableBoxes:
    """The boxes of undecodable images met while going through a MALCropDataset's batches (evaluate, inference):
    each image named in the log once (`how`: what becomes of its boxes), each box listed as MALInstances.skipped
    lists the others ({"ann_id", "ann_index", "image_id", "reason": "image could not be decoded: ..."})."""

    def __init__(self, data: MALInstances, how: str):
        self.data, self.how = data, how
        self.images: Dict[str, BadImage] = {}
        self.boxes: List[Dict[str, Any]] = []

    def add(self, batch: Dict[str, Any]) -> None:
        for bad in batch["skipped"]:
            if bad.file_name not in self.images:
                self.images[bad.file_name] = bad
                log_skipped(bad, self.how)
            rec = self.data.instances[bad.index]
            self.boxes.append({"ann_id": rec["ann_id"], "ann_index": rec["ann_index"], "image_id": rec["image_id"],
                               "reason": f"image could not be decoded: {bad.reason}"})

    def skipped_images(self) -> List[Dict[str, Any]]:
        """[{"file_name", "source", "reason", "image_id", "boxes"}] in the order met."""
        counts: Dict[str, int] = {}
        for b in self.boxes:
            counts[b["image_id"]] = counts.get(b["image_id"], 0) + 1
        return [dict(b.as_dict(), boxes=counts.get(b.image_id, 0)) for b in self.images.values()]


def run(cfg: DictConfig) -> Dict[str, float]:
    ev = chained_settings(cfg, "evaluate")  # no checkpoint given: the train run's latest
    predictor = load_predictor(cfg, ev)
    paths = mal_paths(cfg)
    data, source = read_split(cfg, paths["val_ann"], paths["val_img"], "val", train=False)
    dataset = MALCropDataset(data, source, predictor.crop_size, False, (0.0, 0.0),
                             cfg.model.test_margin_rate, with_gt=True)
    loader = torch.utils.data.DataLoader(dataset, batch_size=ev.batch_size, collate_fn=collate_crops,
                                         num_workers=cfg.dataset.num_workers_per_gpu)
    meter = MaskIoUMeter(len(data.class_names))
    undecodable = UndecodableBoxes(data, "its boxes are left out of the mIoU")
    for batch in tqdm(loader, desc="evaluate", unit="batch"):
        undecodable.add(batch)
        if "teacher" in batch:
            score_batch(predictor(batch), batch, meter)
    result = meter.compute(data.class_names)
    by_id = {str(data.category_ids[data.class_names.index(name)]): v for name, v in result["per_class"].items()}
    metrics = {k: v for k, v in result.items() if k != "per_class"}
    metrics.update(per_class_mIoU=result["per_class"], per_class_mIoU_by_id=by_id,
                   images_skipped=len(undecodable.images))
    out_dir = os.path.join(cfg.results_dir, "evaluate")
    os.makedirs(out_dir, exist_ok=True)
    skipped_boxes = sorted(data.skipped + undecodable.boxes, key=lambda b: b["ann_index"])
    write_results_json(os.path.join(out_dir, "results.json"), metrics,
                       {"checkpoint": ev.checkpoint, "annotations": data.json_file, "skipped_boxes": skipped_boxes,
                        "skipped_images": undecodable.skipped_images(), "mask_thres": list(cfg.model.mask_thres)})
    log.info("mIoU %s (small %s, medium %s, large %s) over %d boxes; %s%s", result["mIoU"], result["mIoU_small"],
             result["mIoU_medium"], result["mIoU_large"], result["num_instances"], data.summary(),
             f"; {len(undecodable.boxes)} boxes of {len(undecodable.images)} undecodable images left out"
             if undecodable.images else "")
    out = {k: float(v) for k, v in metrics.items() if k.startswith("mIoU") and v is not None}
    out["images_skipped"] = float(len(undecodable.images))
    return out
