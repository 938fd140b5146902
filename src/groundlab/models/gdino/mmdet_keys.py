"""State-dict key conversion from mmdetection's GroundingDINO (MM-Grounding-DINO checkpoints) to ours.

Pure dict[str, Tensor] -> dict[str, Tensor] transformations; nothing here builds a model or reads a file (the
loader, groundlab.models.gdino.weights, reads the file weights-only). The conversion goes mmdet -> IDEA names
(`backbone.0.*` original Swin, `transformer.*`, `bert.*` ...), then through weight_keys.idea_to_ours, so every
IDEA fact there holds here too; keys that fit nowhere are reported with the name the user's file holds.

Layout
------
An mmdetection checkpoint is `{"meta": {...}, "state_dict": {...}}` (mmengine's Runner.save_checkpoint; a
training checkpoint adds `message_hub`, `optimizer`, `param_schedulers`; mmdet's
`tools/model_converters/publish_model.py` keeps only `meta` and `state_dict`, written with the legacy
non-zip serialization). `meta["cfg"]` is the config's text (mmengine Config.pretty_text).

Facts this module relies on, with where they were checked (open-mmlab/mmdetection, main branch)
-----------------------------------------------------------------------------------------------
* `tools/model_converters/groundingdino_to_mmdet.py` (IDEA -> mmdet, the inverse of most of this table):
  `backbone.0` -> `backbone` with `patch_embed.proj` -> `patch_embed.projection`, `layers` -> `stages`,
  `mlp.fc1` -> `ffn.layers.0.0`, `mlp.fc2` -> `ffn.layers.1`, `attn` -> `attn.w_msa`, and the patch-merging
  `downsample.reduction` / `downsample.norm` tensors re-ordered by `correct_unfold_reduction_order` /
  `correct_unfold_norm_order` (inverted in _unfold_to_idea); `bert` ->
  `language_model.language_backbone.body.model`; `feat_map` -> `text_feat_map`; `input_proj.{l}` ->
  `neck.convs.{l}` and `input_proj.3` -> `neck.extra_convs.0`, `.0.` -> `.conv.`, `.1.` -> `.gn.`;
  `transformer.level_embed` -> `level_embed`; encoder `norm1/norm2` -> `norms.0/1`, `linear1/linear2` ->
  `ffn.layers.0.0/ffn.layers.1`, text layers' `self_attn` -> `self_attn.attn`; `transformer.enc_output` ->
  `memory_trans_fc`, `enc_output_norm` -> `memory_trans_norm`; `transformer.enc_out_bbox_embed.layers.k` ->
  `bbox_head.reg_branches.6.{2k}` (6 = the number of decoder layers); `transformer.tgt_embed` ->
  `query_embedding`; decoder `norm1` -> `norms.2` (after the image cross-attention), `catext_norm` ->
  `norms.1`, `norm2` -> `norms.0` (after self-attention), `norm3` -> `norms.3`, `ca_text` ->
  `cross_attn_text.attn`, `self_attn` -> `self_attn.attn`, `cross_attn` unchanged;
  `transformer.decoder.bbox_embed.{i}.layers.{k}` (and the top-level `bbox_embed`) ->
  `bbox_head.reg_branches.{i}.{2k}`.
* `mmdet/models/detectors/grounding_dino.py` `_init_layers`: `query_embedding`, `level_embed`,
  `memory_trans_fc`, `memory_trans_norm`, `language_model`, `text_feat_map`; `pre_decoder` scores and boxes the
  encoder proposals with `bbox_head.cls_branches[decoder.num_layers]` / `reg_branches[decoder.num_layers]`
  (-> our `transformer.enc_out_class_embed` / `transformer.enc_out_bbox_embed`).
* `mmdet/models/dense_heads/grounding_dino_head.py`: `reg_branches.i` = Sequential(Linear, ReLU, Linear, ReLU,
  Linear) (indices 0, 2, 4 = our MLP `layers.0/1/2`); `ContrastiveEmbed` holds `log_scale` (a Parameter only
  when a number) and `bias` (a Parameter when `bias=True`) -> our ContrastiveEmbed's `log_scale` / `bias`;
  `share_pred_layer` (DeformableDETRHead: `not with_box_refine`) is False for Grounding DINO
  (`with_box_refine=True`), so the branches are separate copies trained apart.
* `mmdet/models/layers/transformer/grounding_dino_layers.py`: decoder layer = `self_attn` (mmcv
  MultiheadAttention: nn.MultiheadAttention at `.attn`), `norms[0]`, `cross_attn_text`, `norms[1]`,
  `cross_attn` (MultiScaleDeformableAttention: `sampling_offsets`, `attention_weights`, `value_proj`,
  `output_proj`), `norms[2]`, `ffn` (mmcv FFN: Linear at `layers.0.0`, Linear at `layers.1`), `norms[3]`;
  encoder `layers` / `text_layers` / `fusion_layers` (`mmdet/models/utils/vlfuse_helper.py`
  BiAttentionBlock: `layer_norm_v`, `layer_norm_l`, `attn.{v,l,values_v,values_l,out_v,out_l}_proj`,
  `gamma_v`, `gamma_l` - IDEA's names); decoder `ref_point_head` (MLP `layers.k`), `norm`.
* `mmdet/models/necks/channel_mapper.py`: `convs.l` = ConvModule(`conv`, `gn`) per backbone level;
  `extra_convs.0` (3x3 stride 2) reads the last backbone feature, `extra_convs.e>0` the previous output - as
  IDEA's `input_proj.{n + e}`.
* `mmdet/models/backbones/swin.py` + `mmdet/models/layers/transformer/utils.py`: `stages.i.downsample` is
  applied after stage i's blocks (IDEA's `layers.i.downsample`); `norm{i}` per out index; `WindowMSA` keeps
  `relative_position_index` as a persistent buffer (dropped here: recomputed) built by `double_step_seq` +
  `flip(1)`, which equals the original formula ((dh + Wh-1) * (2Ww-1) + dw + Ww-1), so the bias table copies
  unchanged; `qkv` is reshaped (B, N, 3, heads, C/heads) as IDEA's; `PatchMerging` gathers 2x2 patches with
  nn.Unfold, whose channels are channel-major (c * 4 + kernel position, positions row-major (0,0) (0,1)
  (1,0) (1,1)) where IDEA concatenates x0 (0,0), x1 (1,0), x2 (0,1), x3 (1,1) group-major; `absolute_pos_embed`
  exists only with `use_abs_pos_embed` (never in Grounding DINO configs; reported unused).
* `mmdet/models/language_models/bert.py`: `language_backbone` = Sequential(OrderedDict(body=BertEncoder)),
  `BertEncoder.model` = transformers BertModel (`add_pooling_layer` from the config: False in the
  MM-Grounding-DINO configs; a pooler, when present, is our optional `bert.pooler.*`).
* `mmdet/models/layers/transformer/dino_layers.py` `CdnQueryGenerator.label_embedding` =
  nn.Embedding(num_classes, embed_dims) (num_classes = bbox_head.num_classes = 256 in the configs), indexed by
  the box's label = its phrase index in the prompt: our denoising `label_enc` (nn.Embedding(
  model.dn_labelbook_size + 1, d), same meaning; training only, optional on load).
* `configs/mm_grounding_dino/grounding_dino_swin-t_pretrain_obj365.py` (the base of the MM-Grounding-DINO
  Swin-T configs): Swin-T `out_indices=(1, 2, 3)`, ChannelMapper `num_outs=4`, 6 + 6 layers, 900 queries,
  `contrastive_cfg=dict(max_text_len=256, log_scale='auto', bias=True)`, `with_box_refine=True`,
  `as_two_stage=True`, BERT `bert-base-uncased` without pooler.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from groundlab.models.common.key_templates import Renames, StateDict, unwrap_checkpoint
from groundlab.models.gdino.weight_keys import IDEA_BACKBONE_PREFIX, idea_to_ours

MMDET_BACKBONE_PREFIX = "backbone."
MMDET_BERT_PREFIX = "language_model.language_backbone.body.model."
# keys that only an mmdetection Grounding DINO has (used to recognise the layout)
MMDET_MARKERS = (MMDET_BERT_PREFIX, "bbox_head.reg_branches.", "neck.convs.", "memory_trans_fc.",
                 "query_embedding.")

# (mmdet, original Swin) inside the backbone, prefixes removed (groundingdino_to_mmdet.py / swin.py)
_SWIN = Renames([
    ("patch_embed.projection.{rest}", "patch_embed.proj.{rest}"),
    ("patch_embed.norm.{rest}", "patch_embed.norm.{rest}"),
    ("stages.{i}.blocks.{j}.attn.w_msa.{rest}", "layers.{i}.blocks.{j}.attn.{rest}"),
    ("stages.{i}.blocks.{j}.norm1.{rest}", "layers.{i}.blocks.{j}.norm1.{rest}"),
    ("stages.{i}.blocks.{j}.norm2.{rest}", "layers.{i}.blocks.{j}.norm2.{rest}"),
    ("stages.{i}.blocks.{j}.ffn.layers.0.0.{rest}", "layers.{i}.blocks.{j}.mlp.fc1.{rest}"),
    ("stages.{i}.blocks.{j}.ffn.layers.1.{rest}", "layers.{i}.blocks.{j}.mlp.fc2.{rest}"),
    ("stages.{i}.downsample.reduction.{rest}", "layers.{i}.downsample.reduction.{rest}"),
    ("stages.{i}.downsample.norm.{rest}", "layers.{i}.downsample.norm.{rest}"),
    ("norm{i}.{rest}", "norm{i}.{rest}"),
])
_DOWNSAMPLE = re.compile(r"^stages\.\d+\.downsample\.(reduction|norm)\.")

_ENC, _DEC = "encoder.layers.{i}", "decoder.layers.{i}"
_T_ENC, _T_DEC = "transformer.encoder", "transformer.decoder.layers.{i}"
# (mmdet, IDEA) outside the backbone; neck.extra_convs, bbox_head and dn_query_generator are handled apart
_REST = Renames([
    (MMDET_BERT_PREFIX + "{rest}", "bert.{rest}"),
    ("text_feat_map.{rest}", "feat_map.{rest}"),
    ("neck.convs.{l}.conv.{rest}", "input_proj.{l}.0.{rest}"),
    ("neck.convs.{l}.gn.{rest}", "input_proj.{l}.1.{rest}"),
    ("level_embed", "transformer.level_embed"),
    ("query_embedding.{rest}", "transformer.tgt_embed.{rest}"),
    ("memory_trans_fc.{rest}", "transformer.enc_output.{rest}"),
    ("memory_trans_norm.{rest}", "transformer.enc_output_norm.{rest}"),
    # encoder: deformable image layers
    (f"{_ENC}.self_attn.{{rest}}", f"{_T_ENC}.layers.{{i}}.self_attn.{{rest}}"),
    (f"{_ENC}.norms.0.{{rest}}", f"{_T_ENC}.layers.{{i}}.norm1.{{rest}}"),
    (f"{_ENC}.norms.1.{{rest}}", f"{_T_ENC}.layers.{{i}}.norm2.{{rest}}"),
    (f"{_ENC}.ffn.layers.0.0.{{rest}}", f"{_T_ENC}.layers.{{i}}.linear1.{{rest}}"),
    (f"{_ENC}.ffn.layers.1.{{rest}}", f"{_T_ENC}.layers.{{i}}.linear2.{{rest}}"),
    # encoder: text enhancer
    ("encoder.text_layers.{i}.self_attn.attn.{rest}", f"{_T_ENC}.text_layers.{{i}}.self_attn.{{rest}}"),
    ("encoder.text_layers.{i}.norms.0.{rest}", f"{_T_ENC}.text_layers.{{i}}.norm1.{{rest}}"),
    ("encoder.text_layers.{i}.norms.1.{rest}", f"{_T_ENC}.text_layers.{{i}}.norm2.{{rest}}"),
    ("encoder.text_layers.{i}.ffn.layers.0.0.{rest}", f"{_T_ENC}.text_layers.{{i}}.linear1.{{rest}}"),
    ("encoder.text_layers.{i}.ffn.layers.1.{rest}", f"{_T_ENC}.text_layers.{{i}}.linear2.{{rest}}"),
    # encoder: image-text fusion (IDEA's names)
    ("encoder.fusion_layers.{i}.{rest}", f"{_T_ENC}.fusion_layers.{{i}}.{{rest}}"),
    # decoder layers: self-attn, norms[0], text cross-attn, norms[1], image cross-attn, norms[2], ffn, norms[3]
    (f"{_DEC}.self_attn.attn.{{rest}}", f"{_T_DEC}.self_attn.{{rest}}"),
    (f"{_DEC}.norms.0.{{rest}}", f"{_T_DEC}.norm2.{{rest}}"),
    (f"{_DEC}.cross_attn_text.attn.{{rest}}", f"{_T_DEC}.ca_text.{{rest}}"),
    (f"{_DEC}.norms.1.{{rest}}", f"{_T_DEC}.catext_norm.{{rest}}"),
    (f"{_DEC}.cross_attn.{{rest}}", f"{_T_DEC}.cross_attn.{{rest}}"),
    (f"{_DEC}.norms.2.{{rest}}", f"{_T_DEC}.norm1.{{rest}}"),
    (f"{_DEC}.ffn.layers.0.0.{{rest}}", f"{_T_DEC}.linear1.{{rest}}"),
    (f"{_DEC}.ffn.layers.1.{{rest}}", f"{_T_DEC}.linear2.{{rest}}"),
    (f"{_DEC}.norms.3.{{rest}}", f"{_T_DEC}.norm3.{{rest}}"),
    ("decoder.ref_point_head.{rest}", "transformer.decoder.ref_point_head.{rest}"),
    ("decoder.norm.{rest}", "transformer.decoder.norm.{rest}"),
    ("dn_query_generator.label_embedding.weight", "label_enc.weight"),
])
_EXTRA_CONV = re.compile(r"^neck\.extra_convs\.(\d+)\.(conv|gn)\.(.+)$")
_NECK_CONV = re.compile(r"^neck\.convs\.(\d+)\.")
_DEC_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_REG = re.compile(r"^bbox_head\.reg_branches\.(\d+)\.(\d+)\.(weight|bias)$")
_CLS = re.compile(r"^bbox_head\.cls_branches\.(\d+)\.(log_scale|bias)$")
_RECOMPUTED = re.compile(r"(^|\.)(relative_position_index|position_ids|token_type_ids)$")


def is_mmdet_state(sd: Mapping[str, Any]) -> bool:
    """Whether a state dict is laid out as mmdetection's GroundingDINO (MMDET_MARKERS)."""
    return any(k.startswith(MMDET_MARKERS) for k in sd)


