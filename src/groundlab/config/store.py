"""Registers every schema in Hydra's ConfigStore.

Each YAML of a group lists its schema first in its defaults (`- schema_gdino`), so Hydra merges
the YAML onto the dataclass: unknown keys and wrong types fail at compose time with the dotted key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from groundlab.config import schema_action as act
from groundlab.config import schema_autolabel as alb
from groundlab.config import schema_dataset as ds
from groundlab.config import schema_model as mdl
from groundlab.config import schema_quantize as qnt
from groundlab.config import schema_trt as trt


@dataclass
class RootConfig:
    """Top level: one node per config group plus run-wide settings."""

    model: Any = MISSING
    dataset: Any = MISSING
    action: Any = MISSING
    train: Any = MISSING
    evaluate: Any = MISSING
    inference: Any = MISSING
    quantize: Any = None  # post-training quantization (gdino, mask_gdino); absent for mal
    gen_trt_engine: Any = None  # TensorRT engine building (gdino, mask_gdino); absent for mal
    export: Any = None  # models with an export (conf/export/<model>.yaml); None for the others
    autolabel: Any = None  # action=autolabel's settings (conf/action/autolabel.yaml); None for the other actions
    seed: int = 42
    run_name: str = "default"  # the run dir is outputs/<model>/<action>/<run_name>: a rerun resumes there
    results_dir: str = "outputs"
    cache_dir: str = "~/.cache/groundlab"  # generated datasets, decompressed archives
    monitor: Optional[str] = None  # metric returned to a sweeper (e.g. val_mAP50)


# (group, schema name, dataclass): YAMLs name the schema in their defaults list.
SCHEMAS = [
    (None, "schema_root", RootConfig),
    ("model", "schema_gdino", mdl.GDinoModelConfig),
    ("model", "schema_mal", mdl.MALModelConfig),
    ("dataset", "schema_gdino", ds.DatasetConfig),
    ("dataset", "schema_mal", ds.MALDatasetConfig),
    ("action", "schema_action", act.ActionConfig),
    ("action", "schema_visualize", act.VisualizeActionConfig),
    ("train", "schema_gdino", act.GDinoTrainConfig),
    ("train", "schema_mal", act.MALTrainConfig),
    ("evaluate", "schema_gdino", act.GDinoEvaluateConfig),
    ("evaluate", "schema_mal", act.MALEvaluateConfig),
    ("inference", "schema_gdino", act.GDinoInferenceConfig),
    ("inference", "schema_mal", act.MALInferenceConfig),
    ("quantize", "schema_quantize", qnt.QuantizeConfig),
    ("gen_trt_engine", "schema_gen_trt_engine", trt.GenTrtEngineConfig),
    ("export", "schema_gdino", act.GDinoExportConfig),
    ("autolabel", "schema_autolabel", alb.AutolabelConfig),
]


def register_configs() -> None:
    """Store every schema (idempotent: storing again replaces the same entry)."""
    cs = ConfigStore.instance()
    for group, name, node in SCHEMAS:
        cs.store(group=group, name=name, node=node)
