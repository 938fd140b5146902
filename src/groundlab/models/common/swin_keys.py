"""State-dict key conversions between the original Swin Transformer (IDEA-Research / Microsoft
Swin-Transformer names) and transformers' SwinBackbone.

Pure dict[str, Tensor] -> dict[str, Tensor] transformations; nothing here builds a model. Keys are those of
the backbone module itself (e.g. IDEA's `backbone.0.` / our `backbone.body.` prefix already removed).

Facts this module relies on, with where they were checked
---------------------------------------------------------
IDEA-Research/GroundingDINO `groundingdino/models/GroundingDINO/backbone/swin_transformer.py`:
  `patch_embed.proj` (Conv2d) / `patch_embed.norm`; `layers.i.blocks.j.{norm1, attn.qkv, attn.proj,
  attn.relative_position_bias_table, norm2, mlp.fc1, mlp.fc2}`; `layers.i.downsample.{reduction (no bias),
  norm}`; one output LayerNorm `norm{k}` per entry k of `out_indices` only. `WindowAttention` registers
  `relative_position_index` as a (persistent) buffer, so it is in the checkpoints; the shifted-window
  `attn_mask` is computed in `BasicLayer.forward` (the original Microsoft Swin keeps it as a buffer). `qkv` is
  reshaped `(B, N, 3, heads, C/heads)`, so rows [0:C] are q, [C:2C] k, [2C:3C] v. PatchMerging concatenates
  `x[:, 0::2, 0::2]`, `x[:, 1::2, 0::2]`, `x[:, 0::2, 1::2]`, `x[:, 1::2, 1::2]` (dim 1 = height) before
  `norm` and `reduction`; transformers 5.23 `SwinPatchMerging` concatenates
  `[x[:, row::2, col::2] for col in range(2) for row in range(2)]` = the same four slices in the same order,
  so `downsample.reduction` / `downsample.norm` copy over unchanged. Both compute the relative position index
  with the same formula, so `relative_position_bias_table` copies unchanged too.
transformers `models/grounding_dino/convert_grounding_dino_to_hf.py`: IDEA's `norm{k}` ->
`hidden_states_norms.stage{k+1}`.
transformers 5.23 (installed):
  * `conversion_mapping.py` renames old SwinModel keys on load (`attention.self.query` -> `attention.q_proj`,
    `attention.self.relative_position_bias_table` -> `attention.relative_position_bias.
    relative_position_bias_table`, `attention.output.dense` -> `attention.o_proj`, `intermediate.dense` ->
    `mlp.fc1`, `output.dense` -> `mlp.fc2`; SwinBackbone `embeddings.`/`encoder.` -> `swin.embeddings.`/
    `swin.encoder.`), and `save_pretrained` writes the *old* names back to disk; the conversions here accept
    both (normalize_hf_swin).
  * `SwinBackbone` holds an unused `swin.layernorm` (ignored when missing on load); `relative_position_index`
    is a non-persistent buffer.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from torch import Tensor

from groundlab.models.common.key_templates import Fused, Renames, StateDict, describe_mismatch

# Deterministic buffers, recomputed by the modules that own them: dropped, never reported.
RECOMPUTED_BUFFER = re.compile(r"(^|\.)(relative_position_index|attn_mask)$")

# --------------------------------------------------------------------------------------------------------
# Swin: original (IDEA / Microsoft Swin-Transformer) <-> transformers SwinBackbone
# --------------------------------------------------------------------------------------------------------
_BLOCK_HF = "swin.encoder.layers.{i}.blocks.{j}"
_BLOCK_IDEA = "layers.{i}.blocks.{j}"
# (HF SwinBackbone, original Swin)
_SWIN_RENAMES = Renames([
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
_SWIN_FUSED = Fused([(f"{_BLOCK_HF}.attention", ("q_proj", "k_proj", "v_proj"), f"{_BLOCK_IDEA}.attn.qkv.{{kind}}")])
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


def normalize_hf_swin(sd: Mapping[str, Tensor]) -> StateDict:
    """SwinBackbone state dict in transformers 4.x or 5.x names -> 5.x names. Non-Swin dicts pass unchanged."""
    if not any(_LOOKS_LIKE_SWIN.match(k) for k in sd):
        return dict(sd)
    out: StateDict = {}
    for key, value in sd.items():
        for regex, repl in _HF_SWIN_LEGACY:
            key = regex.sub(repl, key)
        out[key] = value
    return out


def idea_swin_to_hf_with_unused(sd: Mapping[str, Tensor]) -> tuple[StateDict, list[str]]:
    """idea_swin_to_hf that never raises: (SwinBackbone state dict, keys that fit nowhere)."""
    out: StateDict = {}
    unused: list[str] = []
    for key, value in sd.items():
        if RECOMPUTED_BUFFER.search(key):
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


def hf_swin_to_idea_with_unused(sd: Mapping[str, Tensor]) -> tuple[StateDict, list[str]]:
    """hf_swin_to_idea that never raises: (original Swin state dict, keys that fit nowhere)."""
    sd = {k: v for k, v in normalize_hf_swin(sd).items() if not RECOMPUTED_BUFFER.search(k)}
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
    return _strict(idea_swin_to_hf_with_unused(sd), "idea_swin_to_hf", strict)


def hf_swin_to_idea(sd: Mapping[str, Tensor], strict: bool = True) -> StateDict:
    """transformers SwinBackbone state dict (4.x or 5.x names) -> original Swin-Transformer names; the
    inverse of idea_swin_to_hf (q/k/v concatenated into `attn.qkv`, stage{s} -> norm{s-1})."""
    return _strict(hf_swin_to_idea_with_unused(sd), "hf_swin_to_idea", strict)


__all__ = [
    "RECOMPUTED_BUFFER",
    "hf_swin_to_idea",
    "hf_swin_to_idea_with_unused",
    "idea_swin_to_hf",
    "idea_swin_to_hf_with_unused",
    "normalize_hf_swin",
]
