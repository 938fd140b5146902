"""The feature enhancer: per layer, image-text fusion, then text self-attention (sub-sentence masked),
then multi-scale deformable self-attention over the image tokens (IDEA-Research's layout and names:
`fusion_layers`, `text_layers`, `layers`)."""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from groundlab.models.common.ms_deform_attn import MSDeformAttn
from groundlab.models.common.position_encoding import sine_embed
from groundlab.models.gdino.fusion import BiAttentionBlock


class DeformableEncoderLayer(nn.Module):
    """Post-norm deformable self-attention + FFN over the flattened image tokens."""

    def __init__(self, d_model: int, d_ffn: int, dropout: float, n_levels: int, n_heads: int, n_points: int):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = dropout

    def forward(self, src, pos, reference_points, spatial_shapes, padding_mask):
        src2 = self.self_attn(src + pos, reference_points, src, spatial_shapes, padding_mask)
        src = self.norm1(src + F.dropout(src2, self.dropout, self.training))
        src2 = self.linear2(F.dropout(F.relu(self.linear1(src)), self.dropout, self.training))
        return self.norm2(src + F.dropout(src2, self.dropout, self.training))


class TextEnhancerLayer(nn.Module):
    """Post-norm text self-attention (each phrase attends within itself) + FFN."""

    def __init__(self, d_model: int, n_heads: int, d_ffn: int, dropout: float):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.n_heads = n_heads
        self.dropout = dropout

    def forward(self, text: torch.Tensor, pos: torch.Tensor, self_attention_mask: torch.Tensor) -> torch.Tensor:
        """text, pos: (B, L, C); self_attention_mask: (B, L, L) bool, True where attention is allowed."""
        blocked = (~self_attention_mask).repeat_interleave(self.n_heads, dim=0)  # (B*heads, L, L)
        q = k = text + pos
        text2 = self.self_attn(q, k, text, attn_mask=blocked, need_weights=False)[0]
        text = self.norm1(text + F.dropout(text2, self.dropout, self.training))
        text2 = self.linear2(F.dropout(F.relu(self.linear1(text)), self.dropout, self.training))
        return self.norm2(text + F.dropout(text2, self.dropout, self.training))


def encoder_reference_points(spatial_shapes: List[Tuple[int, int]], valid_ratios: torch.Tensor) -> torch.Tensor:
    """(B, S, levels, 2) normalized centres of every feature-map cell, in each level's valid area.

    valid_ratios: (B, levels, 2) as (w, h) fractions of the padded map that hold image."""
    refs = []
    for lvl, (h, w) in enumerate(spatial_shapes):
        ref_y, ref_x = torch.meshgrid(
            torch.linspace(0.5, h - 0.5, h, dtype=valid_ratios.dtype, device=valid_ratios.device),
            torch.linspace(0.5, w - 0.5, w, dtype=valid_ratios.dtype, device=valid_ratios.device),
            indexing="ij",
        )
        ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, lvl, 1] * h)
        ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, lvl, 0] * w)
        refs.append(torch.stack((ref_x, ref_y), -1))
    return torch.cat(refs, 1)[:, :, None] * valid_ratios[:, None]


class FeatureEnhancer(nn.Module):
    """`num_layers` x (fusion -> text enhancer -> deformable image self-attention).

    forward(src (B, S, C), pos (B, S, C), spatial_shapes, valid_ratios (B, levels, 2), padding_mask (B, S)
    True on padding, text (B, L, C), text_padding_mask (B, L) True on padding, text_self_attention_mask
    (B, L, L), text_position_ids (B, L)) -> (memory (B, S, C), text memory (B, L, C))."""

    def __init__(self, num_layers: int, d_model: int, d_ffn: int, n_heads: int, n_levels: int, n_points: int,
                 dropout: float = 0.0, text_dropout: float = 0.0, fusion_dropout: float = 0.0,
                 fusion_droppath: float = 0.1, use_checkpoint: bool = False):
        super().__init__()
        self.d_model = d_model
        self.layers = nn.ModuleList(
            DeformableEncoderLayer(d_model, d_ffn, dropout, n_levels, n_heads, n_points) for _ in range(num_layers))
        self.text_layers = nn.ModuleList(
            TextEnhancerLayer(d_model, n_heads // 2, d_ffn // 2, text_dropout) for _ in range(num_layers))
        self.fusion_layers = nn.ModuleList(
            BiAttentionBlock(d_model, d_model, d_ffn // 2, n_heads // 2, fusion_dropout, fusion_droppath)
            for _ in range(num_layers))
        self.use_checkpoint = use_checkpoint

    def forward(self, src, pos, spatial_shapes, valid_ratios, padding_mask, text, text_padding_mask,
                text_self_attention_mask, text_position_ids: Optional[torch.Tensor] = None):
        reference_points = encoder_reference_points(spatial_shapes, valid_ratios)
        if text_position_ids is None:
            text_position_ids = torch.arange(text.shape[1], device=text.device).expand(text.shape[0], -1)
        text_pos = sine_embed(text_position_ids[..., None].to(text.dtype), self.d_model, exchange_xy=False)
        for fusion, text_layer, layer in zip(self.fusion_layers, self.text_layers, self.layers):
            if self.use_checkpoint and self.training:
                src, text = checkpoint(fusion, src, text, padding_mask, text_padding_mask, use_reentrant=False)
            else:
                src, text = fusion(src, text, padding_mask, text_padding_mask)
            text = text_layer(text, text_pos, text_self_attention_mask)
            if self.use_checkpoint and self.training:
                src = checkpoint(layer, src, pos, reference_points, spatial_shapes, padding_mask, use_reentrant=False)
            else:
                src = layer(src, pos, reference_points, spatial_shapes, padding_mask)
        return src, text
