"""TAO's other names for our canonical keys, in one table per model, resolved at start-up (by check_config,
before the checks and before any heavy import).

An alias is an Optional field of the schema (None: not given). Given a value, it is copied onto its canonical
key with one log line naming both. Given with the canonical key also set (to a value other than the schema's
default) and different, it is an error naming both. Code reads only the canonical key.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List

from omegaconf import DictConfig, ListConfig, OmegaConf

log = logging.getLogger(__name__)

# model name -> {alias dotted key: canonical dotted key}
ALIASES: Dict[str, Dict[str, str]] = {
    "mal": {
        "train.save_every_k_epoch": "train.checkpoint_interval",  # TAO MAL's older checkpoint key
        "train.val_interval": "train.validation_interval",  # TAO MAL's older validation key
        "model.load_mask": "dataset.load_mask",  # TAO MAL keeps data keys under model
        "model.crop_size": "dataset.crop_size",
        "train.test_margin_rate": "model.test_margin_rate",  # test-time keys: evaluate/inference read model.*
        "train.mask_thres": "model.mask_thres",
    },
}


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value) if isinstance(value, (DictConfig, ListConfig)) else value


def resolve_aliases(cfg: DictConfig, errors: List[str]) -> None:
    """Copy every alias given a value onto its canonical key in `cfg` (in place). The alias wins: a composed
    config cannot tell a value the user typed from one a preset or experiment YAML set, so refusing a
    difference would refuse valid specs (e.g. `model.crop_size` over dataset=mal_synthetic's crop size).
    `errors` is kept for the checks' signature."""
    for alias, canonical in ALIASES.get(cfg.model.name, {}).items():
        value = _plain(OmegaConf.select(cfg, alias))
        if value is None:
            continue
        current = _plain(OmegaConf.select(cfg, canonical))
        if current == value:
            continue
        OmegaConf.update(cfg, canonical, value, merge=False)
        log.info("%s=%s (TAO's name) sets %s (was %s)", alias, value, canonical, current)
