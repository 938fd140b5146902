"""State-dict key conversions between Grounding DINO weight layouts: IDEA-Research's, transformers', TAO's, ours.

Pure dict[str, Tensor] -> dict[str, Tensor] transformations; nothing here builds a model. The generic key
machinery lives in groundlab.models.common.key_templates, the Swin backbone conversions (and the Swin facts
they rely on) in groundlab.models.common.swin_keys; both are re-exported here.

Layouts
-------
* **IDEA** (`groundingdino_swint_ogc.pth`, `groundingdino_swinb_cogcoor.pth`): the model is stored under
  `"model"`, keys may carry a DDP `module.` prefix. The image backbone is IDEA's own Swin implementation at
  `backbone.0.` (the `Joiner` is an `nn.Sequential(backbone, position_embedding)`, so index 0 is the Swin
  module itself), the text encoder a transformers BERT at `bert.` (IDEA's `BertModelWarper` re-exposes the
  BertModel's `embeddings` / `encoder` / `pooler`, so the names are BertModel's), and the rest is IDEA's
  `transformer.*`, `feat_map`, `input_proj`, `bbox_embed` modules.
* **ours** (groundlab's GroundingDINO): IDEA's names everywhere, except the image backbone, a transformers
  SwinBackbone / ResNetBackbone at `backbone.body.` with transformers' own names (of the installed
  transformers, 5.x: `swin.embeddings.*`, `swin.encoder.layers.i.blocks.j.attention.{q,k,v,o}_proj`, ...).
* **HF** (`transformers.GroundingDinoForObjectDetection.state_dict()`): `model.*` + top-level `bbox_embed.*`.
* **TAO** (NVIDIA TAO Toolkit `grounding_dino` / `mask_grounding_dino` Lightning checkpoints): the weights under
  `"state_dict"`, every key prefixed `model.model.` (the Lightning module's `model` is a wrapper whose `model` is
  the GroundingDINO / MaskGroundingDINO); the top level may say `"tao_model": "grounding_dino"` or
  `"mask_grounding_dino"`. Names are IDEA's, except the Swin backbone at `backbone.0.body.` (TAO's
  `BackboneBase` keeps the Swin as `.body`, inside the Joiner at index 0), itself with IDEA's Swin names.
* **Mask head** (Mask Grounding DINO, TAO's `MaskGroundingDINO`): `controller.layers.{0,1,2}` (the MLP that
  predicts the dynamic mask-head parameters) and `mask_head.{lay1,lay2,lay3,lay4,jia_dcn}` (MaskHeadConv),
  the same names in every layout and in our MaskGroundingDINO; see MASK_HEAD_PREFIXES.

Facts this module relies on, with where they were checked
---------------------------------------------------------
IDEA-Research/GroundingDINO `groundingdino/models/GroundingDINO/`:
  * `backbone/swin_transformer.py`: see groundlab.models.common.swin_keys.
  * `backbone/backbone.py`: a ResNet backbone would be at `backbone.0.body.*` (torchvision names) - no
    released Grounding DINO uses it; such keys are reported as unused.
  * `transformer.py`: `transformer.{level_embed, tgt_embed, enc_output, enc_output_norm, enc_out_bbox_embed,
    refpoint_embed (two_stage_type "no" only)}`; encoder `transformer.encoder.{layers, text_layers,
    fusion_layers}.i`; `DeformableTransformerEncoderLayer`: `self_attn` (MSDeformAttn), `norm1`, `linear1`,
    `linear2`, `norm2`; `DeformableTransformerDecoderLayer`: `cross_attn` (MSDeformAttn), `norm1`, `ca_text`
    (nn.MultiheadAttention), `catext_norm`, `self_attn` (nn.MultiheadAttention), `norm2`, `linear1`,
    `linear2`, `norm3`; `TransformerDecoder`: `norm`, `ref_point_head` (MLP), `bbox_embed` (set by the
    detector).
  * `transformer_vanilla.py` `TransformerEncoderLayer` (the text enhancer): `self_attn`
    (nn.MultiheadAttention), `linear1`, `linear2`, `norm1`, `norm2`.
  * `fuse_modules.py` `BiAttentionBlock`: `layer_norm_v`, `layer_norm_l`, `gamma_v`, `gamma_l`, `attn`
    (`BiMultiHeadAttention`: `v_proj`, `l_proj`, `values_v_proj`, `values_l_proj`, `out_v_proj`,
    `out_l_proj`).
  * `ms_deform_attn.py`: `sampling_offsets`, `attention_weights`, `value_proj`, `output_proj`.
  * `groundingdino.py`: `bert` (BertModel with its pooler, whose weights are frozen and unused), `feat_map`,
    `input_proj.l.{0 conv, 1 GroupNorm}`, `bbox_embed.i` (one shared MLP when
    `dec_pred_bbox_embed_share`, also assigned to `transformer.decoder.bbox_embed`), `class_embed`
    (ContrastiveEmbed, no parameters). `utils.py` MLP: `layers.k` Linear.
  * `config/GroundingDINO_SwinT_OGC.py`: `return_interm_indices = [1, 2, 3]`, `two_stage_type =
    "standard"`, `embed_init_tgt = True`, `dec_pred_bbox_embed_share = True`,
    `two_stage_bbox_embed_share = False`, `use_text_enhancer/use_fusion_layer/use_text_cross_attention`.
transformers `models/grounding_dino/convert_grounding_dino_to_hf.py` (its `create_rename_keys` and
`read_in_q_k_v_*`), the rename table inverted here: every pair of `_HF_IDEA_RENAMES` and `_HF_IDEA_FUSED`
is one of its pairs, with IDEA's `norm{k}` -> `hidden_states_norms.stage{k+1}`, in_proj split into
query/key/value in that order, `transformer.tgt_embed` -> `model.query_position_embeddings`,
`transformer.decoder.bbox_embed` -> `model.decoder.bbox_embed`, top-level `bbox_embed` unchanged.
NVIDIA/tao_pytorch_backend `nvidia_tao_pytorch/cv/`:
  * `grounding_dino/model/pl_gdino_model.py` / `mask_grounding_dino/model/pl_gdino_model.py`: `self.model` is the
    `*GDINOModel` wrapper (`build_nn_model.py`) whose `.model` is the detector; `on_save_checkpoint` writes
    `checkpoint["tao_model"]`.
  * `grounding_dino/model/backbone.py`: `BackboneBase.body` is the Swin (`backbone_v2/swin.py`: `patch_embed`,
    `layers.i.blocks.j.attn.qkv`, `layers.i.downsample`, `norm{i}` per output, as IDEA's).
  * `mask_grounding_dino/model/mask_groundingdino.py` and `model_utils.py` (`MaskHeadConv`): `controller` (MLP, 3
    layers) and `mask_head.{lay1, lay2, lay3, lay4, jia_dcn}` Conv2d (the FPN `adapter*` exist only with fpn dims,
    which TAO never passes).
  * `grounding_dino/model/groundingdino.py`: `label_enc` (nn.Embedding(dn_labelbook_size + 1, d), TAO's
    build_nn_model passing dn_labelbook_size = max_text_len) exists only when trained with denoising
    (`dn_number > 0`); it keeps its name (ours too) and is optional (OPTIONAL_KEY_PREFIXES).
transformers 5.23 (installed):
  * `conversion_mapping.py` renames old SwinModel keys on load and `save_pretrained` writes the *old* names
    back to disk (details in groundlab.models.common.swin_keys). Hub / saved HF Grounding DINO files
    therefore hold the old names; `hf_to_ours` accepts both.
  * `GroundingDinoForObjectDetection._tied_weights_keys` ties `bbox_embed.{1..}` to `bbox_embed.0` and
    `model.decoder.bbox_embed` to `bbox_embed`; saved files omit the tied copies (`hf_to_ours` fills them).
  * `SwinBackbone` holds an unused `swin.layernorm` (ignored when missing on load); `relative_position_index`
    is a non-persistent buffer; the HF text backbone is a BertModel without pooler.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Optional

from torch import Tensor

from groundlab.models.common.key_templates import Fused, Renames, StateDict, describe_mismatch, unwrap_checkpoint
from groundlab.models.common.swin_keys import (
    RECOMPUTED_BUFFER,
    hf_swin_to_idea,
    hf_swin_to_idea_with_unused,
    idea_swin_to_hf,
    idea_swin_to_hf_with_unused,
    normalize_hf_swin,
)

IDEA_BACKBONE_PREFIX = "backbone.0."
OURS_BACKBONE_PREFIX = "backbone.body."
HF_BACKBONE_PREFIX = "model.backbone.conv_encoder.model."
TAO_PREFIX = "model.model."  # Lightning module `model` -> wrapper `model` -> the detector
TAO_BACKBONE_PREFIX = "backbone.0.body."  # after TAO_PREFIX: Joiner[0] = BackboneBase, whose `body` is the Swin
TAO_MODELS = ("grounding_dino", "mask_grounding_dino")  # the checkpoint's "tao_model" field

# Deterministic buffers recomputed by the modules that own them (Swin's, RECOMPUTED_BUFFER; BERT's ids here):
# dropped, never reported.
_IDEA_RECOMPUTED_KEYS = frozenset({"bert.embeddings.position_ids", "bert.embeddings.token_type_ids"})

# Weights that our model may lack without any effect on its outputs: IDEA's BERT pooler (frozen, its output
# unused; our BertModel has no pooler) and SwinBackbone's final `swin.layernorm` (SwinBackbone.forward never
# applies it; absent from IDEA checkpoints). A loader may tolerate these as unused/missing; see is_optional_key.
# label_enc: the denoising queries' phrase embedding, used in training only (dn_number > 0); a checkpoint trained
# with denoising loads into a model without it, and one without it leaves a denoising model's table as initialized
OPTIONAL_KEY_PREFIXES = ("bert.pooler.", OURS_BACKBONE_PREFIX + "swin.layernorm.", "label_enc.")


def is_optional_key(key: str) -> bool:
    """Whether `key` (ours layout) names a weight the model's outputs never depend on (OPTIONAL_KEY_PREFIXES)."""
    return key.startswith(OPTIONAL_KEY_PREFIXES)


