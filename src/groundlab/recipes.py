"""The one table of what runs: (model, action) -> the function that runs it, as "module:function" strings so
choosing a pair imports only what it needs. Actions never test model names; a new model or backend adds rows.

`python run.py --help` prints this table as a matrix; an unsupported pair fails at start-up naming the pairs
that exist.
"""

from __future__ import annotations

import importlib
from typing import Callable, Dict, Tuple

from omegaconf import DictConfig

from groundlab.config import ConfigError

MODELS = ("gdino", "mask_gdino", "mal")
ACTIONS = ("train", "evaluate", "inference", "visualize", "export", "quantize", "gen_trt_engine", "autolabel")

RECIPES: Dict[Tuple[str, str], str] = {
    ("gdino", "train"): "groundlab.actions.train:train_gdino",
    ("gdino", "evaluate"): "groundlab.actions.evaluate:run",
    ("gdino", "inference"): "groundlab.actions.inference:run",
    ("gdino", "visualize"): "groundlab.actions.visualize:run",
    ("gdino", "export"): "groundlab.actions.export:run",
    # Mask Grounding DINO shares the Grounding DINO recipes: its network, losses and predictor outputs carry the masks
    ("mask_gdino", "train"): "groundlab.actions.train:train_gdino",
    ("mask_gdino", "evaluate"): "groundlab.actions.evaluate:run",
    ("mask_gdino", "inference"): "groundlab.actions.inference:run",
    ("mask_gdino", "visualize"): "groundlab.actions.visualize:run",
    # TensorRT engines from an ONNX file: TAO's action name; conf/action/trt.yaml makes action=trt the same action
    ("gdino", "gen_trt_engine"): "groundlab.actions.gen_trt_engine:run",
    ("mask_gdino", "gen_trt_engine"): "groundlab.actions.gen_trt_engine:run",
    ("mask_gdino", "export"): "groundlab.actions.export:run",
    # post-training quantization to an int8 Q/DQ graph, evaluated against the float one
    ("gdino", "quantize"): "groundlab.actions.quantize:run",
    ("mask_gdino", "quantize"): "groundlab.actions.quantize:run",
    # boxes (or a class list) -> MAL pseudo-masks -> Mask Grounding DINO trained on them -> segm mAP
    ("mask_gdino", "autolabel"): "groundlab.actions.autolabel:run",
    ("mal", "train"): "groundlab.actions.train:train_mal",
    ("mal", "evaluate"): "groundlab.actions.mal_evaluate:run",
    ("mal", "inference"): "groundlab.actions.mal_inference:run",
}

# one line per action for --help
ACTION_HELP = {
    "train": "train (checkpoints, exact resume with the same command, validation each interval)",
    "evaluate": "metrics of a checkpoint on an annotated split, written to results.json",
    "inference": "predictions on images or boxes: annotated images, KITTI / COCO json, masks",
    "visualize": "draw a dataset's ground truth as the data pipeline delivers it",
    "export": "ONNX export (TAO names, dynamic batch), checked in onnxruntime against PyTorch",
    "quantize": "INT8 post-training quantization (ONNX Runtime, ModelOpt): a Q/DQ graph, its mAP vs float",
    "gen_trt_engine": "TensorRT engine from an ONNX file, FP32/FP16/FP8/INT8 (action=trt is the same)",
    "autolabel": "boxes or a class list -> MAL masks -> Mask Grounding DINO trained on them; resumable steps",
}


def check_recipe(model: str, action: str) -> None:
    """ConfigError with one sentence naming the pairs that exist, for a pair without a recipe."""
    if (model, action) not in RECIPES:
        pairs = ", ".join(f"{a}" for m, a in RECIPES if m == model)
        raise ConfigError(
            f"model={model} action={action} does not exist; model={model} supports action={{{pairs}}} "
            f"(every pair: python run.py --help).")


def get_recipe(cfg: DictConfig) -> Callable[[DictConfig], Dict[str, float]]:
    """The function that runs cfg.model.name x cfg.action.name."""
    check_recipe(cfg.model.name, cfg.action.name)
    module, function = RECIPES[(cfg.model.name, cfg.action.name)].split(":")
    return getattr(importlib.import_module(module), function)


def matrix() -> str:
    """The model x action table for --help: `x` where a recipe exists, `-` where none does."""
    width = max(len(m) for m in MODELS) + 2
    cols = [max(9, len(a)) for a in ACTIONS]
    head = " " * width + "  ".join(f"{a:<{c}}" for a, c in zip(ACTIONS, cols))
    rows = [f"{m:<{width}}" + "  ".join(f"{'x' if (m, a) in RECIPES else '-':<{c}}" for a, c in zip(ACTIONS, cols))
            for m in MODELS]
    lines = [head.rstrip()] + [r.rstrip() for r in rows] + [""]
    lines += [f"{a + ':':<16}{ACTION_HELP[a]}" for a in ACTIONS]
    return "\n".join(lines)
