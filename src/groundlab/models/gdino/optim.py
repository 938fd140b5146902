"""AdamW parameter groups and learning-rate schedules for Grounding DINO (TAO `train.optim` keys).

Groups: the image backbone and the text encoder at `lr_backbone`; deformable sampling offsets and
reference-point heads at `lr * lr_linear_proj_mult` (Deformable DETR); everything else at `lr`.
Schedules run per optimizer step: linear warmup over `warmup_steps`, then MultiStep (decay by `lr_decay`
at the epochs in `lr_steps`) or cosine to zero at the end of training.
"""

from __future__ import annotations

import math
from typing import Dict, List, Sequence

import torch
from torch import nn

LINEAR_PROJ_NAMES = ("sampling_offsets", "reference_points")


def param_groups(model: nn.Module, optim_cfg) -> List[Dict]:
    """Trainable parameters split by learning rate (frozen ones are left out)."""
    backbone, linear_proj, rest = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith(("backbone.", "bert.")):
            backbone.append(p)
        elif any(key in name for key in LINEAR_PROJ_NAMES):
            linear_proj.append(p)
        else:
            rest.append(p)
    groups = [
        {"params": rest, "lr": optim_cfg.lr, "name": "base"},
        {"params": backbone, "lr": optim_cfg.lr_backbone, "name": "backbone"},
        {"params": linear_proj, "lr": optim_cfg.lr * optim_cfg.lr_linear_proj_mult, "name": "linear_proj"},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, optim_cfg) -> torch.optim.Optimizer:
    groups = param_groups(model, optim_cfg)
    if optim_cfg.optimizer.lower() == "adamw":
        return torch.optim.AdamW(groups, lr=optim_cfg.lr, weight_decay=optim_cfg.weight_decay)
    if optim_cfg.optimizer.lower() == "sgd":
        return torch.optim.SGD(groups, lr=optim_cfg.lr, momentum=optim_cfg.momentum, weight_decay=optim_cfg.weight_decay)
    raise ValueError(f"train.optim.optimizer={optim_cfg.optimizer!r}: use AdamW or SGD")


def lr_lambda(optim_cfg, steps_per_epoch: int, total_steps: int):
    """Multiplier of the base lr at a given optimizer step."""
    warmup = max(0, int(optim_cfg.warmup_steps))
    kind = optim_cfg.lr_scheduler.lower()
    milestones: Sequence[int] = [int(e) * steps_per_epoch for e in optim_cfg.lr_steps]

    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / warmup) if warmup else 1.0
        if kind == "multistep":
            return warm * optim_cfg.lr_decay ** sum(step >= m for m in milestones)
        if kind == "cosine":
            progress = min(1.0, max(0.0, (step - warmup) / max(1, total_steps - warmup)))
            return warm * 0.5 * (1.0 + math.cos(math.pi * progress))
        raise ValueError(f"train.optim.lr_scheduler={optim_cfg.lr_scheduler!r}: use MultiStep or cosine")

    return factor
