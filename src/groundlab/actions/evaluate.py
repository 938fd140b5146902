"""action=evaluate for Grounding DINO and Mask Grounding DINO: COCO AP of a checkpoint (groundlab, HF or IDEA
layout), an exported ONNX graph (evaluate.onnx_file) or a TensorRT engine (evaluate.trt_engine) on a COCO json
with any category ids (predict/backends.py picks the backend; a graph's fixed input size sets the resize). The
predictor prompts every class name (split into several prompts when too long, merged back; the backbone runs
once per image); detections below evaluate.conf_threshold are dropped and, with evaluate.nms_threshold,
class-wise box NMS runs on the merged detections. Results are written with the original ids into
<results_dir>/evaluate/:

- results.json {"metrics": ..., "checkpoint" (the file evaluated), "backend", "annotations", "num_prompts",
  "skipped_images"}. A box model's metrics are bbox's: the 12 COCO stats (AP, AP50, ... ARl), per_class_AP,
  per_class_AP_by_id, num_images, num_detections, empty, images_skipped. A mask model's (predictor.has_masks)
  are {"bbox": {those stats}, "segm": {the same for the masks}, "images_skipped"}: masks binarized at
  evaluate.mask_threshold are scored against the json's segmentations, which every annotation must then have.
- detections.json: COCO results [{"image_id", "category_id", "bbox": [x, y, w, h], "score"}], each with
  "segmentation" (compressed RLE, str counts) for a mask model.

An image that cannot be decoded is skipped, named in the log and listed in results.json ("skipped_images");
it still counts in the COCO evaluation, as an image without detections (its ground truth boxes are missed), so
a skipped image lowers recall rather than vanishing from the score.

With none of evaluate.checkpoint / onnx_file / trt_engine given, the latest checkpoint of the train run with the
same model and run_name is evaluated (engine/run_dirs.py). A referring-expression source (data_type VG) is scored
by actions/evaluate_referring.py instead."""

from __future__ import annotations

import json
import logging
import os
from typing import Dict, List

import torch
from omegaconf import DictConfig
from tqdm import tqdm

