"""Bi-directional image-text attention fusion (the feature enhancer's cross-modality block).

One attention score matrix serves both directions: image tokens attend over text tokens and text tokens
over image tokens; each update is scaled by a learned per-channel layer scale (init 1e-4) and drop path.
Parameter names follow IDEA-Research's BiAttentionBlock so official checkpoints load as they are.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F

# Scores are clamped so fp16 cannot overflow to inf before the softmax (IDEA's clamp_min/max_for_*).
SCORE_CLAMP = 50000.0


class DropPath(nn.Module):
    """Stochastic depth per sample (identity at eval or p=0)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1 - self.p
        mask = torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype, device=x.device)
        return x.div(keep) * torch.floor(mask + keep)


class BiMultiHeadAttention(nn.Module):
    """Image->text and text->image attention from one score matrix.

    v: (B, S, v_dim) image tokens; l: (B, L, l_dim) text tokens. Masks are True on padding:
    attention_mask_v (B, S), attention_mask_l (B, L). Returns (delta_v (B, S, v_dim), delta_l (B, L, l_dim))."""

    def __init__(self, v_dim: int, l_dim: int, embed_dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"fusion embed_dim={embed_dim} must be divisible by num_heads={num_heads}")
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.dropout = dropout
        self.v_proj = nn.Linear(v_dim, embed_dim)
        self.l_proj = nn.Linear(l_dim, embed_dim)
        self.values_v_proj = nn.Linear(v_dim, embed_dim)
        self.values_l_proj = nn.Linear(l_dim, embed_dim)
        self.out_v_proj = nn.Linear(embed_dim, v_dim)
        self.out_l_proj = nn.Linear(embed_dim, l_dim)
        for lin in (self.v_proj, self.l_proj, self.values_v_proj, self.values_l_proj, self.out_v_proj, self.out_l_proj):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        return x.view(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # (B, h, N, d)

    def forward(
        self, v: torch.Tensor, l: torch.Tensor,
        attention_mask_v: Optional[torch.Tensor] = None, attention_mask_l: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        B, S, _ = v.shape
        L = l.shape[1]
        q = self._heads(self.v_proj(v) * self.scale)
        k = self._heads(self.l_proj(l))
        value_v = self._heads(self.values_v_proj(v))
        value_l = self._heads(self.values_l_proj(l))
        scores = (q @ k.transpose(-1, -2)).clamp(-SCORE_CLAMP, SCORE_CLAMP)  # (B, h, S, L)
        scores_l = scores.transpose(-1, -2)  # (B, h, L, S)
        if attention_mask_v is not None:
            scores_l = scores_l.masked_fill(attention_mask_v[:, None, None, :], float("-inf"))
        if attention_mask_l is not None:
            scores = scores.masked_fill(attention_mask_l[:, None, None, :], float("-inf"))
        probs_v = F.dropout(scores.softmax(-1), self.dropout, self.training)
        probs_l = F.dropout(scores_l.softmax(-1), self.dropout, self.training)
        out_v = (probs_v @ value_l).transpose(1, 2).reshape(B, S, self.embed_dim)
        out_l = (probs_l @ value_v).transpose(1, 2).reshape(B, L, self.embed_dim)
        return self.out_v_proj(out_v), self.out_l_proj(out_l)


class BiAttentionBlock(nn.Module):
    """Pre-norm bi-attention with layer scale: v += drop_path(gamma_v * dv); l += drop_path(gamma_l * dl)."""

    def __init__(self, v_dim: int, l_dim: int, embed_dim: int, num_heads: int, dropout: float = 0.0,
                 drop_path: float = 0.0, init_values: float = 1e-4):
        super().__init__()
        self.layer_norm_v = nn.LayerNorm(v_dim)
        self.layer_norm_l = nn.LayerNorm(l_dim)
        self.attn = BiMultiHeadAttention(v_dim, l_dim, embed_dim, num_heads, dropout)
        self.drop_path = DropPath(drop_path)
        self.gamma_v = nn.Parameter(init_values * torch.ones(v_dim))
        self.gamma_l = nn.Parameter(init_values * torch.ones(l_dim))

    def forward(self, v, l, attention_mask_v=None, attention_mask_l=None):
        v = self.layer_norm_v(v)
        l = self.layer_norm_l(l)
        delta_v, delta_l = self.attn(v, l, attention_mask_v, attention_mask_l)
        return v + self.drop_path(self.gamma_v * delta_v), l + self.drop_path(self.gamma_l * delta_l)
