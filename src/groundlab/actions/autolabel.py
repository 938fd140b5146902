"""action=autolabel (model=mask_gdino): an instance-segmentation model from box labels (or only class names), in
one command. Steps, each in its own folder under the run dir and skipped when already complete
(actions/pipeline_steps.py: the same command resumes a stopped pipeline):

  boxes             the COCO box json given (box_source=coco), or Grounding DINO's detections on raw images for
                    a class list (box_source=gdino): boxes/boxes.json, with inference's annotated images
  mal_train         MAL trained on the boxes (skipped for autolabel.mal_checkpoint): mal_train/mal_model_latest.pth
  mal_labels        MAL's masks for every box: mal_labels/mal_labels.json (RLE; boxes it could not label are
                    listed under `mal_skipped`) and mal_labels/train_pseudo_masks.json, where each box without
                    a mask got its rectangle, or its image was left out (autolabel.missing_masks), counted by
                    reason; the pseudo-masks' mIoU against true masks when they are known
  mask_gdino_train  this run's Mask Grounding DINO recipe trained on the pseudo-masks
  evaluate          its COCO bbox and segm mAP on dataset.val_data_sources (true masks), when given

pipeline.json (run dir) records each step's inputs, outputs, time and metrics. Returns the evaluate step's
metrics plus pseudo_mask_mIoU and the mask counts, so a sweep can optimize the whole pipeline.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Dict, Tuple

from omegaconf import DictConfig, OmegaConf

from groundlab.actions.autolabel_configs import (gdino_boxes_config, mal_config, mask_gdino_config,
                                                 pipeline_inputs)
from groundlab.actions.pipeline_steps import Pipeline
from groundlab.config import check_config
from groundlab.data.pseudo_labels import detections_to_coco, fill_missing_masks
from groundlab.engine.run_dirs import latest_path
from groundlab.eval.pseudo_mask_iou import pseudo_mask_iou
from groundlab.ops.atomic_write import atomic_write_text
from groundlab.recipes import get_recipe
from groundlab.run_record import write_run_record

log = logging.getLogger(__name__)


def _run(step: DictConfig) -> Dict[str, float]:
    """One step's recipe, as the runner runs an action: seeded, its run record in its folder."""
    import torch

    torch.manual_seed(step.seed)
    write_run_record(step)
    return get_recipe(step)(step) or {}


def _plain(node: DictConfig) -> Any:
    return OmegaConf.to_container(node, resolve=True)


