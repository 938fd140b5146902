"""Multi-scale deformable attention (Deformable DETR) in pure PyTorch.

The sampling runs on `F.grid_sample`, so it works on CPU and GPU, under fp16/bf16 autocast, and exports
to ONNX (opset >= 16 has GridSample) without custom ops or a CUDA build.
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F


def ms_deform_attn_core(
    value: torch.Tensor,
    spatial_shapes: List[Tuple[int, int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Bilinear samples of every level, weighted and summed.

    value:               (B, S, heads, head_dim), S = sum(H_l * W_l), levels flattened in order.
    spatial_shapes:      [(H_l, W_l)] per level, as Python ints (static shapes for tracing).
    sampling_locations:  (B, Q, heads, levels, points, 2), normalized (x, y) in [0, 1].
    attention_weights:   (B, Q, heads, levels, points), softmax over levels * points.
    Returns (B, Q, heads * head_dim).
    """
    B, _, heads, head_dim = value.shape
    _, Q, _, levels, points, _ = sampling_locations.shape
    value_list = value.split([h * w for h, w in spatial_shapes], dim=1)
    grids = 2 * sampling_locations - 1  # grid_sample wants [-1, 1]
    sampled = []
    for lvl, (h, w) in enumerate(spatial_shapes):
        # (B, h*w, heads, d) -> (B*heads, d, h, w)
        v = value_list[lvl].flatten(2).transpose(1, 2).reshape(B * heads, head_dim, h, w)
        # (B, Q, heads, points, 2) -> (B*heads, Q, points, 2)
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)
        sampled.append(F.grid_sample(v, g.to(v.dtype), mode="bilinear", padding_mode="zeros", align_corners=False))
    # (B, Q, heads, levels, points) -> (B*heads, 1, Q, levels*points)
    weights = attention_weights.transpose(1, 2).reshape(B * heads, 1, Q, levels * points)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights.to(value.dtype)).sum(-1)
    return out.view(B, heads * head_dim, Q).transpose(1, 2).contiguous()


class MSDeformAttn(nn.Module):
    """Deformable attention over `n_levels` feature maps with `n_points` samples per head and level.

    Parameters keep the Deformable DETR / IDEA-Research names: sampling_offsets, attention_weights,
    value_proj, output_proj."""

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Offsets start on a ring of directions per head, growing with the point index (Deformable DETR)."""
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(self.n_heads, 1, 1, 2)
        grid = grid.repeat(1, self.n_levels, self.n_points, 1)
        for i in range(self.n_points):
            grid[:, :, i, :] *= i + 1
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.view(-1))
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        value: torch.Tensor,
        spatial_shapes: List[Tuple[int, int]],
        value_padding_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """query: (B, Q, C) with position already added; reference_points: (B, Q, levels, 2) points or
        (B, Q, levels, 4) boxes, normalized; value: (B, S, C); value_padding_mask: (B, S) True on padding.
        Returns (B, Q, C)."""
        B, Q, _ = query.shape
        S = value.shape[1]
        v = self.value_proj(value)
        if value_padding_mask is not None:
            v = v.masked_fill(value_padding_mask[..., None], 0.0)
        v = v.view(B, S, self.n_heads, self.d_model // self.n_heads)
        offsets = self.sampling_offsets(query).view(B, Q, self.n_heads, self.n_levels, self.n_points, 2)
        weights = self.attention_weights(query).view(B, Q, self.n_heads, self.n_levels * self.n_points)
        weights = weights.softmax(-1).view(B, Q, self.n_heads, self.n_levels, self.n_points)
        if reference_points.shape[-1] == 2:
            shapes = torch.tensor(spatial_shapes, dtype=query.dtype, device=query.device)
            normalizer = torch.stack([shapes[:, 1], shapes[:, 0]], -1)
            locations = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        elif reference_points.shape[-1] == 4:
            locations = (reference_points[:, :, None, :, None, :2]
                         + offsets / self.n_points * reference_points[:, :, None, :, None, 2:] * 0.5)
        else:
            raise ValueError(f"reference_points must end in 2 or 4 coordinates, got {reference_points.shape[-1]}")
        return self.output_proj(ms_deform_attn_core(v, spatial_shapes, locations, weights))
