"""State-dict key conversions between Grounding DINO weight layouts: IDEA-Research's, transformers', ours.

Pure dict[str, Tensor] -> dict[str, Tensor] transformations; nothing here builds a model.

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

Facts this module relies on, with where they were checked
---------------------------------------------------------
IDEA-Research/GroundingDINO `groundingdino/models/GroundingDINO/`:
  * `backbone/swin_transformer.py`: `patch_embed.proj` (Conv2d) / `patch_embed.norm`;
    `layers.i.blocks.j.{norm1, attn.qkv, attn.proj, attn.relative_position_bias_table, norm2, mlp.fc1,
    mlp.fc2}`; `layers.i.downsample.{reduction (no bias), norm}`; one output LayerNorm `norm{k}` per
    entry k of `out_indices` only. `WindowAttention` registers `relative_position_index` as a (persistent)
    buffer, so it is in the checkpoints; the shifted-window `attn_mask` is computed in `BasicLayer.forward`
    (the original Microsoft Swin keeps it as a buffer). `qkv` is reshaped `(B, N, 3, heads, C/heads)`, so
    rows [0:C] are q, [C:2C] k, [2C:3C] v. PatchMerging concatenates `x[:, 0::2, 0::2]`,
    `x[:, 1::2, 0::2]`, `x[:, 0::2, 1::2]`, `x[:, 1::2, 1::2]` (dim 1 = height) before `norm` and
    `reduction`; transformers 5.23 `SwinPatchMerging` concatenates
    `[x[:, row::2, col::2] for col in range(2) for row in range(2)]` = the same four slices in the same
    order, so `downsample.reduction` / `downsample.norm` copy over unchanged. Both compute the relative
    position index with the same formula, so `relative_position_bias_table` copies unchanged too.
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
transformers 5.23 (installed):
  * `conversion_mapping.py` renames old SwinModel keys on load (`attention.self.query` -> `attention.q_proj`,
    `attention.self.relative_position_bias_table` -> `attention.relative_position_bias.
    relative_position_bias_table`, `attention.output.dense` -> `attention.o_proj`, `intermediate.dense` ->
    `mlp.fc1`, `output.dense` -> `mlp.fc2`; SwinBackbone `embeddings.`/`encoder.` -> `swin.embeddings.`/
    `swin.encoder.`), and `save_pretrained` writes the *old* names back to disk. Hub / saved HF Grounding
    DINO files therefore hold the old names; `hf_to_ours` accepts both.
  * `GroundingDinoForObjectDetection._tied_weights_keys` ties `bbox_embed.{1..}` to `bbox_embed.0` and
    `model.decoder.bbox_embed` to `bbox_embed`; saved files omit the tied copies (`hf_to_ours` fills them).
  * `SwinBackbone` holds an unused `swin.layernorm` (ignored when missing on load); `relative_position_index`
    is a non-persistent buffer; the HF text backbone is a BertModel without pooler.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

StateDict = dict[str, Tensor]

IDEA_BACKBONE_PREFIX = "backbone.0."
OURS_BACKBONE_PREFIX = "backbone.body."
HF_BACKBONE_PREFIX = "model.backbone.conv_encoder.model."

# Deterministic buffers, recomputed by the modules that own them: dropped, never reported.
_RECOMPUTED_BUFFER = re.compile(r"(^|\.)(relative_position_index|attn_mask)$")
_IDEA_RECOMPUTED_KEYS = frozenset({"bert.embeddings.position_ids", "bert.embeddings.token_type_ids"})

# Weights that our model may lack without any effect on its outputs: IDEA's BERT pooler (frozen, its output
# unused; our BertModel has no pooler) and SwinBackbone's final `swin.layernorm` (SwinBackbone.forward never
# applies it; absent from IDEA checkpoints). A loader may tolerate these as unused/missing; see is_optional_key.
OPTIONAL_KEY_PREFIXES = ("bert.pooler.", OURS_BACKBONE_PREFIX + "swin.layernorm.")


def is_optional_key(key: str) -> bool:
    """Whether `key` (ours layout) names a weight the model's outputs never depend on (OPTIONAL_KEY_PREFIXES)."""
    return key.startswith(OPTIONAL_KEY_PREFIXES)


# --------------------------------------------------------------------------------------------------------
# Key templates: "a.{i}.b.{rest}" matches "a.3.b.weight"; {rest} is any tail, {kind} is weight|bias, any
# other field a non-negative integer. A pair of templates converts both ways.
# --------------------------------------------------------------------------------------------------------
_FIELD = re.compile(r"\{(\w+)\}")


