"""Typed schemas of the `dataset` config group (TAO `grounding_dino` / `mal` spec keys).

A typo'd key or a wrong type fails when Hydra composes the config, naming the dotted key
(`dataset.augmentation.scaless`). Data sources are self-describing: a `.jsonl` json_file is ODVG,
a `.json` one is COCO, and an `image_dir` may be a folder or a `.tar`/`.tar.gz` archive.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional


@dataclass
class DataSource:
    """One annotated image source: `image_dir` (folder or tar archive) + annotation file."""

    image_dir: str = ""
    json_file: str = ""
    label_map: Optional[str] = None  # ODVG detection jsonl only: {"0": "name", ...}
    # OD: detection / grounding records evaluated as detection (COCO bbox/segm). VG: referring expressions (an
    # ODVG jsonl of grounding records, each one expression with the regions it refers to; mask_gdino only).
    data_type: str = "OD"


@dataclass
class InferDataSources:
    """Unannotated images for inference: `raw` (folders + one class list, as `captions` or a `classmap` file) or
    `coco_raw` (jsonl). TAO's mask_grounding_dino keys: `classmap`, `data_type`."""

    image_dir: List[str] = field(default_factory=list)
    captions: List[str] = field(default_factory=list)  # class names shared by every image (raw)
    classmap: Optional[str] = None  # the same, as a text file of one class name per line (instead of captions)
    json_file: Optional[str] = None  # coco_raw: jsonl of {"image_path": ..., "caption": ...} (VG: "expression")
    # OD: object detection with a class list (or a caption per image); VG: one referring expression per line of
    # json_file, segmented as a whole (mask_gdino only)
    data_type: str = "OD"


@dataclass
class AugmentationConfig:
    """Training/eval transforms (TAO names). Sizes are pixels of the image's shorter side."""

    scales: List[int] = field(default_factory=lambda: [480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800])
    input_mean: List[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    input_std: List[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    horizontal_flip_prob: float = 0.5
    train_random_resize: List[int] = field(default_factory=lambda: [400, 500, 600])
    train_random_crop_min: int = 384
    train_random_crop_max: int = 600
    random_resize_max_size: int = 1333
    test_random_resize: int = 800
    # Fixed (height, width) for exported engines; when set, eval and inference resize to exactly this.
    fixed_input_size: Optional[List[int]] = None


@dataclass
class SyntheticConfig:
    """Generated shapes-and-colours scenes (see groundlab.data.synthetic.SyntheticSpec)."""

    seed: int = 0
    image_size: List[int] = field(default_factory=lambda: [128, 128])  # (height, width)
    num_train: int = 256
    num_val: int = 64
    min_objects: int = 1
    max_objects: int = 4
    colors: List[str] = field(default_factory=lambda: ["red", "green", "blue"])
    shapes: List[str] = field(default_factory=lambda: ["circle", "square", "triangle"])
    min_size_frac: float = 0.15
    max_size_frac: float = 0.45
    archive: bool = False  # write each split's images as one .tar.gz (read directly, never extracted)
    jpeg_quality: int = 92


@dataclass
class DatasetConfig:
    """Grounding DINO / Mask Grounding DINO data (dataset=odvg|coco|raw|coco_raw|synthetic|synthetic_vg)."""

    type: str = "odvg"
    train_data_sources: List[DataSource] = field(default_factory=list)
    # empty json_file = none (a node rather than null, so `dataset.val_data_sources.json_file=...` always works)
    val_data_sources: DataSource = field(default_factory=DataSource)
    test_data_sources: DataSource = field(default_factory=DataSource)
    infer_data_sources: InferDataSources = field(default_factory=InferDataSources)
    # images that calibrate action=quantize (TAO's key); dataset=synthetic calibrates on its training images
    quant_calibration_data_sources: DataSource = field(default_factory=DataSource)
    max_labels: int = 80
    batch_size: int = 4
    workers: int = 8
    pin_memory: bool = True
    eval_class_ids: Optional[List[int]] = None
    skip_missing_images: bool = False  # False: a missing image is an error naming it; True: skipped and counted
    # An image that cannot be decoded (truncated, not an image) is skipped and listed by evaluate/inference; in
    # training it is named in the log and replaced by another sample, and the run stops with a DataError once
    # more than this fraction of the training images failed (counted per data-loader process: each worker
    # counts the bad images it met). 0.0: the first undecodable training image stops the run.
    max_bad_image_fraction: float = 0.01
    augmentation: AugmentationConfig = field(default_factory=AugmentationConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class MALDatasetConfig:
    """Mask Auto-Labeler data: box-only COCO json for training (dataset=mal_coco|mal_synthetic)."""

    type: str = "mal_coco"
    train_ann_path: str = ""
    train_img_dir: str = ""
    val_ann_path: str = ""
    val_img_dir: str = ""
    crop_size: int = 512
    min_obj_size: float = 2048.0
    max_obj_size: float = 1e10
    load_mask: bool = True  # false: the val json has no masks, so training runs without validation
    num_workers_per_gpu: int = 2
    skip_missing_images: bool = False
    # An image that cannot be decoded: its boxes are skipped and listed by evaluate/inference; in training it is
    # named in the log and its crops replaced by others, and the run stops with a DataError once more than this
    # fraction of the training images failed (counted per data-loader process). 0.0: the first one stops it.
    max_bad_image_fraction: float = 0.01
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


DATASET_TYPES = ("odvg", "coco", "raw", "coco_raw", "synthetic", "synthetic_vg")
MAL_DATASET_TYPES = ("mal_coco", "mal_synthetic")
# the generated datasets (groundlab.data.synthetic): their sources are filled in by the data layer
SYNTHETIC_TYPES = ("synthetic", "synthetic_vg", "mal_synthetic")
SOURCE_DATA_TYPES = ("OD", "VG")  # a data source's data_type
