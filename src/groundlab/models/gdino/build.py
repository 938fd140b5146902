"""Build Grounding DINO from config, or from any checkpoint (groundlab, HF, IDEA, TAO, mmdetection) with the structure the
checkpoint implies, so evaluate/inference/export never ask the user to repeat model settings."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, OmegaConf

from groundlab.config import ConfigError
from groundlab.config.schema_model import GDinoModelConfig
from groundlab.errors import MissingFile
from groundlab.io.remote_files import local_path
from groundlab.models.checkpoint import is_groundlab_checkpoint, save_checkpoint
from groundlab.models.gdino.criterion import SetCriterion, build_criterion
from groundlab.models.gdino.model import GroundingDINO
from groundlab.text.tokenizer import load_tokenizer, special_token_ids
from groundlab.models.gdino.weights import (
    LoadReport, apply_settings, checkpoint_state, detect_layout, hf_text_config, hf_weights_file, load_state,
    load_weights, model_config_from_hf, read_checkpoint_file,
)
from groundlab.models.gdino.mmdet_keys import mmdet_model_settings

log = logging.getLogger(__name__)


@dataclass
class BuiltModel:
    model: GroundingDINO
    config: DictConfig  # the structural model config actually used
    class_names: Optional[List[str]]  # label map stored in a groundlab checkpoint
    report: Optional[LoadReport]


GDINO_MODELS = ("gdino", "mask_gdino")  # the groundlab checkpoints this builder reads

# keys older groundlab checkpoints carry that no code reads any more (removed, not renamed)
RETIRED_MODEL_KEYS = ("num_mask_points",)


def typed_model_config(fields: Dict[str, Any]) -> DictConfig:
    """A model config checked against the schema (unknown keys fail naming them; retired ones are dropped)."""
    return OmegaConf.merge(OmegaConf.structured(GDinoModelConfig),
                           {k: v for k, v in fields.items() if k not in RETIRED_MODEL_KEYS})


def _bert_from_config(config: Dict[str, Any]):
    from transformers import BertConfig, BertModel

    clean = {k: v for k, v in config.items() if k not in ("model_type", "transformers_version", "architectures")}
    return BertModel(BertConfig(**clean), add_pooling_layer=False)


def network(cfg: DictConfig, bert=None) -> GroundingDINO:
    """The network of a model config: MaskGroundingDINO when model.has_mask (model=mask_gdino), else
    GroundingDINO; random weights (the text encoder's pretrained ones unless text_encoder_pretrained is off)."""
    if cfg.get("has_mask"):
        from groundlab.models.mask_gdino.model import MaskGroundingDINO

        return MaskGroundingDINO(cfg, phrase_delimiters(cfg), bert=bert)
    return GroundingDINO(cfg, phrase_delimiters(cfg), bert=bert)


def criterion_for(cfg: DictConfig) -> SetCriterion:
    """The training losses of a model config: Mask Grounding DINO's (Grounding DINO's plus focal + dice on the
    masks, weights mask_loss_coef / dice_loss_coef, plus the region head's with num_region_queries > 0, weights
    rela_*_loss_coef) when model.has_mask, else Grounding DINO's."""
    if cfg.get("has_mask"):
        from groundlab.models.mask_gdino.criterion import MaskSetCriterion

        weights = {"loss_mask": cfg.mask_loss_coef, "loss_dice": cfg.dice_loss_coef}
        if int(cfg.get("num_region_queries", 0) or 0) > 0:
            weights.update({"loss_nt": cfg.rela_nt_loss_coef, "loss_minimap": cfg.rela_minimap_loss_coef,
                            "loss_union": cfg.rela_union_mask_loss_coef})
        return build_criterion(cfg, MaskSetCriterion, weights)
    return build_criterion(cfg)


def phrase_delimiters(model_cfg: DictConfig) -> List[int]:
    """Special token ids of `model.text_encoder_type`'s vocab; TextEncoderNotFound names the path tried."""
    return special_token_ids(load_tokenizer(model_cfg.text_encoder_type))


def build_gdino(model_cfg: DictConfig, checkpoint: Optional[str] = None) -> BuiltModel:
    """The model of `model_cfg` with random weights, or of `checkpoint`:
    groundlab .pth -> its stored config; HF directory -> its config.json; IDEA or TAO .pth -> `model_cfg`;
    mmdetection (MM-Grounding-DINO) .pth -> `model_cfg` with the head settings its weights / config text fix.
    A file may be an s3:// / gs:// / https:// URI, fetched once into the cache (not an HF directory)."""
    if checkpoint is None:
        return BuiltModel(network(model_cfg), model_cfg, None, None)
    path = os.path.expanduser(local_path(checkpoint, key="checkpoint"))
    if os.path.isdir(path) and hf_weights_file(path) and os.path.isfile(os.path.join(path, "config.json")):
        cfg = typed_model_config(model_config_from_hf(path))
        from transformers import BertModel

        model = network(cfg, bert=BertModel(hf_text_config(path), add_pooling_layer=False))
        report = load_weights(model, path)
        log.info(report.summary())
        return BuiltModel(model, cfg, None, report)
    if not os.path.exists(path):
        raise MissingFile(f"checkpoint not found: {path}")
    obj = None if hf_weights_file(path) else read_checkpoint_file(path)
    if is_groundlab_checkpoint(obj):
        if obj.get("model_name", "gdino") not in GDINO_MODELS:
            raise ConfigError(f"{path} is a model={obj.get('model_name')} checkpoint; model=gdino and model=mask_gdino "
                              f"read Grounding DINO checkpoints (run it with model={obj.get('model_name')}).")
        cfg = typed_model_config(obj["model_config"])
        bert = _bert_from_config(obj["text_config"]) if obj.get("text_config") else None
        if bert is None:
            cfg.text_encoder_pretrained = False
        model = network(cfg, bert=bert)
        report = load_state(model, checkpoint_state(obj), path, "groundlab")
        log.info(report.summary())
        return BuiltModel(model, cfg, obj.get("class_names"), report)
    cfg = model_cfg.copy()
    cfg.text_encoder_pretrained = False  # the checkpoint carries the text encoder's weights
    if obj is not None and detect_layout(obj) == "mmdet":
        changed = apply_settings(cfg, mmdet_model_settings(obj))
        if changed:
            log.info("mmdetection checkpoint %s: %s (from its weights and config text)", path, " ".join(changed))
    model = network(cfg)
    report = load_weights(model, path)
    log.info(report.summary())
    return BuiltModel(model, cfg, None, report)


def save_gdino(path: str, model: GroundingDINO, model_cfg: DictConfig, class_names: Optional[List[str]] = None,
               meta: Optional[Dict[str, Any]] = None) -> str:
    """A groundlab checkpoint that rebuilds offline: structure, BERT config, weights, label map."""
    return save_checkpoint(path, model, model_cfg, class_names, meta, extra={"text_config": model.bert.config.to_dict()})