def _template_regex(template: str) -> re.Pattern[str]:
    parts, pos = [], 0
    for m in _FIELD.finditer(template):
        parts.append(re.escape(template[pos:m.start()]))
        name = m.group(1)
        pattern = {"rest": ".+", "kind": "weight|bias"}.get(name, r"\d+")
        parts.append(f"(?P<{name}>{pattern})")
        pos = m.end()
    parts.append(re.escape(template[pos:]))
    return re.compile("^" + "".join(parts) + "$")


class _Renames:
    """Ordered (left, right) template pairs; the first pair whose side matches a key renames it."""

    def __init__(self, pairs: Iterable[tuple[str, str]]):
        self.pairs = [(a, b, _template_regex(a), _template_regex(b)) for a, b in pairs]

    def left_to_right(self, key: str) -> str | None:
        for _, b, ra, _ in self.pairs:
            m = ra.match(key)
            if m:
                return b.format(**m.groupdict())
        return None

    def right_to_left(self, key: str) -> str | None:
        for a, _, _, rb in self.pairs:
            m = rb.match(key)
            if m:
                return a.format(**m.groupdict())
        return None


class _Fused:
    """Separate q/k/v Linear layers (left: `{base}.{proj}.{kind}` for the three proj names) <-> one fused
    (3C, ...) tensor (right), rows in q, k, v order."""

    def __init__(self, specs: Iterable[tuple[str, tuple[str, str, str], str]]):
        # (left base template, proj names, right template with {kind})
        self.specs = []
        for left_base, projs, right in specs:
            lefts = [_template_regex(f"{left_base}.{p}.{{kind}}") for p in projs]
            self.specs.append((left_base, projs, right, lefts, _template_regex(right)))

    def fuse(self, sd: Mapping[str, Tensor]) -> tuple[StateDict, list[str], set[str]]:
        """Returns (fused tensors, keys of incomplete q/k/v groups, every key consumed or reported)."""
        groups: dict[str, list[str | None]] = {}
        for key in sd:
            for _, _, right, lefts, _ in self.specs:
                for idx, regex in enumerate(lefts):
                    m = regex.match(key)
                    if m:
                        groups.setdefault(right.format(**m.groupdict()), [None, None, None])[idx] = key
                        break
                else:
                    continue
                break
        out: StateDict = {}
        incomplete: list[str] = []
        seen: set[str] = set()
        for fused_key, members in groups.items():
            present = [k for k in members if k is not None]
            seen.update(present)
            if len(present) == 3:
                out[fused_key] = torch.cat([sd[k] for k in present], dim=0)
            else:
                incomplete.extend(present)
        return out, incomplete, seen

    def matches_right(self, key: str) -> bool:
        return any(spec[4].match(key) for spec in self.specs)

    def split(self, key: str, value: Tensor) -> StateDict | None:
        """{left key: chunk} for a fused key; {} if it matches but cannot be split in thirds; None if no match."""
        for left_base, projs, _, _, right_re in self.specs:
            m = right_re.match(key)
            if m:
                if value.ndim == 0 or value.shape[0] % 3:
                    return {}
                fields = m.groupdict()
                base = left_base.format(**{k: v for k, v in fields.items() if k != "kind"})
                return {f"{base}.{p}.{fields['kind']}": chunk.clone()
                        for p, chunk in zip(projs, value.chunk(3, dim=0))}
        return None


