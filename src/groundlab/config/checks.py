"""Cross-field checks: rules a single typed field cannot express, each failing with one sentence
that names the keys involved. Run by run.py right after composition, before any heavy import."""

from __future__ import annotations

from typing import Callable, List

from omegaconf import DictConfig

from groundlab.errors import UserError

from groundlab.config.schema_dataset import DATASET_TYPES, MAL_DATASET_TYPES
from groundlab.config.schema_model import MODEL_NAMES


class ConfigError(UserError, ValueError):
    """A config value (or combination of values) that cannot work; the message names the keys."""


def _check_model(cfg: DictConfig, errors: List[str]) -> None:
    m = cfg.model
    if m.name not in MODEL_NAMES:
        errors.append(f"model.name={m.name!r} is not one of {list(MODEL_NAMES)}.")
        return
    if m.name == "mal":
        if cfg.train.distributed_strategy not in ("ddp",):
            errors.append(f"train.distributed_strategy={cfg.train.distributed_strategy!r}: MAL trains with ddp (its "
                          f"EMA teacher pairs the student's parameters one by one, which sharding would split).")
        return
    n_interm = len(m.return_interm_indices)
    if m.num_feature_levels < n_interm:
        errors.append(
            f"model.num_feature_levels={m.num_feature_levels} is smaller than the "
            f"{n_interm} backbone levels in model.return_interm_indices={list(m.return_interm_indices)}."
        )
    if any(i < 0 or i > 3 for i in m.return_interm_indices) or sorted(set(m.return_interm_indices)) != list(
        m.return_interm_indices
    ):
        errors.append(
            f"model.return_interm_indices={list(m.return_interm_indices)} must be increasing stage indices in 0..3."
        )
    if m.num_queries < m.num_select:
        errors.append(f"model.num_queries={m.num_queries} must be >= model.num_select={m.num_select}.")
    if m.hidden_dim % m.nheads:
        errors.append(f"model.hidden_dim={m.hidden_dim} must be divisible by model.nheads={m.nheads}.")
    if m.log_scale is not None and m.log_scale != "auto" and not isinstance(m.log_scale, (int, float)):
        errors.append(f"model.log_scale={m.log_scale!r} must be null, auto or a number.")
    if m.max_text_len < 4:
        errors.append(f"model.max_text_len={m.max_text_len} leaves no room for a prompt ([CLS] name . [SEP]).")


def _check_dataset(cfg: DictConfig, errors: List[str]) -> None:
    d, model = cfg.dataset, cfg.model.name
    wanted = MAL_DATASET_TYPES if model == "mal" else DATASET_TYPES
    if d.type not in wanted:
        errors.append(
            f"model={model} reads dataset.type in {list(wanted)}, but dataset.type={d.type!r} "
            f"(choose e.g. dataset={wanted[-1]})."
        )
        return
    if not 0.0 <= d.max_bad_image_fraction <= 1.0:
        errors.append(f"dataset.max_bad_image_fraction={d.max_bad_image_fraction} must be in [0, 1] (the share of "
                      f"training images that may fail to decode before training stops).")
    if model == "mal":
        if d.min_obj_size > d.max_obj_size:
            errors.append(f"dataset.min_obj_size={d.min_obj_size} exceeds dataset.max_obj_size={d.max_obj_size}.")
        return
    a = d.augmentation
    if a.train_random_crop_min > a.train_random_crop_max:
        errors.append(
            f"dataset.augmentation.train_random_crop_min={a.train_random_crop_min} exceeds "
            f"dataset.augmentation.train_random_crop_max={a.train_random_crop_max}."
        )
    if not a.scales:
        errors.append("dataset.augmentation.scales is empty: training needs at least one resize scale.")
    if not 0.0 <= a.horizontal_flip_prob <= 1.0:
        errors.append(f"dataset.augmentation.horizontal_flip_prob={a.horizontal_flip_prob} is not in [0, 1].")
    if len(a.input_mean) != 3 or len(a.input_std) != 3 or min(a.input_std) <= 0:
        errors.append("dataset.augmentation.input_mean/input_std need 3 values each, std > 0.")
    if a.fixed_input_size is not None and (len(a.fixed_input_size) != 2 or min(a.fixed_input_size) <= 0):
        errors.append(f"dataset.augmentation.fixed_input_size={list(a.fixed_input_size)} must be [height, width].")
    if d.max_labels < 1:
        errors.append(f"dataset.max_labels={d.max_labels} must be >= 1.")
    if d.type in ("odvg", "coco") and cfg.action.name == "train" and not d.train_data_sources:
        errors.append(f"dataset.type={d.type} with action=train needs dataset.train_data_sources.")


def _check_synthetic(cfg: DictConfig, errors: List[str]) -> None:
    if not cfg.dataset.type.endswith("synthetic"):
        return
    s = cfg.dataset.synthetic
    if s.min_objects > s.max_objects:
        errors.append(f"dataset.synthetic.min_objects={s.min_objects} exceeds max_objects={s.max_objects}.")
    if len(s.image_size) != 2 or min(s.image_size) < 16:
        errors.append(f"dataset.synthetic.image_size={list(s.image_size)} must be [height, width], each >= 16.")


CHECKS: List[Callable[[DictConfig, List[str]], None]] = [_check_model, _check_dataset, _check_synthetic]


def check_config(cfg: DictConfig) -> None:
    """Raise ConfigError listing every cross-field problem of a composed config."""
    errors: List[str] = []
    for check in CHECKS:
        check(cfg, errors)
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))