# Mask Grounding DINO's mask head: one name in every layout (IDEA-style, TAO, ours). A Grounding DINO checkpoint
# lacks it (a loader initializes it anew); a plain Grounding DINO has no place for it (a loader ignores it).
MASK_HEAD_PREFIXES = ("controller.", "mask_head.")
_MASK_HEAD = Renames([(name, name) for name in (
    "controller.layers.{i}.{kind}",
    "mask_head.lay1.{kind}", "mask_head.lay2.{kind}", "mask_head.lay3.{kind}", "mask_head.lay4.{kind}",
    "mask_head.jia_dcn.{kind}",
)])


# Heads a model may have or not, with one checkpoint serving both: Mask Grounding DINO's mask head, and its
# referring-segmentation region head (model.num_region_queries > 0), which an instance-segmentation (OD)
# checkpoint lacks - the usual start of a VG training.
OPTIONAL_HEADS = {"mask-head": MASK_HEAD_PREFIXES, "region-head": ("region_head.",)}


def optional_head(key: str) -> Optional[str]:
    """The OPTIONAL_HEADS name `key` lies under ("mask-head", "region-head"), or None."""
    return next((name for name, prefixes in OPTIONAL_HEADS.items() if key.startswith(prefixes)), None)


def is_mask_head_name(key: str) -> bool:
    """Whether `key` is one of the mask head's known parameter names (the _MASK_HEAD table)."""
    return _MASK_HEAD.right_to_left(key) is not None


