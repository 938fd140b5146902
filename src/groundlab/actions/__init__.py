"""The action registry: one module per action under groundlab.actions, each with `run(cfg) -> dict`.

Modules are named, not imported, so choosing an action imports only what it needs.
"""

from __future__ import annotations

import importlib
from typing import Callable, Dict

from omegaconf import DictConfig

ACTIONS: Dict[str, str] = {
    "visualize": "groundlab.actions.visualize",
    "inference": "groundlab.actions.inference",
    "train": "groundlab.actions.train",
    "evaluate": "groundlab.actions.evaluate",
}


def get_action(name: str) -> Callable[[DictConfig], Dict[str, float]]:
    """The `run` function of action `name`; an unknown name lists the available ones."""
    if name not in ACTIONS:
        from groundlab.config import ConfigError

        raise ConfigError(f"action.name={name!r} is not an action; available: {sorted(ACTIONS)}.")
    return importlib.import_module(ACTIONS[name]).run
