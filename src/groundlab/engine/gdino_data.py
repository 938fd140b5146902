"""The Grounding DINO data module: train (augmented, sampled prompts) and val (eval transforms, all class
names) datasets and their loaders, built from the `dataset` config before training starts, so a missing
image, an empty validation set or a bad annotation fails at once, not hours in. Without a val source (its
json_file not given) the run trains without validation and says so."""

from __future__ import annotations

import logging
from typing import List, Optional

from omegaconf import DictConfig

from groundlab.data.build import build_grounding_dataset, build_prompt_encoder
from groundlab.data.sources import resolve_sources
from groundlab.engine.data_base import ResumableDataModule
from groundlab.errors import DataError

log = logging.getLogger(__name__)


class GroundingDataModule(ResumableDataModule):
    """Attributes after `prepare()`: train_set, val_set, collate, val_gt_json (COCO GT path or None),
    val_category_ids (class index -> original id, or None), class_names (label map of the first train source),
    val_referring (the validation source holds referring expressions, data_type VG: scored by the referring
    metrics rather than COCO, so it needs no COCO json)."""

    def __init__(self, cfg: DictConfig):
        super().__init__(cfg.seed)
        self.cfg = cfg
        self.train_set = self.val_set = self.collate = None
        self.val_gt_json: Optional[str] = None
        self.val_category_ids: Optional[List[int]] = None
        self.val_referring = False
        self.class_names: Optional[List[str]] = None

    def prepare(self) -> "GroundingDataModule":
        """Read annotations and check images now (in the launching process)."""
        encoder = build_prompt_encoder(self.cfg.model)
        self.train_set, self.collate = build_grounding_dataset(self.cfg, "train", augment=True, encoder=encoder)
        self.class_names = self.train_set.sources[0].class_names or None
        if not self._has_val():
            log.info("no dataset.val_data_sources: training without validation (checkpoints only)")
            return self
        self.val_set, _ = build_grounding_dataset(self.cfg, "val", augment=False, encoder=encoder)
        val_source = self.val_set.sources[0]
        self.val_referring = val_source.data_type == "VG"
        if not self.val_referring and not val_source.name.endswith(".json"):
            raise DataError("dataset.val_data_sources.json_file must be a COCO json (the evaluation ground truth)")
        self.val_gt_json = val_source.name
        self.val_category_ids = val_source.category_ids
        return self

    def _has_val(self) -> bool:
        return resolve_sources(self.cfg.dataset, self.cfg.cache_dir)["val"] is not None

    def train_dataloader(self):
        d = self.cfg.dataset
        return self.loader(self.train_set, d.batch_size, True, d.workers, self.collate, d.pin_memory)

    def val_dataloader(self):
        if self.val_set is None:
            return []
        d = self.cfg.dataset
        return self.loader(self.val_set, d.batch_size, False, d.workers, self.collate, d.pin_memory)