# --------------------------------------------------------------------------------------------------------
# Whole model: HF GroundingDinoForObjectDetection <-> IDEA names (= ours outside the backbone)
# --------------------------------------------------------------------------------------------------------
_ENC_HF, _ENC_IDEA = "model.encoder.layers.{i}", "transformer.encoder"
_DEC_HF, _DEC_IDEA = "model.decoder.layers.{i}", "transformer.decoder.layers.{i}"

# (HF, IDEA), from convert_grounding_dino_to_hf.py's create_rename_keys, inverted
_HF_IDEA_RENAMES = Renames([
    # text backbone, projections, embeddings
    ("model.text_backbone.{rest}", "bert.{rest}"),
    ("model.text_projection.{rest}", "feat_map.{rest}"),
    ("model.input_proj_vision.{rest}", "input_proj.{rest}"),
    ("model.level_embed", "transformer.level_embed"),
    ("model.query_position_embeddings.{rest}", "transformer.tgt_embed.{rest}"),
    ("model.reference_points.{rest}", "transformer.refpoint_embed.{rest}"),  # two_stage=False only
    ("model.enc_output.{rest}", "transformer.enc_output.{rest}"),
    ("model.enc_output_norm.{rest}", "transformer.enc_output_norm.{rest}"),
    ("model.encoder_output_bbox_embed.layers.{rest}", "transformer.enc_out_bbox_embed.layers.{rest}"),
    # encoder: deformable image layer
    (f"{_ENC_HF}.deformable_layer.self_attn.{{rest}}", f"{_ENC_IDEA}.layers.{{i}}.self_attn.{{rest}}"),
    (f"{_ENC_HF}.deformable_layer.self_attn_layer_norm.{{rest}}", f"{_ENC_IDEA}.layers.{{i}}.norm1.{{rest}}"),
    (f"{_ENC_HF}.deformable_layer.fc1.{{rest}}", f"{_ENC_IDEA}.layers.{{i}}.linear1.{{rest}}"),
    (f"{_ENC_HF}.deformable_layer.fc2.{{rest}}", f"{_ENC_IDEA}.layers.{{i}}.linear2.{{rest}}"),
    (f"{_ENC_HF}.deformable_layer.final_layer_norm.{{rest}}", f"{_ENC_IDEA}.layers.{{i}}.norm2.{{rest}}"),
    # encoder: text enhancer (q/k/v -> in_proj in _HF_IDEA_FUSED)
    (f"{_ENC_HF}.text_enhancer_layer.self_attn.out_proj.{{rest}}",
     f"{_ENC_IDEA}.text_layers.{{i}}.self_attn.out_proj.{{rest}}"),
    (f"{_ENC_HF}.text_enhancer_layer.fc1.{{rest}}", f"{_ENC_IDEA}.text_layers.{{i}}.linear1.{{rest}}"),
    (f"{_ENC_HF}.text_enhancer_layer.fc2.{{rest}}", f"{_ENC_IDEA}.text_layers.{{i}}.linear2.{{rest}}"),
    (f"{_ENC_HF}.text_enhancer_layer.layer_norm_before.{{rest}}", f"{_ENC_IDEA}.text_layers.{{i}}.norm1.{{rest}}"),
    (f"{_ENC_HF}.text_enhancer_layer.layer_norm_after.{{rest}}", f"{_ENC_IDEA}.text_layers.{{i}}.norm2.{{rest}}"),
    # encoder: bi-directional image-text fusion
    (f"{_ENC_HF}.fusion_layer.vision_param", f"{_ENC_IDEA}.fusion_layers.{{i}}.gamma_v"),
    (f"{_ENC_HF}.fusion_layer.text_param", f"{_ENC_IDEA}.fusion_layers.{{i}}.gamma_l"),
    (f"{_ENC_HF}.fusion_layer.layer_norm_vision.{{rest}}", f"{_ENC_IDEA}.fusion_layers.{{i}}.layer_norm_v.{{rest}}"),
    (f"{_ENC_HF}.fusion_layer.layer_norm_text.{{rest}}", f"{_ENC_IDEA}.fusion_layers.{{i}}.layer_norm_l.{{rest}}"),
    (f"{_ENC_HF}.fusion_layer.attn.vision_proj.{{rest}}", f"{_ENC_IDEA}.fusion_layers.{{i}}.attn.v_proj.{{rest}}"),
    (f"{_ENC_HF}.fusion_layer.attn.text_proj.{{rest}}", f"{_ENC_IDEA}.fusion_layers.{{i}}.attn.l_proj.{{rest}}"),
    (f"{_ENC_HF}.fusion_layer.attn.values_vision_proj.{{rest}}",
     f"{_ENC_IDEA}.fusion_layers.{{i}}.attn.values_v_proj.{{rest}}"),
    (f"{_ENC_HF}.fusion_layer.attn.values_text_proj.{{rest}}",
     f"{_ENC_IDEA}.fusion_layers.{{i}}.attn.values_l_proj.{{rest}}"),
    (f"{_ENC_HF}.fusion_layer.attn.out_vision_proj.{{rest}}",
     f"{_ENC_IDEA}.fusion_layers.{{i}}.attn.out_v_proj.{{rest}}"),
    (f"{_ENC_HF}.fusion_layer.attn.out_text_proj.{{rest}}",
     f"{_ENC_IDEA}.fusion_layers.{{i}}.attn.out_l_proj.{{rest}}"),
    # decoder layers (self_attn / ca_text q/k/v -> in_proj in _HF_IDEA_FUSED)
    (f"{_DEC_HF}.self_attn.out_proj.{{rest}}", f"{_DEC_IDEA}.self_attn.out_proj.{{rest}}"),
    (f"{_DEC_HF}.self_attn_layer_norm.{{rest}}", f"{_DEC_IDEA}.norm2.{{rest}}"),
    (f"{_DEC_HF}.encoder_attn_text.out_proj.{{rest}}", f"{_DEC_IDEA}.ca_text.out_proj.{{rest}}"),
    (f"{_DEC_HF}.encoder_attn_text_layer_norm.{{rest}}", f"{_DEC_IDEA}.catext_norm.{{rest}}"),
    (f"{_DEC_HF}.encoder_attn.{{rest}}", f"{_DEC_IDEA}.cross_attn.{{rest}}"),
    (f"{_DEC_HF}.encoder_attn_layer_norm.{{rest}}", f"{_DEC_IDEA}.norm1.{{rest}}"),
    (f"{_DEC_HF}.fc1.{{rest}}", f"{_DEC_IDEA}.linear1.{{rest}}"),
    (f"{_DEC_HF}.fc2.{{rest}}", f"{_DEC_IDEA}.linear2.{{rest}}"),
    (f"{_DEC_HF}.final_layer_norm.{{rest}}", f"{_DEC_IDEA}.norm3.{{rest}}"),
    # decoder heads
    ("model.decoder.reference_points_head.{rest}", "transformer.decoder.ref_point_head.{rest}"),
    ("model.decoder.layer_norm.{rest}", "transformer.decoder.norm.{rest}"),
    ("model.decoder.bbox_embed.{rest}", "transformer.decoder.bbox_embed.{rest}"),
    ("bbox_embed.{rest}", "bbox_embed.{rest}"),
])
_QKV = ("query", "key", "value")
_HF_IDEA_FUSED = Fused([
    (f"{_ENC_HF}.text_enhancer_layer.self_attn", _QKV, f"{_ENC_IDEA}.text_layers.{{i}}.self_attn.in_proj_{{kind}}"),
    (f"{_DEC_HF}.self_attn", _QKV, f"{_DEC_IDEA}.self_attn.in_proj_{{kind}}"),
    (f"{_DEC_HF}.encoder_attn_text", _QKV, f"{_DEC_IDEA}.ca_text.in_proj_{{kind}}"),
])
# Our names with no IDEA/HF counterpart but a place in our model (MM-Grounding-DINO style contrastive-head
# log_scale / bias, present only when configured): kept by idea_to_ours, unused for ours_to_hf.
_OURS_ONLY = Renames([("class_embed.{i}.{rest}", "class_embed.{i}.{rest}"),
                       ("transformer.enc_out_class_embed.{rest}", "transformer.enc_out_class_embed.{rest}")])

