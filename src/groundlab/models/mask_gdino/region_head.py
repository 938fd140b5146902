"""Region-query head for referring segmentation (TAO's Mask Grounding DINO `num_region_queries`, after ReLA).

Facts from ReLA (Liu et al., "GRES: Generalized Referring Expression Segmentation", `MultiScaleMaskedReferringDecoder`):
R learnable region queries (feature + position embedding) run a masked-attention decoder over three memory levels,
coarsest first (strides 32, 16, 8 here: the encoder memory of levels 2, 1, 0); each layer is a cross-attention to
one level whose keys are limited to where the region's previous mask is on (a region whose mask is empty everywhere
attends everywhere), a self-attention among the regions, and a feed-forward block, post-norm. Outputs (region masks after every layer, the rest after the last):
  region masks    = MLP(region) . pixel features        (B, R, H8, W8)   the next layer's attention mask
  minimap         = Linear(region) -> 2                  (B, R, 2)        [background, foreground] per region
  union mask      = sum_r minimap[r] x mask embedding[r] . pixel features (B, 2, H8, W8)
  no-target       = MLP(region) -> 2, mean over regions  (B, 2)           [target, no target]
The minimap ties region r to cell r of a sqrt(R) x sqrt(R) grid over the image (ReLA: 100 regions, 10 x 10), so R
must be a perfect square. The pixel features are the mask branch's fused stride-8 map (hidden_dim channels,
MaskPixelDecoder.fuse), so the region head adds no second pixel decoder. Only the last layer's outputs are returned
(ReLA supervises only the last one as well), so earlier layers compute only the region masks their successors
attend by.

Differences to ReLA, on purpose. ReLA's image features come from a backbone that fused the language at every stage;
Grounding DINO's encoder memory carries far less of it, and with ReLA's single language attention in the first layer
the head learned expression-blind unions and a no-target decision from the words alone (measured on the synthetic
referring split). So every layer attends, gated, (a) to the expression's tokens and (b) to the detection decoder's
final object queries, which already score each object against those tokens: "is there a green square" is then
read off the objects found, not guessed from the words; the no-target classifier also reads the detector's best
query probabilities directly (detached, a linear term on top of ReLA's pooled region vote). The language features are already in hidden_dim (no
768 -> d projection); padded image tokens, padded text tokens and padded object queries are masked out of every
attention; masks are additive float masks (boolean attention masks do not export reliably).
"""

from __future__ import annotations

import math
from typing import Dict, List, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from groundlab.models.common.mlp import MLP
from groundlab.models.common.position_encoding import SinePositionEmbedding2D

REGION_LEVELS = 3  # memory levels 0..2 (strides 8, 16, 32 with return_interm_indices [1, 2, 3])
EVIDENCE_QUERIES = 3  # the no-target classifier reads the detector's best this many query scores


def minimap_side(num_region_queries: int) -> int:
    """sqrt(R) for a perfect square R > 0, else ValueError naming model.num_region_queries."""
    side = int(round(math.sqrt(num_region_queries)))
    if num_region_queries <= 0 or side * side != num_region_queries:
        raise ValueError(f"model.num_region_queries={num_region_queries} must be a perfect square (each region "
                         f"query owns one cell of a sqrt(R) x sqrt(R) minimap; TAO and ReLA use 100), or 0 to "
                         f"disable the region head")
    return side


class _GatedAttention(nn.Module):
    """x + sigmoid(gate) * attention(x + query_pos, keys, values), layer-normed: a context the regions may use as
    much as they learn to (gate 0 at the start: half strength)."""

    def __init__(self, d: int, nheads: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, nheads, batch_first=True)
        self.norm = nn.LayerNorm(d)
        self.gate = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor, query_pos: torch.Tensor, context: torch.Tensor,
                padding: torch.Tensor) -> torch.Tensor:
        out = self.attn(x + query_pos, context, context, key_padding_mask=padding, need_weights=False)[0]
        return self.norm(x + self.gate.sigmoid() * out)


