"""Mask Grounding DINO: Grounding DINO plus a CondInst-style dynamic mask head (TAO's `mask_grounding_dino`).

A controller MLP turns each decoder query into the weights of three dynamic 1x1 convolutions
(models/mask_gdino/dynamic_mask.py); a pixel decoder fuses the encoder memory of the first three levels into
mask features (models/mask_gdino/pixel_decoder.py). The network itself stops there: it outputs the features and
every query's controller vector, and masks are computed only for the queries that need them (the matched ones
in training, the selected ones at inference) by the parameter-free `query_masks`. Parameter names are TAO's
(`controller.layers.{0,1,2}`, `mask_head.{lay1..lay4,jia_dcn}`), so TAO checkpoints load unchanged.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import nn

from groundlab.models.common.mlp import MLP
from groundlab.models.gdino.model import GroundingDINO
from groundlab.models.mask_gdino.dynamic_mask import MASK_OUT_STRIDE, num_dynamic_params
from groundlab.models.mask_gdino.pixel_decoder import MaskPixelDecoder
from groundlab.models.mask_gdino.region_head import REGION_LEVELS, RegionQueryHead

MASK_HEAD_PREFIXES = ("controller.", "mask_head.")  # the parameters a Grounding DINO checkpoint lacks


class MaskGroundingDINO(GroundingDINO):
    """GroundingDINO.forward's outputs plus, in `pred_*`'s dict and (training only) in every `aux_outputs`
    entry: "mask_params" (B, Q, P) the query's dynamic convolution weights, "mask_refs" (B, Q, 2) normalized
    (x, y) reference point of the query's decoder layer (detached), and the shared "mask_features"
    (B, mask_dim, H_s, W_s), "mask_stride" (int, s: 8 for return_interm_indices [1, 2, 3]) and "image_sizes"
    (B, 2) (h, w) of the unpadded inputs, so each layer dict alone feeds `query_masks`. The denoising and
    encoder-proposal outputs carry no masks (TAO computes no mask loss on them either).

    With model.num_region_queries > 0 (referring segmentation, TAO's VG mode) the final outputs also carry the
    region head's "no_targets" (B, 2), "union_mask_logits" (B, 2, H_s, W_s), "minimap_logits" (B, R, 2) and
    "region_masks" (B, R, H_s, W_s) (models/mask_gdino/region_head.py)."""

    def __init__(self, cfg, special_token_ids: Sequence[int], bert: Optional[nn.Module] = None):
        super().__init__(cfg, special_token_ids, bert)
        if cfg.num_feature_levels < 3:
            raise ValueError(f"model=mask_gdino needs model.num_feature_levels >= 3 (its pixel decoder fuses three "
                             f"levels), got {cfg.num_feature_levels}")
        d = cfg.hidden_dim
        self.mask_dim = int(cfg.mask_dim)
        # memory level 0 is backbone stage return_interm_indices[0], of stride 4 * 2^index
        self.mask_stride = 4 * 2 ** int(cfg.return_interm_indices[0])
        if self.mask_stride % MASK_OUT_STRIDE:
            raise ValueError(f"mask features at stride {self.mask_stride} cannot be upsampled to stride 4")
        self.controller = MLP(d, d, num_dynamic_params(self.mask_dim), 3)
        for layer in self.controller.layers:
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)
        self.mask_head = MaskPixelDecoder(d, self.mask_dim)
        self.region_head = None
        if int(cfg.get("num_region_queries", 0) or 0) > 0:
            self.region_head = RegionQueryHead(d, cfg.nheads, int(cfg.num_region_queries),
                                               int(cfg.region_dec_layers), cfg.dim_feedforward)

    def _levels(self, memory: torch.Tensor, spatial_shapes: List) -> List[torch.Tensor]:
        """(B, S, C) memory -> the first three levels as (B, C, H_l, W_l) maps."""
        B, _, C = memory.shape
        levels, start = [], 0
        for h, w in spatial_shapes[:REGION_LEVELS]:
            levels.append(memory[:, start : start + h * w].transpose(1, 2).reshape(B, C, h, w))
            start += h * w
        return levels

    def mask_features(self, memory: torch.Tensor, spatial_shapes: List) -> torch.Tensor:
        """(B, S, C) encoder memory -> (B, mask_dim, H_0, W_0) mask features at stride self.mask_stride."""
        return self.mask_head(self._levels(memory, spatial_shapes))

    def add_outputs(self, result: Dict[str, Any], transformer_out: Dict[str, Any], sizes: torch.Tensor,
                    num_denoising: int) -> None:
        shapes = transformer_out["spatial_shapes"]
        levels = self._levels(transformer_out["memory"], shapes)
        fused = self.mask_head.fuse(levels)
        shared = {"mask_features": self.mask_head.project(fused), "mask_stride": self.mask_stride,
                  "image_sizes": sizes}
        if self.region_head is not None:
            padding, start = [], 0
            B = fused.shape[0]
            for h, w in shapes[:REGION_LEVELS]:
                padding.append(transformer_out["memory_padding"][:, start : start + h * w].reshape(B, h, w))
                start += h * w
            P = num_denoising  # the denoising queries are training aids, not objects of the image
            result.update(self.region_head(levels, padding, transformer_out["text"], result["text_token_mask"],
                                           fused, transformer_out["hidden"][-1][:, P:],
                                           transformer_out["query_mask"], result["pred_logits"]))
        hidden, references = transformer_out["hidden"], transformer_out["references"]
        last = len(hidden) - 1
        layers = [(last, result)]
        if self.training:  # evaluation masks only the final layer's queries
            layers += list(enumerate(result["aux_outputs"]))
        P = num_denoising
        for lid, layer in layers:
            layer.update(shared)
            layer["mask_params"] = self.controller(hidden[lid][:, P:])
            # the box this layer refines: references[lid] is its input (references[0] = the selected proposals)
            layer["mask_refs"] = references[lid][:, P:, :2].detach()