# --------------------------------------------------------------------------------------------------------
# Swin: original (IDEA / Microsoft Swin-Transformer) <-> transformers SwinBackbone
# --------------------------------------------------------------------------------------------------------
_BLOCK_HF = "swin.encoder.layers.{i}.blocks.{j}"
_BLOCK_IDEA = "layers.{i}.blocks.{j}"
# (HF SwinBackbone, original Swin)
_SWIN_RENAMES = _Renames([
    ("swin.embeddings.patch_embeddings.projection.{rest}", "patch_embed.proj.{rest}"),
    ("swin.embeddings.norm.{rest}", "patch_embed.norm.{rest}"),
    (f"{_BLOCK_HF}.layernorm_before.{{rest}}", f"{_BLOCK_IDEA}.norm1.{{rest}}"),
    (f"{_BLOCK_HF}.attention.relative_position_bias.relative_position_bias_table",
     f"{_BLOCK_IDEA}.attn.relative_position_bias_table"),
    (f"{_BLOCK_HF}.attention.o_proj.{{rest}}", f"{_BLOCK_IDEA}.attn.proj.{{rest}}"),
    (f"{_BLOCK_HF}.layernorm_after.{{rest}}", f"{_BLOCK_IDEA}.norm2.{{rest}}"),
    (f"{_BLOCK_HF}.mlp.fc1.{{rest}}", f"{_BLOCK_IDEA}.mlp.fc1.{{rest}}"),
    (f"{_BLOCK_HF}.mlp.fc2.{{rest}}", f"{_BLOCK_IDEA}.mlp.fc2.{{rest}}"),
    ("swin.encoder.layers.{i}.downsample.reduction.{rest}", "layers.{i}.downsample.reduction.{rest}"),
    ("swin.encoder.layers.{i}.downsample.norm.{rest}", "layers.{i}.downsample.norm.{rest}"),
    # the classification models' final norm (Microsoft Swin `norm`, SwinModel `layernorm`); IDEA has none
    ("swin.layernorm.{rest}", "norm.{rest}"),
])
_SWIN_FUSED = _Fused([(f"{_BLOCK_HF}.attention", ("q_proj", "k_proj", "v_proj"), f"{_BLOCK_IDEA}.attn.qkv.{{kind}}")])
# output norms: IDEA norm{k} (k = stage index from 0) <-> hidden_states_norms.stage{k+1}
_IDEA_OUT_NORM = re.compile(r"^norm(\d+)\.(.+)$")
_HF_OUT_NORM = re.compile(r"^hidden_states_norms\.stage(\d+)\.(.+)$")

# transformers 4.x SwinBackbone names (what save_pretrained still writes) -> 5.x, applied in order
_HF_SWIN_LEGACY = [
    (re.compile(r"^embeddings\."), "swin.embeddings."),
    (re.compile(r"^encoder\."), "swin.encoder."),
    (re.compile(r"\.attention\.self\.query\."), ".attention.q_proj."),
    (re.compile(r"\.attention\.self\.key\."), ".attention.k_proj."),
    (re.compile(r"\.attention\.self\.value\."), ".attention.v_proj."),
    (re.compile(r"\.attention\.self\.relative_position_bias_table$"),
     ".attention.relative_position_bias.relative_position_bias_table"),
    (re.compile(r"\.attention\.self\.relative_position_index$"), ".attention.relative_position_index"),
    (re.compile(r"\.attention\.output\.dense\."), ".attention.o_proj."),
    (re.compile(r"(\.blocks\.\d+)\.intermediate\.dense\."), r"\1.mlp.fc1."),
    (re.compile(r"(\.blocks\.\d+)\.output\.dense\."), r"\1.mlp.fc2."),
]
_LOOKS_LIKE_SWIN = re.compile(r"^(swin\.)?(embeddings\.patch_embeddings|encoder\.layers\.\d+\.blocks)\.")


def _normalize_hf_swin(sd: Mapping[str, Tensor]) -> StateDict:
    """SwinBackbone state dict in transformers 4.x or 5.x names -> 5.x names. Non-Swin dicts pass unchanged."""
    if not any(_LOOKS_LIKE_SWIN.match(k) for k in sd):
        return dict(sd)
    out: StateDict = {}
    for key, value in sd.items():
        for regex, repl in _HF_SWIN_LEGACY:
            key = regex.sub(repl, key)
        out[key] = value
    return out


def _idea_swin_to_hf(sd: Mapping[str, Tensor]) -> tuple[StateDict, list[str]]:
    out: StateDict = {}
    unused: list[str] = []
    for key, value in sd.items():
        if _RECOMPUTED_BUFFER.search(key):
            continue
        split = _SWIN_FUSED.split(key, value)
        if split is not None:
            if split:
                out.update(split)
            else:
                unused.append(key)
            continue
        m = _IDEA_OUT_NORM.match(key)
        if m:
            out[f"hidden_states_norms.stage{int(m.group(1)) + 1}.{m.group(2)}"] = value
            continue
        new = _SWIN_RENAMES.right_to_left(key)
        if new is None:
            unused.append(key)
        else:
            out[new] = value
    return out, unused


def _hf_swin_to_idea(sd: Mapping[str, Tensor]) -> tuple[StateDict, list[str]]:
    sd = {k: v for k, v in _normalize_hf_swin(sd).items() if not _RECOMPUTED_BUFFER.search(k)}
    out, unused, seen = _SWIN_FUSED.fuse(sd)
    for key, value in sd.items():
        if key in seen:
            continue
        m = _HF_OUT_NORM.match(key)
        if m and int(m.group(1)) >= 1:
            out[f"norm{int(m.group(1)) - 1}.{m.group(2)}"] = value
            continue
        new = _SWIN_RENAMES.left_to_right(key)
        if new is None:
            unused.append(key)
        else:
            out[new] = value
    return out, unused


