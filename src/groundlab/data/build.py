"""One place that turns a composed config into datasets and a collator for a split."""

from __future__ import annotations

from typing import Tuple

from omegaconf import DictConfig

from groundlab.data.collate import GroundingCollator
from groundlab.errors import DataError
from groundlab.data.grounding_dataset import GroundingDataset
from groundlab.data.mask_checks import check_masks_on_every_box, check_segm_ground_truth
from groundlab.data.sources import load_split
from groundlab.text.tokenizer import load_tokenizer
from groundlab.text.tokens import PromptEncoder
from groundlab.data.transforms import build_eval_transforms, build_train_transforms


def build_prompt_encoder(model: DictConfig) -> PromptEncoder:
    return PromptEncoder(load_tokenizer(model.text_encoder_type), model.max_text_len)


def build_grounding_dataset(
    cfg: DictConfig, split: str, augment: bool, encoder: PromptEncoder = None
) -> Tuple[GroundingDataset, GroundingCollator]:
    """Dataset of `split` ("train" | "val" | "test") with training (augment=True) or eval transforms.

    model=mask_gdino: every box of every record must have a mask, and a COCO json of val/test must carry what
    COCO segm evaluation needs (data.mask_checks); both fail here, before training, naming file and record.
    Records without boxes stay valid samples (target["masks"] of shape (0, H, W))."""
    encoder = encoder or build_prompt_encoder(cfg.model)
    want_masks = cfg.model.name == "mask_gdino"
    sources = load_split(cfg.dataset, cfg.cache_dir, split, use_masks=want_masks or cfg.action.name == "visualize")
    if not sources or not sum(len(s.records) for s in sources):
        raise DataError(f"dataset.{split}_data_sources holds no images")
    if want_masks:  # every record now, not when its sample is first loaded
        if split != "train":
            for s in sources:
                if s.name.endswith(".json"):  # the evaluation ground truth
                    check_segm_ground_truth(s.name)
        check_masks_on_every_box(sources, f"dataset.{split}_data_sources")
        has_masks = True
    else:
        has_masks = all(_has_masks(s) for s in sources)
    aug = cfg.dataset.augmentation
    transforms = build_train_transforms(aug) if augment else build_eval_transforms(aug)
    dataset = GroundingDataset(
        sources, encoder, transforms, train=split == "train", max_labels=cfg.dataset.max_labels,
        seed=cfg.seed, load_masks=has_masks, max_bad_image_fraction=cfg.dataset.max_bad_image_fraction,
    )
    return dataset, GroundingCollator(encoder)


def _has_masks(source) -> bool:
    """Other models load masks (to draw them) when the source carries them, judged on its first annotated
    record: nothing trains on them, so no full scan."""
    for i in range(len(source.records)):
        rec = source.records[i]
        if rec["boxes"]:
            return rec["masks"] is not None
    return False
