"""The inputs of action=autolabel and the configs of its steps, all built and checked before the first step runs
(a typo in `autolabel.mal_overrides` fails at once, not after an hour of training).

Inputs (`pipeline_inputs`): the training images and their box json, the val source with true masks, the true
masks of the training boxes when known:
- box_source=coco: the one source of dataset.train_data_sources (a COCO json; its masks, if any, are not used);
  dataset=synthetic: its box-only train json, and its train json with true masks scores the pseudo-masks;
- box_source=gdino: the one image folder or archive of dataset.infer_data_sources and its class list.

Each step's config is the config `python run.py <model> <action> <overrides>` would compose, with the run's
seed and cache and the step's own folder as results_dir; the Mask Grounding DINO steps are this run's own config
(model, train, evaluate settings) with the pseudo-mask json as training data.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, OmegaConf, open_dict

from groundlab.config import ConfigError
from groundlab.config.compose import compose_config
from groundlab.config.schema_dataset import DataSource
from groundlab.data.sources import resolve_sources, synthetic_paths
from groundlab.io.remote_files import local_path


def _one_train_source(cfg: DictConfig) -> Dict[str, Any]:
    sources = resolve_sources(cfg.dataset, cfg.cache_dir)["train"]
    if len(sources) != 1:
        raise ConfigError(f"autolabel.box_source=coco labels one COCO box json: dataset.train_data_sources holds "
                          f"{len(sources)} sources (merge them into one json, or run the pipeline once per source).")
    src = sources[0]
    if not str(src.get("json_file") or "").endswith(".json"):
        raise ConfigError(f"autolabel.box_source=coco reads boxes from a COCO .json: "
                          f"dataset.train_data_sources[0].json_file={src.get('json_file')!r} is not one.")
    return src


def _has_masks(json_file: str) -> bool:
    with open(json_file) as f:
        return any(a.get("segmentation") for a in json.load(f).get("annotations", []))


def pipeline_inputs(cfg: DictConfig) -> Dict[str, Any]:
    """{"image_dir", "box_json" (None for box_source=gdino: made by the boxes step), "class_names" (gdino),
    "val": {"image_dir", "json_file"} or None, "val_has_masks", "train_mask_json" or None}."""
    al, d = cfg.autolabel, cfg.dataset
    out: Dict[str, Any] = {"box_json": None, "class_names": None, "train_mask_json": al.train_mask_json}
    if al.box_source == "gdino":
        if al.train_mask_json:
            raise ConfigError("autolabel.train_mask_json scores pseudo-masks by annotation id, so it applies to "
                              "autolabel.box_source=coco only (detected boxes have ids of their own).")
        out.update(_gdino_inputs(cfg))
    elif d.type == "synthetic":
        p = synthetic_paths(d, cfg.cache_dir)
        out.update(image_dir=p.train_images, box_json=p.train_coco_boxes)
        out["train_mask_json"] = out["train_mask_json"] or p.train_coco
    else:
        src = _one_train_source(cfg)
        box_json = local_path(src["json_file"], cfg.cache_dir, "dataset.train_data_sources[0].json_file")
        out.update(image_dir=src["image_dir"], box_json=box_json)
    # remote (s3:// / https://) json files are fetched once here; the steps read the cached copies
    out["train_mask_json"] = local_path(out["train_mask_json"], cfg.cache_dir, "autolabel.train_mask_json")
    val = resolve_sources(d, cfg.cache_dir)["val"]
    if val is not None and val.get("data_type", "OD") != "OD":
        raise ConfigError("action=autolabel evaluates instance masks: dataset.val_data_sources.data_type must be OD.")
    if val:
        val = dict(val, json_file=local_path(val["json_file"], cfg.cache_dir, "dataset.val_data_sources.json_file"))
    out["val"] = {"image_dir": val["image_dir"], "json_file": val["json_file"]} if val else None
    if val and not os.path.isfile(os.path.expanduser(val["json_file"])):
        raise ConfigError(f"dataset.val_data_sources.json_file={val['json_file']!r} is not a file.")
    out["val_has_masks"] = bool(val and _has_masks(os.path.expanduser(val["json_file"])))  # MAL validates on them
    for key in ("box_json", "train_mask_json"):
        if out[key] and not os.path.isfile(os.path.expanduser(out[key])):
            raise ConfigError(f"autolabel's {key.replace('_', ' ')} {out[key]!r} is not a file.")
    return out


def _gdino_inputs(cfg: DictConfig) -> Dict[str, Any]:
    al, infer = cfg.autolabel, cfg.dataset.infer_data_sources
    if not al.gdino_checkpoint:
        raise ConfigError("autolabel.box_source=gdino needs autolabel.gdino_checkpoint (the Grounding DINO that "
                          "detects the boxes).")
    dirs = list(infer.image_dir or [])
    if len(dirs) != 1:
        raise ConfigError(f"autolabel.box_source=gdino labels the images of one folder or archive: "
                          f"dataset.infer_data_sources.image_dir holds {len(dirs)}.")
    if infer.classmap:
        with open(os.path.expanduser(infer.classmap)) as f:
            names = [line.strip() for line in f if line.strip()]
    else:
        names = list(infer.captions or [])
    if not names:
        raise ConfigError("autolabel.box_source=gdino needs the class list: dataset.infer_data_sources.captions "
                          "or dataset.infer_data_sources.classmap.")
    return {"image_dir": dirs[0], "class_names": names}


def _compose(base: List[str], user: List[str], key: str) -> DictConfig:
    try:
        return compose_config(base + user)
    except Exception as err:  # Hydra's composition errors name the override; keep only their first line
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"{key}={user}: {first}") from None


def _place(step: DictConfig, cfg: DictConfig, folder: str) -> DictConfig:
    step.results_dir = folder
    step.cache_dir = cfg.cache_dir
    return step


def mal_config(cfg: DictConfig, folder: str, inputs: Dict[str, Any], box_json: str, action: str) -> DictConfig:
    """MAL's `train` or `inference` config on the pipeline's boxes; it validates on the val json's true masks
    when they exist and name the same classes."""
    step = _compose(["model=mal", f"action={action}", "dataset=mal_coco", f"seed={cfg.seed}"],
                    list(cfg.autolabel.mal_overrides), "autolabel.mal_overrides")
    _place(step, cfg, folder)
    d = step.dataset
    d.type, d.train_ann_path, d.train_img_dir = "mal_coco", box_json, inputs["image_dir"]
    val = inputs["val"]
    d.load_mask = inputs["val_has_masks"]
    d.val_ann_path, d.val_img_dir = (val["json_file"], val["image_dir"]) if d.load_mask else ("", "")
    return step


def gdino_boxes_config(cfg: DictConfig, folder: str, inputs: Dict[str, Any]) -> DictConfig:
    """Grounding DINO `inference` on the images to label, for the class list, at autolabel.box_threshold."""
    step = _compose(["model=gdino", "action=inference", "dataset=raw", f"seed={cfg.seed}"],
                    list(cfg.autolabel.gdino_overrides), "autolabel.gdino_overrides")
    _place(step, cfg, folder)
    step.inference.checkpoint = cfg.autolabel.gdino_checkpoint
    step.inference.onnx_file = step.inference.trt_engine = None
    step.inference.conf_threshold = cfg.autolabel.box_threshold
    src = step.dataset.infer_data_sources
    src.image_dir, src.captions, src.classmap, src.json_file = [inputs["image_dir"]], inputs["class_names"], None, None
    return step


def mask_gdino_config(cfg: DictConfig, folder: str, action: str, train_json: Optional[str],
                      inputs: Dict[str, Any], checkpoint: Optional[str] = None) -> DictConfig:
    """This run's own config as action `train` (on `train_json`, the pseudo-masks) or `evaluate` (of
    `checkpoint`), on the val source; Mask Grounding DINO starts from autolabel.gdino_checkpoint unless
    train.pretrained_model_path names another."""
    step = copy.deepcopy(cfg)
    with open_dict(step):
        step.action = OmegaConf.create({"name": action})
        step.autolabel = None
    _place(step, cfg, folder)
    d = step.dataset
    d.type = "coco"
    d.train_data_sources = [DataSource(inputs["image_dir"], train_json)] if train_json else []
    val = inputs["val"] or {"image_dir": "", "json_file": ""}
    d.val_data_sources = DataSource(val["image_dir"], val["json_file"])
    d.test_data_sources = DataSource()
    if action == "train" and not step.train.pretrained_model_path and cfg.autolabel.gdino_checkpoint:
        step.train.pretrained_model_path = cfg.autolabel.gdino_checkpoint
    if action == "evaluate":
        step.evaluate.checkpoint, step.evaluate.onnx_file, step.evaluate.trt_engine = checkpoint, None, None
    return step