def _strict(result: tuple[StateDict, list[str]], what: str, strict: bool) -> StateDict:
    out, unused = result
    if unused and strict:
        raise ValueError(f"{what}: {len(unused)} key(s) fit nowhere:\n{describe_mismatch((), (), unused)}")
    return out


def idea_swin_to_hf(sd: Mapping[str, Tensor], strict: bool = True) -> StateDict:
    """Original Swin-Transformer (IDEA's `backbone.0.*` with that prefix removed) -> transformers
    SwinBackbone state dict (5.x names). `qkv` is split in thirds along dim 0 into q_proj/k_proj/v_proj;
    `norm{k}` becomes `hidden_states_norms.stage{k+1}`; `relative_position_index` / `attn_mask` buffers are
    dropped. Keys that fit nowhere raise ValueError (strict) or are left out (strict=False)."""
    return _strict(_idea_swin_to_hf(sd), "idea_swin_to_hf", strict)


def hf_swin_to_idea(sd: Mapping[str, Tensor], strict: bool = True) -> StateDict:
    """transformers SwinBackbone state dict (4.x or 5.x names) -> original Swin-Transformer names; the
    inverse of idea_swin_to_hf (q/k/v concatenated into `attn.qkv`, stage{s} -> norm{s-1})."""
    return _strict(_hf_swin_to_idea(sd), "hf_swin_to_idea", strict)


# --------------------------------------------------------------------------------------------------------
# Whole model: HF GroundingDinoForObjectDetection <-> IDEA names (= ours outside the backbone)
# --------------------------------------------------------------------------------------------------------
_ENC_HF, _ENC_IDEA = "model.encoder.layers.{i}", "transformer.encoder"
_DEC_HF, _DEC_IDEA = "model.decoder.layers.{i}", "transformer.decoder.layers.{i}"