class _RegionLayer(nn.Module):
    """Cross-attention to one memory level, to the expression's tokens and to the detector's object queries,
    self-attention among regions, FFN; post-norm (Mask2Former)."""

    def __init__(self, d: int, nheads: int, dim_feedforward: int):
        super().__init__()
        self.cross = nn.MultiheadAttention(d, nheads, batch_first=True)
        self.cross_norm = nn.LayerNorm(d)
        self.lang = _GatedAttention(d, nheads)
        self.objects = _GatedAttention(d, nheads)
        self.self_attn = nn.MultiheadAttention(d, nheads, batch_first=True)
        self.self_norm = nn.LayerNorm(d)
        self.ffn = nn.Sequential(nn.Linear(d, dim_feedforward), nn.ReLU(), nn.Linear(dim_feedforward, d))
        self.ffn_norm = nn.LayerNorm(d)

    def attend(self, x: torch.Tensor, query_pos: torch.Tensor, memory: torch.Tensor, memory_pos: torch.Tensor,
               attn_mask: torch.Tensor) -> torch.Tensor:
        out = self.cross(x + query_pos, memory + memory_pos, memory, attn_mask=attn_mask, need_weights=False)[0]
        return self.cross_norm(x + out)

    def finish(self, x: torch.Tensor, query_pos: torch.Tensor) -> torch.Tensor:
        q = x + query_pos
        x = self.self_norm(x + self.self_attn(q, q, x, need_weights=False)[0])
        return self.ffn_norm(x + self.ffn(x))


