"""Build MAL's network from the config, and rebuild it from a groundlab MAL checkpoint."""

from __future__ import annotations

import logging
from typing import Any, Dict, Tuple

import torch
from omegaconf import OmegaConf

from groundlab.models.checkpoint import load_checkpoint
from groundlab.models.mal.network import MALNetwork

log = logging.getLogger(__name__)


def build_mal_network(model_cfg, crop_size: int) -> MALNetwork:
    """MALNetwork of `model` config fields (a DictConfig or a plain dict) for square `crop_size` crops."""
    m = OmegaConf.create(model_cfg) if isinstance(model_cfg, dict) else model_cfg
    net = MALNetwork(m.arch, int(crop_size), m.mask_head_hidden_channel, m.mask_head_out_channel,
                     m.mask_head_num_convs, m.mask_scale_ratio, m.mask_scale_ratio_pre, not m.not_adjust_scale,
                     m.vit_dpr, m.get("vit_overrides"))
    net.backbone.freeze(list(m.frozen_stages) or [-1])
    return net


def network_state(ckpt: Dict[str, Any], which: str) -> Dict[str, torch.Tensor]:
    """The `which` ("student" or "teacher") network's weights out of a MAL checkpoint's state dict."""
    prefix = which + "."
    state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    if not state:
        raise ValueError(f"checkpoint holds no {which} weights (keys start with "
                         f"{sorted({k.split('.')[0] for k in ckpt['state_dict']})})")
    return state


def load_mal_network(path: str, which: str = "student") -> Tuple[MALNetwork, Dict[str, Any]]:
    """(network in eval mode, checkpoint dict) from a groundlab MAL checkpoint; ValueError names the file."""
    ckpt = load_checkpoint(path)
    if ckpt.get("model_name") != "mal":
        raise ValueError(f"{path}: a {ckpt.get('model_name')!r} checkpoint, not a MAL one")
    net = build_mal_network(ckpt["model_config"], int(ckpt["crop_size"]))
    net.load_state_dict(network_state(ckpt, which))
    return net.eval(), ckpt