from groundlab.config import ConfigError
from groundlab.data.bad_images import BadImage, log_skipped
from groundlab.data.collate import GroundingCollator
from groundlab.data.grounding_dataset import GroundingDataset
from groundlab.data.sources import load_split
from groundlab.engine.devices import run_device
from groundlab.engine.run_dirs import chained_settings
from groundlab.actions.evaluate_referring import evaluate_expressions
from groundlab.eval.coco_eval import CocoEvaluator, write_results_json
from groundlab.ops.masks import encode_masks
from groundlab.predict.backends import choose_backend, open_predictor, predictor_transforms

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> Dict[str, float]:
    ev = chained_settings(cfg, "evaluate")  # no model file given: the train run's latest checkpoint
    backend, model_file = choose_backend(ev, "evaluate")  # the settings are checked before the data loads
    split = "test" if cfg.dataset.test_data_sources.json_file and cfg.dataset.type != "synthetic" else "val"
    # The data is checked before the checkpoint loads. GT masks are not read here, even for a mask model: the
    # evaluator reads them from the json (and checks each one) and the dataset never decodes them.
    sources = load_split(cfg.dataset, cfg.cache_dir, split, use_masks=False)
    if not sources or not len(sources[0].records):
        raise ConfigError(f"dataset.{split}_data_sources holds no images to evaluate.")
    source = sources[0]
    if source.data_type == "VG":  # referring expressions: scored by their union masks, not COCO AP
        predictor = open_predictor(cfg.model, ev, "evaluate", run_device(ev.num_gpus, ev.gpu_ids))
        return evaluate_expressions(cfg, source, predictor, backend, model_file)
    if source.category_ids is None:
        raise ConfigError(f"dataset.{split}_data_sources.json_file must be a COCO json (the ground truth), or an "
                          f"ODVG jsonl of referring expressions with dataset.{split}_data_sources.data_type=VG.")
    predictor = open_predictor(cfg.model, ev, "evaluate", run_device(ev.num_gpus, ev.gpu_ids))
    # every class is prompted by the predictor: the dataset only delivers images and ground truth
    dataset = GroundingDataset([source], predictor.encoder, predictor_transforms(cfg.dataset.augmentation, predictor),
                               train=False)
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.dataset.batch_size, num_workers=cfg.dataset.workers,
                                         collate_fn=GroundingCollator(predictor.encoder, tokenize=False))
    class_ids = list(cfg.dataset.eval_class_ids) if cfg.dataset.eval_class_ids else None
    iou_types = ("bbox", "segm") if predictor.has_masks else ("bbox",)
    evaluator = CocoEvaluator(source.name, iou_types=iou_types, class_ids=class_ids)
    detections = []
    skipped: List[BadImage] = []
    no_detection = {"scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}
    for batch in tqdm(loader, desc="evaluate", unit="batch"):
        for bad in batch["skipped"]:
            log_skipped(bad, "evaluated as an image without detections")
            evaluator.update(bad.image_id, no_detection, source.category_ids)
        skipped += batch["skipped"]
        if batch["images"] is None:
            continue
        sizes = torch.stack([t["orig_size"] for t in batch["targets"]])
        results = predictor.detect_classes(batch["images"], batch["padding_mask"], sizes, source.class_names,
                                           ev.nms_threshold, ev.mask_threshold)
        for target, result in zip(batch["targets"], results):
            keep = result["scores"] >= ev.conf_threshold
            result = {k: v[keep].cpu() for k, v in result.items()}
            if "masks" in result:  # encoded once: for the evaluator and for detections.json
                result["rles"] = encode_masks(result.pop("masks").bool().numpy())
            evaluator.update(int(target["image_id"]), result, source.category_ids)
            rles = result.get("rles", [None] * len(result["scores"]))
            for s, l, b, rle in zip(result["scores"].tolist(), result["labels"].tolist(), result["boxes"].tolist(),
                                    rles):
                detections.append({"image_id": int(target["image_id"]), "category_id": source.category_ids[l],
                                   "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "score": s})
                if rle is not None:
                    detections[-1]["segmentation"] = rle
    summaries = evaluator.summarize()
    out_dir = os.path.join(cfg.results_dir, "evaluate")
    os.makedirs(out_dir, exist_ok=True)
    stats_by_type = {}
    for iou_type, summary in summaries.items():
        log.info("%s\n%s", iou_type, summary.get("report", ""))
        stats_by_type[iou_type] = {k: v for k, v in summary.items() if k != "report"}
    # a box model keeps the flat layout results.json always had; a mask model's is keyed by iou type
    stats = dict(stats_by_type["bbox"]) if iou_types == ("bbox",) else dict(stats_by_type)
    stats["images_skipped"] = len(skipped)
    write_results_json(os.path.join(out_dir, "results.json"), stats,
                       {"checkpoint": model_file, "backend": backend, "annotations": source.name,
                        "num_prompts": len(predictor.chunked(source.class_names).prompts),
                        "skipped_images": [b.as_dict() for b in skipped]})
    with open(os.path.join(out_dir, "detections.json"), "w") as f:
        json.dump(detections, f)
    if skipped:
        log.warning("%d of %d images could not be decoded: evaluated as images without detections (listed in "
                    "%s under skipped_images)", len(skipped), len(dataset), os.path.join(out_dir, "results.json"))
    bbox = summaries["bbox"]
    metrics = {"mAP": float(bbox["AP"]), "mAP50": float(bbox["AP50"]), "mAP75": float(bbox["AP75"]),
               "images_skipped": float(len(skipped))}
    if "segm" in summaries:
        segm = summaries["segm"]
        metrics.update({"segm_mAP": float(segm["AP"]), "segm_mAP50": float(segm["AP50"]),
                        "segm_mAP75": float(segm["AP75"])})
    return metrics