def _read(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


def _write(path: str, obj: Any) -> str:
    atomic_write_text(path, json.dumps(obj))
    return path


def _box_counts(path: str) -> Dict[str, float]:
    data = _read(path)
    return {"images": float(len(data.get("images", []))), "boxes": float(len(data.get("annotations", [])))}


def detect_boxes(step: DictConfig, folder: str, threshold: float) -> Tuple[str, Dict[str, float]]:
    """Grounding DINO inference (`step`, results in `folder`) turned into `folder`/boxes.json, a COCO box json of
    the detections >= threshold; returns its path and counts (images, boxes, images_skipped: undecodable)."""
    _run(step)
    made = os.path.join(folder, "inference")
    index = _read(os.path.join(made, "images.json"))
    coco = detections_to_coco(_read(os.path.join(made, "results.json")), index["images"], index["categories"],
                              threshold)
    path = _write(os.path.join(folder, "boxes.json"), coco)
    metrics = _box_counts(path)
    metrics["images_skipped"] = float(len(index.get("skipped_images", [])))
    log.info("boxes: %d detections >= %.2f on %d images", metrics["boxes"], threshold, metrics["images"])
    return path, metrics


def run(cfg: DictConfig) -> Dict[str, float]:
    al = cfg.autolabel
    inputs = pipeline_inputs(cfg)
    pipe = Pipeline(cfg.results_dir)
    # every step's config is composed and checked now, before anything runs (paths made by earlier steps are
    # placeholders here and filled in when their step starts)
    planned = {"mal_train": mal_config(cfg, pipe.folder("mal_train"), inputs, "boxes.json", "train"),
               "mal_labels": mal_config(cfg, pipe.folder("mal_labels"), inputs, "boxes.json", "inference"),
               "mask_gdino_train": mask_gdino_config(cfg, pipe.folder("mask_gdino_train"), "train", "pseudo.json",
                                                     inputs)}
    if al.box_source == "gdino":
        planned["boxes"] = gdino_boxes_config(cfg, pipe.folder("boxes"), inputs)
    for step in planned.values():
        check_config(step)
    log.info("autolabel: %s boxes -> MAL -> Mask Grounding DINO%s; steps in %s", al.box_source,
             " -> segm mAP on " + inputs["val"]["json_file"] if inputs["val"] else "", cfg.results_dir)

    def boxes(folder: str) -> Dict[str, Any]:
        if al.box_source == "coco":
            return {"outputs": {"boxes_json": inputs["box_json"]}, "metrics": _box_counts(inputs["box_json"])}
        path, metrics = detect_boxes(planned["boxes"], folder, al.box_threshold)
        return {"outputs": {"boxes_json": path}, "metrics": metrics}

    box_rec = pipe.step("boxes", {"box_source": al.box_source, "box_json": inputs["box_json"],
                                  "gdino_checkpoint": al.gdino_checkpoint, "box_threshold": al.box_threshold,
                                  "gdino_overrides": list(al.gdino_overrides), "image_dir": inputs["image_dir"],
                                  "class_names": inputs["class_names"]}, boxes)
    box_json = box_rec["outputs"]["boxes_json"]

    def mal_train(folder: str) -> Dict[str, Any]:
        if al.mal_checkpoint:
            return {"outputs": {"checkpoint": al.mal_checkpoint}, "metrics": {"given": 1.0}}
        step = planned["mal_train"]
        step.dataset.train_ann_path = box_json
        metrics = _run(step)
        return {"outputs": {"checkpoint": latest_path(folder, "mal")}, "metrics": metrics}

    mal_rec = pipe.step("mal_train", {"mal_checkpoint": al.mal_checkpoint, "mal_overrides": list(al.mal_overrides),
                                      "seed": cfg.seed}, mal_train, after=[box_rec])

    def mal_labels(folder: str) -> Dict[str, Any]:
        step = planned["mal_labels"]
        step.inference.checkpoint = mal_rec["outputs"]["checkpoint"]
        step.inference.ann_path, step.inference.img_dir = box_json, inputs["image_dir"]
        step.inference.label_dump_path = os.path.join(folder, "mal_labels.json")
        step.inference.load_mask = False
        metrics = _run(step)
        labelled = _read(step.inference.label_dump_path)
        trainable, counts = fill_missing_masks(labelled, al.missing_masks)
        path = _write(os.path.join(folder, "train_pseudo_masks.json"), trainable)
        metrics = {"masks_written": metrics.get("masks_written", 0.0), **counts}
        if counts["missing_masks"]:
            log.warning("mal_labels: %d of %d boxes have no MAL mask (%s): %s", counts["missing_masks"],
                        counts["boxes"], ", ".join(f"{r}: {n}" for r, n in counts["missing_by_reason"].items()),
                        "trained on their box rectangles" if al.missing_masks == "box"
                        else f"{counts['images_dropped']} images left out of training")
        if inputs["train_mask_json"]:
            quality = pseudo_mask_iou(labelled, _read(inputs["train_mask_json"]))
            metrics.update({f"pseudo_mask_{k}": v for k, v in quality.items() if k != "per_class" and v is not None})
            log.info("mal_labels: pseudo-mask mIoU %.3f against the true masks of %d boxes (%d without a mask)",
                     quality["mIoU"] or 0.0, quality["num_instances"], quality["missing"])
        return {"outputs": {"mal_labels_json": step.inference.label_dump_path, "train_json": path},
                "metrics": metrics}

    label_rec = pipe.step("mal_labels", {"missing_masks": al.missing_masks, "mal_overrides": list(al.mal_overrides),
                                         "train_mask_json": inputs["train_mask_json"]}, mal_labels,
                          after=[box_rec, mal_rec])

    def mask_gdino_train(folder: str) -> Dict[str, Any]:
        step = planned["mask_gdino_train"]
        step.dataset.train_data_sources[0].json_file = label_rec["outputs"]["train_json"]
        metrics = _run(step)
        return {"outputs": {"checkpoint": latest_path(folder, cfg.model.name)}, "metrics": metrics}

    mgd_rec = pipe.step("mask_gdino_train", {"model": _plain(cfg.model), "train": _plain(cfg.train),
                                             "seed": cfg.seed, "val": inputs["val"]}, mask_gdino_train,
                        after=[label_rec])
    metrics = {k: float(v) for k, v in label_rec["metrics"].items() if isinstance(v, (int, float))}
    if inputs["val"]:
        def evaluate(folder: str) -> Dict[str, Any]:
            step = mask_gdino_config(cfg, folder, "evaluate", None, inputs, mgd_rec["outputs"]["checkpoint"])
            check_config(step)
            scores = _run(step)
            return {"outputs": {"results": os.path.join(folder, "evaluate", "results.json")}, "metrics": scores}

        eval_rec = pipe.step("evaluate", {"evaluate": _plain(cfg.evaluate), "val": inputs["val"]}, evaluate, after=[mgd_rec])
        metrics.update(eval_rec["metrics"])
    log.info("autolabel: complete; pipeline.json in %s", cfg.results_dir)
    return metrics
