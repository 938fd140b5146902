"""The root config composed from `conf/` with a list of overrides, exactly as `python run.py <overrides>` would
compose it: for an action that runs other (model, action) pairs as its steps (action=autolabel).

Inside `run.py` Hydra is initialized with conf/ on its search path and that is what composes; elsewhere (a test,
a benchmark, a notebook) conf/ is found beside src/."""

from __future__ import annotations

import os
from typing import Sequence

from omegaconf import DictConfig

CONF_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "conf")


def compose_config(overrides: Sequence[str]) -> DictConfig:
    """The composed root config of `overrides` (Hydra override strings: `model=mal`, `train.lr=1e-4`, ...).
    A bad override raises Hydra's own error, which names it."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from groundlab.config.store import register_configs

    register_configs()
    if GlobalHydra.instance().is_initialized():
        return compose(config_name="config", overrides=list(overrides))
    with initialize_config_dir(config_dir=os.path.normpath(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))
