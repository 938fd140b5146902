"""MAL's annotation files and image sources per split: dataset=mal_coco paths, or the generated synthetic
dataset (box-only train json, val json with masks) for dataset=mal_synthetic."""

from __future__ import annotations

from typing import Dict

from omegaconf import DictConfig

from groundlab.data.mal_instances import read_mal_instances
from groundlab.data.sources import open_images, synthetic_paths
from groundlab.errors import DataError
from groundlab.io.remote_files import local_path


def mal_paths(cfg: DictConfig) -> Dict[str, str]:
    """{"train_ann", "train_img", "val_ann", "val_img"} of dataset=mal_coco, or of the generated synthetic
    dataset (box-only train json, val json with masks) for dataset=mal_synthetic."""
    d = cfg.dataset
    if d.type == "mal_synthetic":
        p = synthetic_paths(d, cfg.cache_dir)
        return {"train_ann": p.train_coco_boxes, "train_img": p.train_images, "val_ann": p.val_coco,
                "val_img": p.val_images}
    return {"train_ann": d.train_ann_path, "train_img": d.train_img_dir, "val_ann": d.val_ann_path,
            "val_img": d.val_img_dir}


def read_split(cfg: DictConfig, ann: str, img: str, key: str, train: bool) -> tuple:
    """(MALInstances, image source) of one split; training applies min/max_obj_size, evaluation needs masks."""
    d = cfg.dataset
    if not ann:
        raise DataError(f"dataset.{key}_ann_path is empty")
    ann = local_path(ann, cfg.cache_dir, f"dataset.{key}_ann_path")  # an s3:// / https:// json is fetched once
    source = open_images(img, f"dataset.{key}_img_dir", cfg.cache_dir)
    if train:
        inst = read_mal_instances(ann, source, d.min_obj_size, d.max_obj_size, skip_missing=d.skip_missing_images)
    else:
        inst = read_mal_instances(ann, source, need_masks=True, skip_missing=d.skip_missing_images)
    if len(inst.instances) == 0:
        raise DataError(f"no usable box in dataset.{key}_ann_path ({inst.summary()})", ann)
    return inst, source
