"""Grounding DINO: image backbone + BERT text encoder, feature enhancer, language-guided query selection,
cross-modality decoder and token-level contrastive head.

State-dict keys are IDEA-Research's (`groundingdino_swint_ogc.pth`), except the image backbone, which is
under `backbone.body.` with transformers' own backbone names (groundlab's Swin keeps transformers' SwinBackbone keys).
"""

from __future__ import annotations

import copy
from typing import Any, Dict, List, NamedTuple, Optional, Sequence

import torch
from torch import nn

from groundlab.text.tokens import sub_sentence_masks
from groundlab.models.common.backbone import ImageBackbone
from groundlab.models.common.backbone_weights import load_backbone_weights
from groundlab.models.common.group_norm import GroupNorm
from groundlab.models.common.mlp import MLP
from groundlab.models.common.position_encoding import SinePositionEmbedding2D, inverse_sigmoid
from groundlab.models.common.text_encoder import build_bert
from groundlab.models.gdino.denoising import prepare_denoising
from groundlab.models.gdino.heads import ContrastiveEmbed
from groundlab.models.gdino.transformer import Transformer


class ImageLevels(NamedTuple):
    """The image half of the network (GroundingDINO.image_levels), reused for every prompt of the images."""

    srcs: List[torch.Tensor]  # per level (B, C, H_l, W_l)
    masks: List[torch.Tensor]  # per level (B, H_l, W_l) bool, True on padding
    pos: List[torch.Tensor]  # per level (B, C, H_l, W_l) position encodings
    sizes: torch.Tensor  # (B, 2) long (h, w) of each input image without its padding


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """0 where attention is allowed, the dtype's minimum where it is not. Float masks rather than boolean
    ones: the ONNX export of scaled-dot-product attention with a boolean mask is not reliable."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


class GroundingDINO(nn.Module):
    """forward(images, input_ids, attention_mask, token_type_ids, position_ids, text_self_attention_mask,
    padding_mask) -> {"pred_logits": (B, Q, max_text_len) with -inf on padding tokens and on every token of a
    padded query (an image with fewer feature-map tokens than Q = num_queries: query_selection.select_topk),
    "pred_boxes": (B, Q, 4) normalized cxcywh (finite for every query), "aux_outputs": [{"pred_logits",
    "pred_boxes"}] of earlier decoder layers, "interm_outputs": {"pred_logits", "pred_boxes"} of the selected
    encoder proposals (-inf logits on padded queries too), "text_token_mask": (B, L)}.

    cfg: the `model` config (GDinoModelConfig fields)."""

    def __init__(self, cfg, special_token_ids: Sequence[int], bert: Optional[nn.Module] = None):
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_dim
        self.max_text_len = cfg.max_text_len
        self.backbone = ImageBackbone(cfg.backbone, cfg.return_interm_indices, cfg.get("backbone_overrides"))
        if cfg.get("pretrained_backbone_path"):
            load_backbone_weights(self.backbone.body, cfg.pretrained_backbone_path)
        self.position_embedding = SinePositionEmbedding2D(d // 2, cfg.pe_temperatureH, cfg.pe_temperatureW)
        self.bert = bert if bert is not None else build_bert(
            cfg.text_encoder_type, cfg.get("text_encoder_pretrained", True), cfg.get("text_encoder_overrides"))
        self.feat_map = nn.Linear(self.bert.config.hidden_size, d)
        nn.init.xavier_uniform_(self.feat_map.weight)
        nn.init.constant_(self.feat_map.bias, 0)
        self.input_proj = self._input_projections(cfg.num_feature_levels, d)
        self.transformer = Transformer(cfg)

        bbox_embed = MLP(d, d, 4, 3)
        nn.init.constant_(bbox_embed.layers[-1].weight, 0)
        nn.init.constant_(bbox_embed.layers[-1].bias, 0)
        class_embed = ContrastiveEmbed(cfg.max_text_len, cfg.log_scale, cfg.class_embed_bias)
        n = cfg.dec_layers
        boxes = [bbox_embed if cfg.dec_pred_bbox_embed_share else copy.deepcopy(bbox_embed) for _ in range(n)]
        classes = [class_embed if cfg.dec_pred_class_embed_share else copy.deepcopy(class_embed) for _ in range(n)]
        self.bbox_embed = nn.ModuleList(boxes)
        self.class_embed = nn.ModuleList(classes)
        self.transformer.decoder.bbox_embed = self.bbox_embed
        # denoising training (DINO's CDN): label queries embed a phrase index (IDEA/DINO name `label_enc`)
        self.dn_number = int(cfg.get("dn_number", 0))
        if self.dn_number > 0:
            self.label_enc = nn.Embedding(cfg.dn_labelbook_size + 1, d)
        # phrase delimiters of this text encoder's vocab, for callers that give no sub-sentence mask
        self.register_buffer("special_token_ids", torch.tensor(list(special_token_ids), dtype=torch.long),
                             persistent=False)

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Recompute Swin blocks and encoder/decoder layers in backward instead of storing their activations
        (train.activation_checkpoint)."""
        self.backbone.set_activation_checkpointing(enabled)
        self.transformer.encoder.use_checkpoint = enabled
        self.transformer.decoder.use_checkpoint = enabled

    def _input_projections(self, num_levels: int, d: int) -> nn.ModuleList:
        """1x1 conv + GroupNorm per backbone level; 3x3 stride-2 convs for the extra levels."""
        projs = []
        for c in self.backbone.channels:
            projs.append(nn.Sequential(nn.Conv2d(c, d, kernel_size=1), GroupNorm(32, d)))
        in_c = self.backbone.channels[-1]
        for _ in range(num_levels - len(self.backbone.channels)):
            projs.append(nn.Sequential(nn.Conv2d(in_c, d, kernel_size=3, stride=2, padding=1), GroupNorm(32, d)))
            in_c = d
        for proj in projs:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.constant_(proj[0].bias, 0)
        return nn.ModuleList(projs)

    def encode_text(self, input_ids, attention_mask, token_type_ids=None, position_ids=None,
                    text_self_attention_mask=None) -> Dict[str, torch.Tensor]:
        """BERT with the sub-sentence mask, projected to hidden_dim. Returns {"text": (B, L, C),
        "text_token_mask": (B, L) bool, "text_self_attention_mask": (B, L, L), "position_ids": (B, L)}."""
        if text_self_attention_mask is None or position_ids is None:
            masks = sub_sentence_masks(input_ids, attention_mask, self.special_token_ids.to(input_ids.device))
            text_self_attention_mask = masks["text_self_attention_mask"]
            position_ids = masks["position_ids"]
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        L = self.max_text_len
        input_ids, attention_mask, token_type_ids, position_ids = (
            t[:, :L] for t in (input_ids, attention_mask, token_type_ids, position_ids))
        text_self_attention_mask = text_self_attention_mask[:, :L, :L].bool()
        hidden = self.bert(input_ids=input_ids, attention_mask=additive_mask(text_self_attention_mask[:, None]),
                           token_type_ids=token_type_ids, position_ids=position_ids).last_hidden_state
        return {"text": self.feat_map(hidden), "text_token_mask": attention_mask.bool(),
                "text_self_attention_mask": text_self_attention_mask, "position_ids": position_ids}

    def image_levels(self, images: torch.Tensor, padding_mask: torch.Tensor) -> ImageLevels:
        """Backbone + input projections: ImageLevels of per-level (B, C, H_l, W_l) maps, (B, H_l, W_l) padding
        masks and (B, C, H_l, W_l) position encodings, and the (B, 2) unpadded input sizes."""
        features = self.backbone(images, padding_mask)
        srcs, masks = [], []
        for lvl, (feat, mask) in enumerate(features):
            srcs.append(self.input_proj[lvl](feat))
            masks.append(mask)
        for lvl in range(len(features), len(self.input_proj)):
            src = self.input_proj[lvl](features[-1][0] if lvl == len(features) else srcs[-1])
            masks.append(nn.functional.interpolate(padding_mask[None].float(), size=src.shape[-2:])[0].bool())
            srcs.append(src)
        pos = [self.position_embedding(m).to(s.dtype) for s, m in zip(srcs, masks)]
        sizes = torch.stack([(~padding_mask[:, :, 0]).sum(1), (~padding_mask[:, 0, :]).sum(1)], 1)
        return ImageLevels(srcs, masks, pos, sizes)

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: Optional[torch.Tensor] = None, position_ids: Optional[torch.Tensor] = None,
                text_self_attention_mask: Optional[torch.Tensor] = None,
                padding_mask: Optional[torch.Tensor] = None, targets: Optional[list] = None) -> Dict[str, Any]:
        """images: (B, 3, H, W) normalized; text inputs (B, L) (and (B, L, L)) as PromptEncoder.encode gives;
        padding_mask: (B, H, W) True on padding (None: no padding); targets (training with model.dn_number > 0):
        per image {"boxes", "phrase_ids"} for denoising queries, whose outputs come back under "dn_outputs"."""
        text = self.encode_text(input_ids, attention_mask, token_type_ids, position_ids, text_self_attention_mask)
        return self.forward_with_text(images, text, padding_mask, targets)

    def forward_with_text(self, images: torch.Tensor, text: Dict[str, torch.Tensor],
                          padding_mask: Optional[torch.Tensor] = None, targets: Optional[list] = None) -> Dict[str, Any]:
        """forward() with the text already encoded by encode_text(): inference encodes each distinct prompt
        once. A text batch of 1 is broadcast over the images."""
        if padding_mask is None:
            padding_mask = torch.zeros(images.shape[0], *images.shape[-2:], dtype=torch.bool, device=images.device)
        return self.forward_from_levels(self.image_levels(images, padding_mask), text, targets)

    def forward_from_levels(self, levels, text: Dict[str, torch.Tensor], targets: Optional[list] = None
                            ) -> Dict[str, Any]:
        """forward_with_text() from image_levels()'s output: a predictor with several prompts per image (a long
        class list in chunks) runs the image backbone once and this once per prompt."""
        srcs, masks, pos, sizes = levels
        B = srcs[0].shape[0]
        if text["text"].shape[0] != B:
            text = {k: v.expand(B, *v.shape[1:]) for k, v in text.items()}
        dn = None
        if self.training and targets is not None and self.dn_number > 0:
            dn = prepare_denoising(targets, self.dn_number, self.cfg.dn_label_noise_ratio,
                                   self.cfg.dn_box_noise_scale, self.transformer.num_queries, self.label_enc)
        out = self.transformer(srcs, masks, pos, text["text"], text["text_token_mask"],
                               text["text_self_attention_mask"], text["position_ids"], dn[:3] if dn else None)
        if dn is None and self.training and self.dn_number > 0:
            # a batch with no box to denoise: keep label_enc in the graph (zero gradient) so DDP's reducer, which
            # expects every parameter each step, does not fail
            out["hidden"][-1] = out["hidden"][-1] + 0.0 * self.label_enc.weight.sum()
        token_mask = text["text_token_mask"]
        logits: List[torch.Tensor] = []
        boxes: List[torch.Tensor] = []
        for lid, hs in enumerate(out["hidden"]):
            logits.append(self.class_embed[lid](hs, out["text"], token_mask))
            boxes.append((self.bbox_embed[lid](hs) + inverse_sigmoid(out["references"][lid])).sigmoid())
        result: Dict[str, Any] = {}
        if dn is not None:  # split off the denoising queries (the first pad_size)
            P = dn[3]["pad_size"]
            dn_layers = [{"pred_logits": a[:, :P], "pred_boxes": b[:, :P]} for a, b in zip(logits, boxes)]
            result["dn_outputs"] = {**dn_layers[-1], "aux_outputs": dn_layers[:-1], "meta": dn[3]}
            logits, boxes = [a[:, P:] for a in logits], [b[:, P:] for b in boxes]
        # padded queries (fewer image tokens than queries): -inf on every token, as text padding is, so they
        # never score, never match and never enter a loss (query_selection.real_queries reads them back)
        padded = ~out["query_mask"][:, :, None]
        logits = [a.masked_fill(padded, float("-inf")) for a in logits]
        result.update({
            "pred_logits": logits[-1],
            "pred_boxes": boxes[-1],
            "aux_outputs": [{"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], boxes[:-1])],
            "interm_outputs": {"pred_logits": out["interm_logits"], "pred_boxes": out["interm_boxes"]},
            "text_token_mask": token_mask,
        })
        self.add_outputs(result, out, sizes, dn[3]["pad_size"] if dn is not None else 0)
        return result

    def add_outputs(self, result: Dict[str, Any], transformer_out: Dict[str, Any], sizes: torch.Tensor,
                    num_denoising: int) -> None:
        """Hook for heads beyond boxes and phrases (Mask Grounding DINO's masks): `result` as forward() returns
        it, the transformer's outputs, the (B, 2) unpadded input sizes and the denoising queries in front of
        the matching ones. Grounding DINO adds nothing."""
