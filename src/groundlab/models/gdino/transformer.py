"""Grounding DINO's transformer: feature enhancer, language-guided query selection, cross-modality
decoder (IDEA-Research's `transformer.*` parameter layout)."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from groundlab.models.common.mlp import MLP
from groundlab.models.common.ms_deform_attn import MSDeformAttn
from groundlab.models.gdino.decoder import Decoder
from groundlab.models.gdino.encoder import FeatureEnhancer
from groundlab.models.gdino.heads import ContrastiveEmbed
from groundlab.models.gdino.query_selection import encoder_proposals, gather_tokens, select_topk


class Transformer(nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()
        d = cfg.hidden_dim
        self.num_queries = cfg.num_queries
        self.level_embed = nn.Parameter(torch.empty(cfg.num_feature_levels, d))
        self.encoder = FeatureEnhancer(
            cfg.enc_layers, d, cfg.dim_feedforward, cfg.nheads, cfg.num_feature_levels, cfg.enc_n_points,
            cfg.dropout, text_dropout=cfg.dropout, fusion_dropout=cfg.fusion_dropout,
            fusion_droppath=cfg.fusion_droppath,
        )
        self.decoder = Decoder(cfg.dec_layers, d, cfg.dim_feedforward, cfg.nheads, cfg.num_feature_levels,
                               cfg.dec_n_points, cfg.dropout)
        self.tgt_embed = nn.Embedding(cfg.num_queries, d)
        self.enc_output = nn.Linear(d, d)
        self.enc_output_norm = nn.LayerNorm(d)
        self.enc_out_bbox_embed = MLP(d, d, 4, 3)
        self.enc_out_class_embed = ContrastiveEmbed(cfg.max_text_len, cfg.log_scale, cfg.class_embed_bias)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """xavier for every matrix, then each module's own init (deformable offsets, fusion, zero box deltas)."""
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        nn.init.normal_(self.level_embed)
        nn.init.normal_(self.tgt_embed.weight)
        nn.init.constant_(self.enc_out_bbox_embed.layers[-1].weight, 0)
        nn.init.constant_(self.enc_out_bbox_embed.layers[-1].bias, 0)

    def forward(self, srcs: List[torch.Tensor], masks: List[torch.Tensor], pos_embeds: List[torch.Tensor],
                text: torch.Tensor, text_token_mask: torch.Tensor, text_self_attention_mask: torch.Tensor,
                text_position_ids: torch.Tensor, denoising: Optional[Tuple[torch.Tensor, ...]] = None) -> Dict[str, Any]:
        """srcs/masks/pos_embeds: per level (B, C, H_l, W_l) / (B, H_l, W_l) True on padding / (B, C, H_l, W_l).
        text: (B, L, C); text_token_mask: (B, L) True on real tokens. denoising: training-only (label queries
        (B, P, C), box queries in logit space (B, P, 4), self-attention mask) from prepare_denoising, placed before
        the matching queries (the outputs' first P queries are then the denoising ones).

        Returns {"hidden": per decoder layer (B, Q, C), "references": num_layers + 1 boxes (B, Q, 4)
        (sigmoid space, initial first), "text": enhanced text (B, L, C), "query_mask": (B, num_queries) bool,
        False on padded queries (an image with fewer real tokens than queries; select_topk),
        "interm_logits": (B, num_queries, max_text_len) (-inf on padded queries) and "interm_boxes":
        (B, num_queries, 4) of the selected encoder proposals (undetached, for the encoder loss), "memory": the
        enhanced image tokens (B, S, C), level by level, "memory_padding": (B, S) True on padded tokens, "spatial_shapes": [(H_l, W_l)] per level}.
        Q = P + num_queries with denoising, else num_queries."""
        spatial_shapes: List[Tuple[int, int]] = [(int(s.shape[-2]), int(s.shape[-1])) for s in srcs]
        src_flat = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)
        mask_flat = torch.cat([m.flatten(1) for m in masks], 1)
        pos_flat = torch.cat([p.flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1)
                              for lvl, p in enumerate(pos_embeds)], 1)
        valid_ratios = torch.stack([valid_ratio(m) for m in masks], 1).to(src_flat.dtype)
        text_padding_mask = ~text_token_mask
        memory, text = self.encoder(src_flat, pos_flat, spatial_shapes, valid_ratios, mask_flat, text,
                                    text_padding_mask, text_self_attention_mask, text_position_ids)

        output_memory, proposals = encoder_proposals(memory, mask_flat, spatial_shapes)
        output_memory = self.enc_output_norm(self.enc_output(output_memory))
        enc_logits = self.enc_out_class_embed(output_memory, text, text_token_mask)
        enc_coords = self.enc_out_bbox_embed(output_memory) + proposals  # logit space
        topk, real = select_topk(enc_logits, mask_flat, self.num_queries)
        padded = ~real[..., None]
        # padded queries: box 0 in logit space (the centred box of half the image, finite everywhere downstream)
        # and -inf logits; masked_fill passes no gradient to the token they point at
        ref_undetached = gather_tokens(enc_coords, topk).masked_fill(padded, 0.0)
        interm_logits = gather_tokens(enc_logits, topk).masked_fill(padded, float("-inf"))
        reference_points = ref_undetached.detach().sigmoid()
        tgt = self.tgt_embed.weight[None].expand(src_flat.shape[0], -1, -1)
        self_attn_mask = None
        # the common case, every query real: no padding mask, so attention keeps its unmasked fast path
        # (a traced graph keeps the mask: whether queries are padded is decided at run time there)
        traced = torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export()
        query_padding_mask = ~real if traced or not bool(real.all()) else None
        if denoising is not None:
            dn_label, dn_box, self_attn_mask = denoising
            tgt = torch.cat([dn_label.to(tgt.dtype), tgt], 1)
            reference_points = torch.cat([dn_box.sigmoid().to(reference_points.dtype), reference_points], 1)
            if query_padding_mask is not None:
                query_padding_mask = torch.cat([query_padding_mask.new_zeros(real.shape[0], dn_label.shape[1]),
                                                query_padding_mask], 1)
        hidden, references = self.decoder(tgt, reference_points, memory, spatial_shapes, valid_ratios, mask_flat,
                                          text, text_padding_mask, self_attn_mask, query_padding_mask)
        return {"hidden": hidden, "references": references, "text": text, "query_mask": real,
                "interm_logits": interm_logits, "interm_boxes": ref_undetached.sigmoid(),
                "memory": memory, "memory_padding": mask_flat, "spatial_shapes": spatial_shapes}


def valid_ratio(mask: torch.Tensor) -> torch.Tensor:
    """(B, 2) fraction (w, h) of a (B, H, W) padding mask (True on padding) that holds image."""
    _, H, W = mask.shape
    valid_h = (~mask[:, :, 0]).sum(1).float() / H
    valid_w = (~mask[:, 0, :]).sum(1).float() / W
    return torch.stack([valid_w, valid_h], -1)
