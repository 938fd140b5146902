"""Typed schema of `autolabel` (conf/action/autolabel.yaml), read by action=autolabel: boxes (a COCO json, or
Grounding DINO detections from a class list) -> MAL pseudo-masks -> Mask Grounding DINO trained on them.

    python run.py model=mask_gdino action=autolabel dataset=coco \\
        'dataset.train_data_sources=[{image_dir: imgs/, json_file: boxes.json}]' \\
        'dataset.val_data_sources={image_dir: val/, json_file: val_with_masks.json}'
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

BOX_SOURCES = ("coco", "gdino")
MISSING_MASKS = ("box", "drop_image")


@dataclass
class AutolabelConfig:
    # coco: the boxes of dataset.train_data_sources (one COCO json); gdino: Grounding DINO's detections on the
    # images of dataset.infer_data_sources (one folder or archive) for its class list (captions or classmap)
    box_source: str = "coco"
    gdino_checkpoint: Optional[str] = None  # box_source=gdino: the detector; also the Mask Grounding DINO's start
    box_threshold: float = 0.3  # box_source=gdino: detections at or above this score become boxes
    # Hydra overrides of the box step's `model=gdino action=inference` config, e.g. [inference.nms_threshold=0.7]
    gdino_overrides: List[str] = field(default_factory=list)
    mal_checkpoint: Optional[str] = None  # a trained MAL: step b labels with it instead of training one
    # Hydra overrides of MAL's `model=mal` config (train and inference), e.g. [experiment=mal_quickstart]
    mal_overrides: List[str] = field(default_factory=list)
    # a box MAL gave no mask (its image could not be read, its mask came out empty): box = train on the box's
    # rectangle as its mask; drop_image = leave that image out of Mask Grounding DINO's training. Counted either way.
    missing_masks: str = "box"
    # the training boxes' true masks, where a user has them (a COCO json with the same annotation ids; the
    # synthetic dataset's own): the pseudo-masks' mIoU against them goes into pipeline.json
    train_mask_json: Optional[str] = None
