"""Typed config schemas (dataclasses in Hydra's ConfigStore) and cross-field checks.

Importing this package is cheap (no torch): run.py registers the schemas before Hydra composes.
"""

from groundlab.config.checks import ConfigError, check_config
from groundlab.config.store import register_configs

__all__ = ["ConfigError", "check_config", "register_configs"]
