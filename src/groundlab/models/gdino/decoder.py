"""The cross-modality decoder: per layer, query self-attention, text cross-attention, deformable
cross-attention into the image memory, FFN; boxes refined layer by layer (IDEA-Research names:
`self_attn`/`norm2`, `ca_text`/`catext_norm`, `cross_attn`/`norm1`, `linear1`/`linear2`/`norm3`)."""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from groundlab.models.common.mlp import MLP
from groundlab.models.common.ms_deform_attn import MSDeformAttn
from groundlab.models.common.position_encoding import inverse_sigmoid, sine_embed


class DecoderLayer(nn.Module):
    def __init__(self, d_model: int, d_ffn: int, dropout: float, n_levels: int, n_heads: int, n_points: int):
        super().__init__()
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.norm1 = nn.LayerNorm(d_model)
        self.ca_text = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.catext_norm = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout = dropout

    def forward(self, tgt, query_pos, reference_points, memory, spatial_shapes, memory_padding_mask,
                text, text_padding_mask, self_attn_mask: Optional[torch.Tensor] = None,
                query_padding_mask: Optional[torch.Tensor] = None):
        """tgt, query_pos: (B, Q, C); reference_points: (B, Q, levels, 4); memory: (B, S, C);
        text: (B, L, C); masks True on padding; self_attn_mask: (Q, Q) bool, True where blocked (denoising);
        query_padding_mask: (B, Q) bool, True on padded queries, which no query attends to."""
        q = k = tgt + query_pos
        tgt2 = self.self_attn(q, k, tgt, attn_mask=self_attn_mask, key_padding_mask=query_padding_mask,
                              need_weights=False)[0]
        tgt = self.norm2(tgt + F.dropout(tgt2, self.dropout, self.training))
        # key and value as two tensors, as IDEA's layer passes them: MultiheadAttention's packed key-value
        # projection (key is value) traces the text length into a constant, and an export with a symbolic text
        # length (export.dynamic_text_len) then fails on any other length
        tgt2 = self.ca_text(tgt + query_pos, text, text.view_as(text), key_padding_mask=text_padding_mask,
                            need_weights=False)[0]
        tgt = self.catext_norm(tgt + F.dropout(tgt2, self.dropout, self.training))
        tgt2 = self.cross_attn(tgt + query_pos, reference_points, memory, spatial_shapes, memory_padding_mask)
        tgt = self.norm1(tgt + F.dropout(tgt2, self.dropout, self.training))
        tgt2 = self.linear2(F.dropout(F.relu(self.linear1(tgt)), self.dropout, self.training))
        return self.norm3(tgt + F.dropout(tgt2, self.dropout, self.training))


class Decoder(nn.Module):
    """Decoder layers with iterative box refinement.

    `bbox_embed` (one MLP per layer, usually the same shared instance) is set by the parent model."""

    def __init__(self, num_layers: int, d_model: int, d_ffn: int, n_heads: int, n_levels: int, n_points: int,
                 dropout: float = 0.0, use_checkpoint: bool = False):
        super().__init__()
        self.layers = nn.ModuleList(
            DecoderLayer(d_model, d_ffn, dropout, n_levels, n_heads, n_points) for _ in range(num_layers))
        self.norm = nn.LayerNorm(d_model)
        self.ref_point_head = MLP(2 * d_model, d_model, d_model, 2)
        self.bbox_embed: Optional[nn.ModuleList] = None
        self.d_model = d_model
        self.use_checkpoint = use_checkpoint

    def forward(self, tgt, reference_points, memory, spatial_shapes, valid_ratios, memory_padding_mask,
                text, text_padding_mask, self_attn_mask=None, query_padding_mask=None
                ) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """tgt: (B, Q, C) content queries; reference_points: (B, Q, 4) normalized cxcywh boxes;
        self_attn_mask: (Q, Q) bool True where blocked; query_padding_mask: (B, Q) bool True on padded queries.

        Returns (hidden: per layer (B, Q, C) after the final norm, references: per layer (B, Q, 4) with the
        initial boxes first, i.e. num_layers + 1 entries; each layer's boxes are detached before the next)."""
        hidden, references = [], [reference_points]
        for lid, layer in enumerate(self.layers):
            ref_input = reference_points[:, :, None] * torch.cat([valid_ratios, valid_ratios], -1)[:, None]
            query_pos = self.ref_point_head(sine_embed(ref_input[:, :, 0, :], self.d_model // 2))
            args = (tgt, query_pos, ref_input, memory, spatial_shapes, memory_padding_mask, text, text_padding_mask,
                    self_attn_mask, query_padding_mask)
            if self.use_checkpoint and self.training:
                tgt = checkpoint(layer, *args, use_reentrant=False)
            else:
                tgt = layer(*args)
            if self.bbox_embed is not None:
                new_ref = (self.bbox_embed[lid](tgt) + inverse_sigmoid(reference_points)).sigmoid()
                reference_points = new_ref.detach()
                references.append(new_ref)
            hidden.append(self.norm(tgt))
        return hidden, references
