"""Pretrained MAE weights into MAL's ViT backbone, from a local path:

- a transformers directory (`config.json` + weights) of ViTMAEModel / ViTMAEForPreTraining / ViTModel,
  e.g. a download of facebook/vit-mae-base: transformers reads it, old key names included;
- the official MAE checkpoint (`mae_pretrain_vit_base.pth`: {"model": {"blocks.0.attn.qkv.weight", ...}}),
  its fused qkv split into q/k/v, its MAE decoder ignored;
- a flat state dict in transformers' layout (`.pth`/`.bin`/`.safetensors`, with or without `vit.`).

Position embeddings of another grid (another pretraining resolution) are resized bicubically to the
crop size's grid. Keys that fit nowhere are reported; missing backbone keys are an error."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Dict, List

import torch

from groundlab.io.remote_files import local_path
from groundlab.models.mal.vit_backbone import ViTBackbone, resize_position_embeddings

# Official MAE (timm) names -> transformers ViT names (`{i}` = block index).
_MAE_KEYS = [
    (r"^cls_token$", "embeddings.cls_token"),
    (r"^pos_embed$", "embeddings.position_embeddings"),
    (r"^patch_embed\.proj\.(weight|bias)$", r"embeddings.patch_embeddings.projection.\1"),
    (r"^blocks\.(\d+)\.norm1\.(weight|bias)$", r"layers.\1.layernorm_before.\2"),
    (r"^blocks\.(\d+)\.norm2\.(weight|bias)$", r"layers.\1.layernorm_after.\2"),
    (r"^blocks\.(\d+)\.attn\.proj\.(weight|bias)$", r"layers.\1.attention.o_proj.\2"),
    (r"^blocks\.(\d+)\.mlp\.fc1\.(weight|bias)$", r"layers.\1.mlp.fc1.\2"),
    (r"^blocks\.(\d+)\.mlp\.fc2\.(weight|bias)$", r"layers.\1.mlp.fc2.\2"),
    (r"^norm\.(weight|bias)$", r"layernorm.\1"),
]
# Parts of an MAE pretraining checkpoint that MAL does not use.
_IGNORED = re.compile(r"^(decoder|mask_token|fc_norm|head|pooler|embeddings\.mask_token)")


@dataclass
class LoadReport:
    path: str
    loaded: int = 0
    resized_position_embeddings: bool = False
    ignored: List[str] = field(default_factory=list)

    def summary(self) -> str:
        extra = ", position embeddings resized" if self.resized_position_embeddings else ""
        ignored = f", {len(self.ignored)} unused keys (e.g. {self.ignored[:3]})" if self.ignored else ""
        return f"MAE weights from {self.path}: {self.loaded} tensors{extra}{ignored}"


def _from_official(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    out: Dict[str, torch.Tensor] = {}
    for key, value in state.items():
        m = re.match(r"^blocks\.(\d+)\.attn\.qkv\.(weight|bias)$", key)
        if m:  # fused (3C, C) -> three (C, C)
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                out[f"layers.{m.group(1)}.attention.{name}.{m.group(2)}"] = part
            continue
        for pattern, repl in _MAE_KEYS:
            if re.match(pattern, key):
                out[re.sub(pattern, repl, key)] = value
                break
        else:
            out[key] = value  # reported below unless ignored
    return out


def _read_file(path: str) -> Dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("model", "state_dict", "module"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not a state dict")
    if any(k.startswith("blocks.") for k in state):
        return _from_official(state)
    return {k[len("vit."):] if k.startswith("vit.") else k: v for k, v in state.items()}


def _read_hf_dir(path: str) -> Dict[str, torch.Tensor]:
    import json

    from transformers import ViTMAEModel, ViTModel

    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        model_type = json.load(f).get("model_type")
    from transformers.utils import logging as hf_logging

    cls = ViTModel if model_type == "vit" else ViTMAEModel
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the MAE decoder's weights are unused by design: no table of them
    try:
        return cls.from_pretrained(path).state_dict()
    finally:
        hf_logging.set_verbosity(verbosity)


def load_mae_weights(backbone: ViTBackbone, path: str) -> LoadReport:
    """Load `path` into `backbone.vit` (see module doc; a file may be an s3:// / gs:// / https:// URI, fetched
    once into the cache). ValueError naming the file on a mismatch."""
    path = os.path.expanduser(local_path(path, key="model.pretrained_path"))
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ValueError(f"{path}: a directory of pretrained weights needs a transformers config.json")
        state = _read_hf_dir(path)
    elif os.path.isfile(path):
        state = _read_file(path)
    else:
        raise ValueError(f"model.pretrained_path={path!r} does not exist")
    report = LoadReport(path)
    target = backbone.vit.state_dict()
    pos_key = "embeddings.position_embeddings"
    if pos_key in state and state[pos_key].shape != target[pos_key].shape:
        grid = backbone.config.image_size // backbone.patch_size
        state[pos_key] = resize_position_embeddings(state[pos_key], grid)
        report.resized_position_embeddings = True
    usable = {}
    for key, value in state.items():
        if key in target:
            if value.shape != target[key].shape:
                raise ValueError(f"{path}: {key} has shape {tuple(value.shape)}, model.arch needs "
                                 f"{tuple(target[key].shape)} (wrong model.arch for these weights?)")
            usable[key] = value
        elif _IGNORED.match(key):
            report.ignored.append(key)
        else:
            raise ValueError(f"{path}: key {key!r} fits no parameter of the ViT backbone")
    missing = sorted(set(target) - set(usable))
    if missing:
        raise ValueError(f"{path}: {len(missing)} backbone tensors missing, e.g. {missing[:5]}")
    backbone.vit.load_state_dict(usable)
    report.loaded = len(usable)
    return report
