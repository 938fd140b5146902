"""Runs one composed config: cross-field checks, the (model, action) recipe, seeding, the run record, then
the recipe's function."""

from __future__ import annotations

import logging
from typing import Dict, Optional

from omegaconf import DictConfig

from groundlab.config import ConfigError, check_config
from groundlab.console import quiet_libraries
from groundlab.io.remote_files import use_cache_dir
from groundlab.recipes import check_recipe, get_recipe
from groundlab.run_record import write_run_record

log = logging.getLogger(__name__)

__all__ = ["ConfigError", "monitored", "run_action"]


def run_action(cfg: DictConfig) -> Dict[str, float]:
    """Check `cfg`, seed everything, write the run record, run the recipe; return its metrics."""
    check_recipe(cfg.model.name, cfg.action.name)
    check_config(cfg)  # TAO's aliases resolved, every value checked: before the recipe's heavy imports
    action = get_recipe(cfg)
    import torch

    quiet_libraries()
    torch.manual_seed(cfg.seed)
    use_cache_dir(cfg.cache_dir)  # s3:// / https:// checkpoints fetched by model loaders go to the run's cache
    record = write_run_record(cfg)
    log.info("run dir: %s", record)
    metrics = action(cfg) or {}
    for key, value in metrics.items():
        log.info("%s: %s", key, value)
    return metrics


def monitored(cfg: DictConfig, metrics: Dict[str, float]) -> Optional[float]:
    """The value of `cfg.monitor` among the metrics (what a sweeper optimizes), None without a monitor."""
    if cfg.monitor is None:
        return None
    if cfg.monitor not in metrics:
        if cfg.action.name != "train":  # experiments set the training monitor; evaluate/inference report others
            return None
        raise ConfigError(f"monitor={cfg.monitor!r} is not among the action's metrics {sorted(metrics)}.")
    return float(metrics[cfg.monitor])