# (HF, IDEA), from convert_grounding_dino_to_hf.py's create_rename_keys, inverted
_HF_IDEA_RENAMES = _Renames([
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
_HF_IDEA_FUSED = _Fused([
    (f"{_ENC_HF}.text_enhancer_layer.self_attn", _QKV, f"{_ENC_IDEA}.text_layers.{{i}}.self_attn.in_proj_{{kind}}"),
    (f"{_DEC_HF}.self_attn", _QKV, f"{_DEC_IDEA}.self_attn.in_proj_{{kind}}"),
    (f"{_DEC_HF}.encoder_attn_text", _QKV, f"{_DEC_IDEA}.ca_text.in_proj_{{kind}}"),
])
# Our names with no IDEA/HF counterpart but a place in our model (MM-Grounding-DINO style contrastive-head
# log_scale / bias, present only when configured): kept by idea_to_ours, unused for ours_to_hf.
_OURS_ONLY = _Renames([("class_embed.{i}.{rest}", "class_embed.{i}.{rest}"),
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
    brought to 5.x names; relative_position_index buffers are dropped). fill_tied: add the tied
    bbox_embed copies a saved file omits (see _fill_tied_bbox_embed)."""
    sd = unwrap_checkpoint(sd)
    backbone = {k[len(HF_BACKBONE_PREFIX):]: v for k, v in sd.items() if k.startswith(HF_BACKBONE_PREFIX)}
    rest = {k: v for k, v in sd.items() if not k.startswith(HF_BACKBONE_PREFIX)}
    ours: StateDict = {}
    for key, value in _normalize_hf_swin(backbone).items():
        if not _RECOMPUTED_BUFFER.search(key):
            ours[OURS_BACKBONE_PREFIX + key] = value
    fused, unused, seen = _HF_IDEA_FUSED.fuse(rest)
    ours.update(fused)
    for key, value in rest.items():
        if key in seen:
            continue
        new = _HF_IDEA_RENAMES.left_to_right(key)
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
    unused: list[str] = []
    for key, value in sd.items():
        if key.startswith(OURS_BACKBONE_PREFIX):
            if not _RECOMPUTED_BUFFER.search(key):
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
            or _OURS_ONLY.right_to_left(key) is not None)


def idea_to_ours(sd: Any) -> tuple[StateDict, list[str]]:
    """IDEA checkpoint (the torch.load'ed object or its state dict; `"model"` nesting and `module.` prefixes
    are removed) -> (ours, unused_keys).

    `backbone.0.*` (IDEA's Swin) goes through idea_swin_to_hf to `backbone.body.*`; every other key keeps its
    name when it is a Grounding DINO name this module knows (the IDEA side of the HF conversion table), else
    it is reported unused. Recomputed buffers (relative_position_index, attn_mask, bert position_ids /
    token_type_ids) are dropped. IDEA's `bert.pooler.*` is kept: see OPTIONAL_KEY_PREFIXES."""
    sd = unwrap_checkpoint(sd)
    swin = {k[len(IDEA_BACKBONE_PREFIX):]: v for k, v in sd.items() if k.startswith(IDEA_BACKBONE_PREFIX)}
    body, swin_unused = _idea_swin_to_hf(swin)
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


def ours_to_idea(sd: Mapping[str, Tensor]) -> tuple[StateDict, list[str]]:
    """Ours -> IDEA layout (`backbone.body.*` back to `backbone.0.*` original Swin names) -> (idea, unused_keys).
    The inverse of idea_to_ours for Swin backbones; a ResNet backbone has no IDEA counterpart here."""
    body = {k[len(OURS_BACKBONE_PREFIX):]: v for k, v in sd.items() if k.startswith(OURS_BACKBONE_PREFIX)}
    swin, swin_unused = _hf_swin_to_idea(body)
    idea = {IDEA_BACKBONE_PREFIX + k: v for k, v in swin.items()}
    unused = [OURS_BACKBONE_PREFIX + k for k in swin_unused]
    for key, value in sd.items():
        if not key.startswith(OURS_BACKBONE_PREFIX):
            idea[key] = value
    return idea, unused


# --------------------------------------------------------------------------------------------------------
# Checkpoint containers and reporting
# --------------------------------------------------------------------------------------------------------
_NESTING_KEYS = ("model", "state_dict", "model_state_dict")


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and any(isinstance(v, Tensor) for v in obj.values()) and not any(
        isinstance(v, Mapping) for v in obj.values())


def unwrap_checkpoint(obj: Any) -> StateDict:
    """The state dict inside a loaded checkpoint: follows {"model": ...} (IDEA), {"state_dict": ...}
    (Lightning) and {"model_state_dict": ...} nesting, then strips leading DDP `module.` prefixes.
    Raises ValueError when no state dict is found."""
    seen = 0
    while not _is_state_dict(obj):
        if not isinstance(obj, Mapping) or seen > 8:
            raise ValueError(f"not a checkpoint or state dict: {type(obj).__name__}")
        inner = next((obj[k] for k in _NESTING_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            raise ValueError(f"no state dict in checkpoint with keys {sorted(map(str, obj))[:20]} "
                             f"(looked for {list(_NESTING_KEYS)})")
        obj, seen = inner, seen + 1
    out: StateDict = {}
    for key, value in obj.items():
        while key.startswith("module."):
            key = key[len("module."):]
        out[key] = value
    return out


def _group(key: str) -> str:
    """`transformer.decoder.layers.5.self_attn.in_proj_weight` -> `transformer.decoder.layers.5`; a key with no
    index -> its module path (`feat_map.weight` -> `feat_map`)."""
    parts = key.split(".")
    for idx, part in enumerate(parts[:-1]):
        if part.isdigit():
            return ".".join(parts[:idx + 1])
    return ".".join(parts[:-1]) or key


def _natural(text: str) -> list:
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", text)]


def describe_mismatch(missing: Iterable[str], unexpected: Iterable[str], unused: Iterable[str] = (),
                      max_groups: int = 40) -> str:
    """Human-readable summary of keys that did not match, grouped by prefix, one line per group:
    `missing: transformer.decoder.layers.5.* (18 keys)`, `unexpected: feat_map.weight`. unused: keys a
    conversion could not place. Returns "" when all are empty."""
    lines: list[str] = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("unused", unused)):
        groups: dict[str, list[str]] = {}
        for key in keys:
            groups.setdefault(_group(key), []).append(key)
        ordered = sorted(groups, key=_natural)
        for name in ordered[:max_groups]:
            members = groups[name]
            lines.append(f"{label}: {members[0]}" if len(members) == 1 else f"{label}: {name}.* ({len(members)} keys)")
        if len(ordered) > max_groups:
            more = ordered[max_groups:]
            lines.append(f"{label}: ... and {len(more)} more groups ({sum(len(groups[g]) for g in more)} keys)")
    return "\n".join(lines)


__all__ = [
    "HF_BACKBONE_PREFIX",
    "IDEA_BACKBONE_PREFIX",
    "OPTIONAL_KEY_PREFIXES",
    "OURS_BACKBONE_PREFIX",
    "describe_mismatch",
    "hf_swin_to_idea",
    "hf_to_ours",
    "idea_swin_to_hf",
    "idea_to_ours",
    "is_optional_key",
    "ours_to_hf",
    "ours_to_idea",
    "unwrap_checkpoint",
]
