"""action=evaluate on a referring-expression source (data_type VG, Mask Grounding DINO with region queries).

Each sample is one expression on one image; the predictor segments it (predict/gdino.py detect_expressions: the
no-target gate, score and NMS, intersection-over-instance with the predicted union mask, evaluate.*'s
thresholds) and the union of the kept instance masks is scored against the union of the referred objects' masks
(eval/referring_metrics.py: gIoU, cIoU, N_acc, T_acc, Pr@0.7/0.8/0.9). Written into <results_dir>/evaluate/:

- results.json {"metrics": {those, num_samples, num_no_target}, "checkpoint", "backend", "annotations",
  "skipped_images"}; a fraction with no sample to count (N_acc without no-target expressions) is null.
- detections.json: per expression {"image_id", "file_name", "expression", "no_target" (the model's no-target
  decision), "iou" (of this sample), "detections": [{"bbox": [x, y, w, h], "score", "label" (the expression's
  words it answers to), "segmentation" (compressed RLE)}]}.

An image that cannot be decoded is skipped, named in the log and listed in results.json; it has no prediction
to score, so it is left out of the metrics (its count is in "images_skipped")."""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Dict, List

import torch
from omegaconf import DictConfig
from tqdm import tqdm

from groundlab.data.bad_images import BadImage, log_skipped
from groundlab.data.collate import GroundingCollator
from groundlab.data.grounding_dataset import AnnotatedSource, GroundingDataset
from groundlab.eval.coco_eval import write_results_json
from groundlab.eval.referring_metrics import ReferringMetrics
from groundlab.models.mask_gdino.referring_postprocess import prediction_union
from groundlab.ops.masks import encode_masks
from groundlab.predict.backends import predictor_transforms

log = logging.getLogger(__name__)


def evaluate_expressions(cfg: DictConfig, source: AnnotatedSource, predictor, backend: str,
                         model_file: str) -> Dict[str, float]:
    """Score every expression of `source` (module docstring); returns the metrics (NaN where undefined)."""
    ev = cfg.evaluate
    dataset = GroundingDataset([source], predictor.encoder, predictor_transforms(cfg.dataset.augmentation, predictor),
                               train=False, load_masks=False)
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.dataset.batch_size, num_workers=cfg.dataset.workers,
                                         collate_fn=GroundingCollator(predictor.encoder, tokenize=False))
    metrics = ReferringMetrics()
    rows: List[Dict[str, Any]] = []
    skipped: List[BadImage] = []
    for batch in tqdm(loader, desc="evaluate", unit="batch"):
        for bad in batch["skipped"]:
            log_skipped(bad, "left out of the referring metrics")
        skipped += batch["skipped"]
        if batch["images"] is None:
            continue
        sizes = torch.stack([t["orig_size"] for t in batch["targets"]])
        results = predictor.detect_expressions(batch["images"], batch["padding_mask"], sizes, batch["prompts"], ev)
        for target, prompt, name, result in zip(batch["targets"], batch["prompts"], batch["file_names"], results):
            image_id = int(target["image_id"])
            metrics.update(prediction_union(result["masks"]).cpu(), target["vg_union"], bool(target["empty"]),
                           sample_id=image_id)
            rles = encode_masks(result["masks"].cpu().numpy()) if len(result["scores"]) else []
            rows.append({"image_id": image_id, "file_name": name, "expression": prompt.text,
                         "no_target": bool(result["no_target"]),
                         "detections": [
                             {"bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "score": s, "label": label,
                              "segmentation": rle}
                             for b, s, label, rle in zip(result["boxes"].tolist(), result["scores"].tolist(),
                                                         result["labels"], rles)]})
    for row, iou in zip(rows, metrics.per_sample_iou()):  # one sample per expression, in order
        row["iou"] = float(iou)
    values = metrics.compute()
    values["images_skipped"] = len(skipped)
    out_dir = os.path.join(cfg.results_dir, "evaluate")
    os.makedirs(out_dir, exist_ok=True)
    write_results_json(os.path.join(out_dir, "results.json"), values,
                       {"checkpoint": model_file, "backend": backend, "annotations": source.name,
                        "data_type": "VG", "skipped_images": [b.as_dict() for b in skipped]})
    with open(os.path.join(out_dir, "detections.json"), "w") as f:
        json.dump(rows, f)
    log.info("referring segmentation on %d expressions (%d refer to nothing): %s", values["num_samples"],
             values["num_no_target"], "  ".join(f"{k} {values[k]:.4f}" for k in
                                                 ("gIoU", "cIoU", "N_acc", "T_acc", "Pr@0.7", "Pr@0.9")))
    if skipped:
        log.warning("%d of %d images could not be decoded: left out of the referring metrics (listed in %s under "
                    "skipped_images)", len(skipped), len(dataset), os.path.join(out_dir, "results.json"))
    return {k: float(v) for k, v in values.items()}