_DECODER_LAYER = re.compile(r"^transformer\.decoder\.layers\.(\d+)\.")
_BBOX_EMBED = re.compile(r"^bbox_embed\.(\d+)\.(.+)$")


def _fill_tied_bbox_embed(ours: StateDict) -> None:
    """HF ties bbox_embed.{i>0} to bbox_embed.0 and model.decoder.bbox_embed to bbox_embed (so saved files
    omit the copies); IDEA's shared box head has them all. Fill the copies that are absent, in place."""
    layers = {int(m.group(1)) for k in ours if (m := _DECODER_LAYER.match(k))}
    first = {m.group(2): v for k, v in ours.items() if (m := _BBOX_EMBED.match(k)) and m.group(1) == "0"}
    for i in range(max(layers) + 1 if layers else 0):
        for rest, value in first.items():
            ours.setdefault(f"bbox_embed.{i}.{rest}", value)
    for key, value in list(ours.items()):
        m = _BBOX_EMBED.match(key)
        if m:
            ours.setdefault(f"transformer.decoder.bbox_embed.{key[len('bbox_embed.'):]}", value)


def hf_to_ours(sd: Mapping[str, Tensor], fill_tied: bool = True) -> tuple[StateDict, list[str]]:
    """transformers GroundingDinoForObjectDetection state dict (in-memory 5.x names, or a hub / save_pretrained
    file with 4.x Swin names) -> (ours, unused_keys).

    q/k/v Linear layers of the text-enhancer self-attention and of the decoder self-attention and text
    cross-attention are concatenated (q, k, v) into nn.MultiheadAttention's in_proj_weight / in_proj_bias.
    The backbone `model.backbone.conv_encoder.model.*` moves to `backbone.body.*` unchanged (Swin keys are
    brought to 5.x names; relative_position_index buffers are dropped). Mask-head keys (is_mask_head_name; HF has
    no mask head, but a converted Mask Grounding DINO may carry one) keep their names. fill_tied: add the tied
    bbox_embed copies a saved file omits (see _fill_tied_bbox_embed)."""
    sd = unwrap_checkpoint(sd)
    backbone = {k[len(HF_BACKBONE_PREFIX):]: v for k, v in sd.items() if k.startswith(HF_BACKBONE_PREFIX)}
    rest = {k: v for k, v in sd.items() if not k.startswith(HF_BACKBONE_PREFIX)}
    ours: StateDict = {}
    for key, value in normalize_hf_swin(backbone).items():
        if not RECOMPUTED_BUFFER.search(key):
            ours[OURS_BACKBONE_PREFIX + key] = value
    fused, unused, seen = _HF_IDEA_FUSED.fuse(rest)
    ours.update(fused)
    for key, value in rest.items():
        if key in seen:
            continue
        new = key if is_mask_head_name(key) else _HF_IDEA_RENAMES.left_to_right(key)
        if new is None:
            unused.append(key)
        else:
            ours[new] = value
    if fill_tied:
        _fill_tied_bbox_embed(ours)
    return ours, unused


