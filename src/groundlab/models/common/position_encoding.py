"""Sine position encodings: 2-D over a feature map (DETR / Grounding DINO, temperature 20 for the image
levels) and per-coordinate over normalized boxes or text position ids (temperature 10000)."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn


class SinePositionEmbedding2D(nn.Module):
    """(B, 2 * num_pos_feats, H, W) from a (B, H, W) padding mask (True on padding): [pos_y, pos_x],
    each normalized to 2*pi over the valid extent, so padding does not shift the encoding."""

    def __init__(self, num_pos_feats: int, temperature_h: float = 20, temperature_w: float = 20):
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature_h = temperature_h
        self.temperature_w = temperature_w
        self.scale = 2 * math.pi

    def _dim_t(self, temperature: float, device) -> torch.Tensor:
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=device)
        return temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_pos_feats)

    def forward(self, padding_mask: torch.Tensor) -> torch.Tensor:
        not_mask = ~padding_mask
        y_embed = not_mask.cumsum(1, dtype=torch.float32)
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        eps = 1e-6
        y_embed = y_embed / (y_embed[:, -1:, :] + eps) * self.scale
        x_embed = x_embed / (x_embed[:, :, -1:] + eps) * self.scale
        pos_x = x_embed[:, :, :, None] / self._dim_t(self.temperature_w, padding_mask.device)
        pos_y = y_embed[:, :, :, None] / self._dim_t(self.temperature_h, padding_mask.device)
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


def sine_embed(pos: torch.Tensor, num_pos_feats: int, temperature: float = 10000, exchange_xy: bool = True) -> torch.Tensor:
    """(..., n * num_pos_feats) from (..., n) coordinates in [0, 1] (or integer position ids).

    Each coordinate gets interleaved sin/cos features; with exchange_xy the first two blocks are swapped
    so boxes (cx, cy, w, h) encode as [y, x, w, h], as DINO's decoder queries do."""
    scale = 2 * math.pi
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=pos.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_pos_feats)
    embeds = []
    for coord in pos.unbind(-1):
        e = coord[..., None].float() * scale / dim_t
        embeds.append(torch.stack((e[..., 0::2].sin(), e[..., 1::2].cos()), dim=-1).flatten(-2))
    if exchange_xy and len(embeds) >= 2:
        embeds[0], embeds[1] = embeds[1], embeds[0]
    return torch.cat(embeds, dim=-1).to(pos.dtype if pos.is_floating_point() else torch.float32)


def inverse_sigmoid(x: torch.Tensor, eps: Optional[float] = 1e-5) -> torch.Tensor:
    """logit(x) with x clamped to [eps, 1 - eps] (transformers' Grounding DINO uses 1e-5; IDEA's code
    1e-3: the two differ only for references within 1e-3 of the image border)."""
    return torch.special.logit(x, eps=eps)