def _decoder_layers(sd: Mapping[str, Tensor]) -> int:
    """The number of decoder layers: the last box branch's index (mmdet's Grounding DINO is two-stage, DINO
    asserts `as_two_stage`: one branch per decoder layer plus the encoder's), else the decoder layers present."""
    branches = {int(m.group(1)) for k in sd if (m := _REG.match(k) or _CLS.match(k))}
    if branches:
        return max(branches)
    return len({int(m.group(1)) for k in sd if (m := _DEC_LAYER.match(k))})


def _unfold_to_idea(key: str, value: Tensor) -> Tensor:
    """mmdet PatchMerging (nn.Unfold: channel c, kernel position p at c * 4 + p) -> IDEA's concatenation
    (group g at g * C + c, groups x0 x1 x2 x3 = positions 0 2 1 3): the inverse of groundingdino_to_mmdet.py's
    correct_unfold_reduction_order / correct_unfold_norm_order (the permutation [0, 2, 1, 3] is its own
    inverse)."""
    if key.endswith("reduction.weight"):
        out_ch, in_ch = value.shape
        return value.reshape(out_ch, in_ch // 4, 4)[:, :, [0, 2, 1, 3]].transpose(1, 2).reshape(out_ch, in_ch)
    if value.ndim == 1:  # norm weight / bias
        return value.reshape(-1, 4)[:, [0, 2, 1, 3]].transpose(0, 1).reshape(-1)
    return value


def mmdet_to_idea(sd: Mapping[str, Tensor]) -> tuple[StateDict, list[str], dict[str, str]]:
    """mmdetection GroundingDINO state dict -> (IDEA-layout state dict, unused mmdet keys, {IDEA name: mmdet
    name}). Recomputed buffers (Swin relative_position_index, BERT position_ids / token_type_ids) are dropped."""
    n_convs = len({int(m.group(1)) for k in sd if (m := _NECK_CONV.match(k))})
    n_dec = _decoder_layers(sd)
    idea: StateDict = {}
    origin: dict[str, str] = {}
    unused: list[str] = []

    def put(name: str, value: Tensor, key: str) -> None:
        idea[name] = value
        origin[name] = key

    for key, value in sd.items():
        if _RECOMPUTED.search(key):
            continue
        if key.startswith(MMDET_BACKBONE_PREFIX):
            inner = key[len(MMDET_BACKBONE_PREFIX):]
            name = _SWIN.left_to_right(inner)
            if name is None:
                unused.append(key)
                continue
            put(IDEA_BACKBONE_PREFIX + name, _unfold_to_idea(inner, value) if _DOWNSAMPLE.match(inner) else value,
                key)
            continue
        m = _EXTRA_CONV.match(key)
        if m:  # extra levels follow the per-backbone-level projections
            put(f"input_proj.{n_convs + int(m.group(1))}.{0 if m.group(2) == 'conv' else 1}.{m.group(3)}", value, key)
            continue
        m = _REG.match(key)
        if m:
            branch, idx = int(m.group(1)), int(m.group(2))
            if idx % 2 or branch > n_dec:  # odd Sequential indices are ReLUs; more branches than layers + 1
                unused.append(key)
            elif branch == n_dec:  # two-stage: the encoder proposals' box head
                put(f"transformer.enc_out_bbox_embed.layers.{idx // 2}.{m.group(3)}", value, key)
            else:  # IDEA keeps the per-layer box heads twice (the decoder refines boxes with the same modules)
                put(f"bbox_embed.{branch}.layers.{idx // 2}.{m.group(3)}", value, key)
                put(f"transformer.decoder.bbox_embed.{branch}.layers.{idx // 2}.{m.group(3)}", value, key)
            continue
        m = _CLS.match(key)
        if m:
            branch = int(m.group(1))
            if branch > n_dec:
                unused.append(key)
            elif branch == n_dec:
                put(f"transformer.enc_out_class_embed.{m.group(2)}", value, key)
            else:
                put(f"class_embed.{branch}.{m.group(2)}", value, key)
            continue
        name = _REST.left_to_right(key)
        if name is None:
            unused.append(key)
        else:
            put(name, value, key)
    return idea, unused, origin


def mmdet_to_ours(obj: Any) -> tuple[StateDict, list[str]]:
    """mmdetection GroundingDINO checkpoint (the loaded `{"meta", "state_dict"}` dict or its state dict) ->
    (ours, unused_keys), unused keys by the names the file holds. mmdet -> IDEA (mmdet_to_idea), then
    weight_keys.idea_to_ours (the Swin to transformers' SwinBackbone names, everything else kept)."""
    idea, unused, origin = mmdet_to_idea(unwrap_checkpoint(obj))
    ours, idea_unused = idea_to_ours(idea)
    unused.extend(origin.get(name, name) for name in idea_unused)
    return ours, sorted(set(unused))


_CONTRASTIVE = re.compile(r"contrastive_cfg\s*=\s*dict\(([^)]*)\)", re.S)
_LOG_SCALE = re.compile(r"log_scale\s*=\s*(['\"]?)([\w.+-]+)\1")


def mmdet_model_settings(obj: Any) -> dict[str, Any]:
    """Our `model.*` fields that an mmdetection checkpoint determines, where its weights or its config text
    (`meta["cfg"]`, read as text, never executed) tell:

    * dec_pred_bbox_embed_share / dec_pred_class_embed_share: False when the decoder layers' box heads /
      contrastive-head parameters differ (mmdet trains separate copies), True when they are all equal;
    * class_embed_bias: whether the contrastive heads have a `bias`;
    * log_scale: a number when the heads have a learnable `log_scale` (the stored value replaces the initial
      one), else `contrastive_cfg`'s `log_scale` from the config text ("auto" or None); left out when neither
      tells (a state dict alone, log_scale 'auto' and None look alike)."""
    sd = unwrap_checkpoint(obj)
    n_dec = _decoder_layers(sd)
    out: dict[str, Any] = {}
    for field, regex in (("dec_pred_bbox_embed_share", _REG), ("dec_pred_class_embed_share", _CLS)):
        groups: dict[tuple, list[Tensor]] = {}
        for key, value in sd.items():
            m = regex.match(key)
            if m and int(m.group(1)) < n_dec:
                groups.setdefault(m.groups()[1:], []).append(value)  # the same tensor of every layer
        if groups:
            out[field] = all(all(torch.equal(v[0], x) for x in v[1:]) for v in groups.values())
    cls_params = {m.group(2) for k in sd if (m := _CLS.match(k))}
    out["class_embed_bias"] = "bias" in cls_params
    if "log_scale" in cls_params:
        out["log_scale"] = 0.0
    else:
        text = obj.get("meta", {}).get("cfg") if isinstance(obj, Mapping) and isinstance(obj.get("meta"), Mapping) \
            else None
        m = _CONTRASTIVE.search(text) if isinstance(text, str) else None
        if m:
            scale = _LOG_SCALE.search(m.group(1))
            if scale is None or scale.group(2) in ("None", "none"):
                out["log_scale"] = None
            elif scale.group(2) == "auto":
                out["log_scale"] = "auto"
    return out


__all__ = [
    "MMDET_BERT_PREFIX",
    "MMDET_MARKERS",
    "is_mmdet_state",
    "mmdet_model_settings",
    "mmdet_to_idea",
    "mmdet_to_ours",
]