def ours_to_hf(sd: Mapping[str, Tensor]) -> tuple[StateDict, list[str]]:
    """Ours -> transformers GroundingDinoForObjectDetection state dict (5.x names, loadable with
    load_state_dict; save_pretrained then writes HF's on-disk names) -> (hf, unused_keys). The inverse of
    hf_to_ours: in_proj_weight / in_proj_bias are split in thirds into query/key/value. IDEA-only weights
    (bert.pooler, class_embed parameters) have no place in HF and are returned as unused."""
    hf: StateDict = {}
    unused: list[str] = []  # HF has no mask head either: its keys land here
    for key, value in sd.items():
        if key.startswith(OURS_BACKBONE_PREFIX):
            if not RECOMPUTED_BUFFER.search(key):
                hf[HF_BACKBONE_PREFIX + key[len(OURS_BACKBONE_PREFIX):]] = value
            continue
        split = _HF_IDEA_FUSED.split(key, value)
        if split is not None:
            if split:
                hf.update(split)
            else:
                unused.append(key)
            continue
        new = None if key.startswith("bert.pooler.") else _HF_IDEA_RENAMES.right_to_left(key)
        if new is None:
            unused.append(key)
        else:
            hf[new] = value
    return hf, unused


def _is_idea_name(key: str) -> bool:
    return (_HF_IDEA_RENAMES.right_to_left(key) is not None or _HF_IDEA_FUSED.matches_right(key)
            or _OURS_ONLY.right_to_left(key) is not None or is_mask_head_name(key) or key == "label_enc.weight")