class RegionQueryHead(nn.Module):
    """forward(levels, level_masks, text, text_token_mask, pixel, objects, object_mask) -> {"no_targets": (B, 2) logits [target, no
    target], "union_mask_logits": (B, 2, H8, W8) logits [background, foreground], "minimap_logits": (B, R, 2),
    "region_masks": (B, R, H8, W8) logits}.

    levels: memory of the three finest levels, finest first, each (B, d, H_l, W_l); level_masks: (B, H_l, W_l) True
    on padding; text: (B, L, d) enhanced text; text_token_mask: (B, L) True on real tokens; pixel: (B, d, H8, W8)
    the fused stride-8 pixel features; objects: (B, Q, d) the detection decoder's last-layer queries, object_mask:
    (B, Q) True on real queries; object_logits: (B, Q, L) their token logits (-inf on padding)."""

    def __init__(self, d: int, nheads: int, num_regions: int, num_layers: int, dim_feedforward: int):
        super().__init__()
        self.side = minimap_side(num_regions)
        self.nheads = nheads
        self.query_feat = nn.Embedding(num_regions, d)
        self.query_pos = nn.Embedding(num_regions, d)
        self.level_embed = nn.Embedding(REGION_LEVELS, d)
        self.position = SinePositionEmbedding2D(d // 2)
        self.layers = nn.ModuleList(_RegionLayer(d, nheads, dim_feedforward) for _ in range(num_layers))
        self.norm = nn.LayerNorm(d)
        self.mask_embed = MLP(d, d, d, 3)
        self.minimap_embed = nn.Linear(d, 2)
        self.nt_embed = MLP(d, d, 2, 2)
        # the detector's evidence: its EVIDENCE_QUERIES best query probabilities for the prompt -> no-target logits
        self.nt_evidence = nn.Linear(EVIDENCE_QUERIES, 2)
        nn.init.zeros_(self.nt_evidence.weight)
        nn.init.zeros_(self.nt_evidence.bias)

    def region_masks(self, x: torch.Tensor, pixel: torch.Tensor) -> torch.Tensor:
        """(B, R, H8, W8) mask logits of (B, R, d) region features: what the next layer's attention is limited to."""
        return torch.einsum("brc,bchw->brhw", self.mask_embed(self.norm(x)), pixel)

    def heads(self, x: torch.Tensor, pixel: torch.Tensor, evidence: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Prediction heads on the last layer's (B, R, d) region features and the (B, EVIDENCE_QUERIES) detector
        evidence (module docstring for the outputs)."""
        region = self.norm(x)
        embed = self.mask_embed(region)  # (B, R, d)
        region_masks = torch.einsum("brc,bchw->brhw", embed, pixel)
        minimap = self.minimap_embed(region)  # (B, R, 2)
        union = torch.einsum("bra,brc,bchw->bahw", minimap, embed, pixel)
        no_targets = self.nt_embed(region).mean(1) + self.nt_evidence(evidence)
        return {"no_targets": no_targets, "union_mask_logits": union,
                "minimap_logits": minimap, "region_masks": region_masks}

    def _attn_mask(self, region_masks: torch.Tensor, key_padding: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """(B * nheads, R, H*W) additive mask: keys where the region's mask (resized to `size`) is off, and padded
        keys; a region whose mask is off on every real key attends to every real key (ReLA)."""
        B, R = region_masks.shape[:2]
        off = F.interpolate(region_masks.detach(), size=tuple(size), mode="bilinear", align_corners=False)
        off = (off.sigmoid() < 0.5).flatten(2) | key_padding[:, None, :]
        empty = off.all(-1, keepdim=True)
        off = off & ~empty
        off = off | key_padding[:, None, :]
        mask = torch.zeros(off.shape, dtype=region_masks.dtype, device=off.device)
        mask = mask.masked_fill(off, torch.finfo(mask.dtype).min)
        return mask.repeat_interleave(self.nheads, 0)

    def forward(self, levels: List[torch.Tensor], level_masks: List[torch.Tensor], text: torch.Tensor,
                text_token_mask: torch.Tensor, pixel: torch.Tensor, objects: torch.Tensor,
                object_mask: torch.Tensor, object_logits: torch.Tensor) -> Dict[str, torch.Tensor]:
        order = list(range(REGION_LEVELS))[::-1]  # coarsest first
        memory, memory_pos, padding, sizes = [], [], [], []
        for k, lvl in enumerate(order):
            src, pad = levels[lvl], level_masks[lvl]
            sizes.append(src.shape[-2:])
            memory.append(src.flatten(2).transpose(1, 2) + self.level_embed.weight[k])
            memory_pos.append(self.position(pad).to(src.dtype).flatten(2).transpose(1, 2))
            padding.append(pad.flatten(1))
        B = pixel.shape[0]
        x = self.query_feat.weight[None].expand(B, -1, -1)
        query_pos = self.query_pos.weight[None].expand(B, -1, -1)
        # detached: the no-target loss must not bend the detector's calibrated scores; -inf (padding) -> 0
        best = object_logits.detach().float().amax(-1).topk(min(EVIDENCE_QUERIES, object_logits.shape[1]), -1).values
        evidence = F.pad(best.sigmoid(), (0, EVIDENCE_QUERIES - best.shape[1])).to(x.dtype)
        masks = self.region_masks(x, pixel)
        text_padding = (~text_token_mask).to(text.dtype) * torch.finfo(text.dtype).min
        object_padding = (~object_mask).to(objects.dtype) * torch.finfo(objects.dtype).min
        for i, layer in enumerate(self.layers):
            k = i % REGION_LEVELS
            x = layer.attend(x, query_pos, memory[k], memory_pos[k], self._attn_mask(masks, padding[k], sizes[k]))
            x = layer.lang(x, query_pos, text, text_padding)
            x = layer.objects(x, query_pos, objects, object_padding)
            x = layer.finish(x, query_pos)
            if i + 1 < len(self.layers):  # the heads run once, on the last layer: only its outputs are used
                masks = self.region_masks(x, pixel)
        return self.heads(x, pixel, evidence)