def idea_to_ours(sd: Any) -> tuple[StateDict, list[str]]:
    """IDEA checkpoint (the torch.load'ed object or its state dict; `"model"` nesting and `module.` prefixes
    are removed) -> (ours, unused_keys).

    `backbone.0.*` (IDEA's Swin) goes through idea_swin_to_hf to `backbone.body.*`; every other key keeps its
    name when it is a Grounding DINO name this module knows (the IDEA side of the HF conversion table), else
    it is reported unused. Recomputed buffers (relative_position_index, attn_mask, bert position_ids /
    token_type_ids) are dropped. IDEA's `bert.pooler.*` is kept: see OPTIONAL_KEY_PREFIXES. So are the mask head's
    known names (MASK_HEAD_PREFIXES): whether the model has a place for them is the loader's question."""
    sd = unwrap_checkpoint(sd)
    swin = {k[len(IDEA_BACKBONE_PREFIX):]: v for k, v in sd.items() if k.startswith(IDEA_BACKBONE_PREFIX)}
    body, swin_unused = idea_swin_to_hf_with_unused(swin)
    ours = {OURS_BACKBONE_PREFIX + k: v for k, v in body.items()}
    unused = [IDEA_BACKBONE_PREFIX + k for k in swin_unused]
    for key, value in sd.items():
        if key.startswith(IDEA_BACKBONE_PREFIX) or key in _IDEA_RECOMPUTED_KEYS:
            continue
        if _is_idea_name(key):
            ours[key] = value
        else:
            unused.append(key)
    return ours, unused


def is_tao_checkpoint(obj: Any) -> bool:
    """Whether a loaded checkpoint is TAO's: a `tao_model` field, or state-dict keys under TAO_PREFIX."""
    if isinstance(obj, Mapping) and "tao_model" in obj:
        return True
    try:
        sd = unwrap_checkpoint(obj)
    except ValueError:
        return False
    return any(k.startswith(TAO_PREFIX) for k in sd)


def tao_to_ours(obj: Any) -> tuple[StateDict, list[str]]:
    """TAO grounding_dino / mask_grounding_dino checkpoint (the torch.load'ed Lightning dict or its state dict)
    -> (ours, unused_keys).

    `model.model.` is stripped, `backbone.0.body.` (TAO's Swin) becomes IDEA's `backbone.0.`, and the rest is
    idea_to_ours (mask-head keys included). Unused keys are reported with their TAO names; keys outside
    `model.model.` (no part of the detector) are unused too. ValueError when `tao_model` names another model."""
    kind = obj.get("tao_model") if isinstance(obj, Mapping) else None
    if kind is not None and kind not in TAO_MODELS:
        raise ValueError(f"a TAO {kind!r} checkpoint, not one of {list(TAO_MODELS)}")
    idea: StateDict = {}
    unused: list[str] = []
    for key, value in unwrap_checkpoint(obj).items():
        if not key.startswith(TAO_PREFIX):
            unused.append(key)
            continue
        name = key[len(TAO_PREFIX):]
        if name.startswith(TAO_BACKBONE_PREFIX):
            name = IDEA_BACKBONE_PREFIX + name[len(TAO_BACKBONE_PREFIX):]
        elif name.startswith(IDEA_BACKBONE_PREFIX):  # beside the body: fits nowhere (kept apart from the Swin)
            unused.append(key)
            continue
        idea[name] = value
    ours, idea_unused = idea_to_ours(idea)
    for name in idea_unused:  # back to the name the user's file holds
        if name.startswith(IDEA_BACKBONE_PREFIX):
            name = TAO_BACKBONE_PREFIX + name[len(IDEA_BACKBONE_PREFIX):]
        unused.append(TAO_PREFIX + name)
    return ours, unused


def ours_to_idea(sd: Mapping[str, Tensor]) -> tuple[StateDict, list[str]]:
    """Ours -> IDEA layout (`backbone.body.*` back to `backbone.0.*` original Swin names) -> (idea, unused_keys).
    The inverse of idea_to_ours for Swin backbones; a ResNet backbone has no IDEA counterpart here."""
    body = {k[len(OURS_BACKBONE_PREFIX):]: v for k, v in sd.items() if k.startswith(OURS_BACKBONE_PREFIX)}
    swin, swin_unused = hf_swin_to_idea_with_unused(body)
    idea = {IDEA_BACKBONE_PREFIX + k: v for k, v in swin.items()}
    unused = [OURS_BACKBONE_PREFIX + k for k in swin_unused]
    for key, value in sd.items():
        if not key.startswith(OURS_BACKBONE_PREFIX):
            idea[key] = value
    return idea, unused


__all__ = [
    "HF_BACKBONE_PREFIX",
    "IDEA_BACKBONE_PREFIX",
    "MASK_HEAD_PREFIXES",
    "OPTIONAL_HEADS",
    "OPTIONAL_KEY_PREFIXES",
    "OURS_BACKBONE_PREFIX",
    "TAO_BACKBONE_PREFIX",
    "TAO_MODELS",
    "TAO_PREFIX",
    "describe_mismatch",
    "hf_swin_to_idea",
    "hf_to_ours",
    "idea_swin_to_hf",
    "idea_to_ours",
    "is_mask_head_name",
    "is_optional_key",
    "is_tao_checkpoint",
    "optional_head",
    "ours_to_hf",
    "ours_to_idea",
    "tao_to_ours",
    "unwrap_checkpoint",
]
