"""Loading real weights into groundlab's Grounding DINO, through one function, whatever their layout:

- groundlab checkpoints (`.pth` written by save_checkpoint: weights + structural config + label map);
- Hugging Face transformers (`IDEA-Research/grounding-dino-tiny/base` layout): a directory with
  config.json and model.safetensors / pytorch_model.bin, or one such weights file;
- official IDEA-Research checkpoints (`groundingdino_swint_ogc.pth` layout: {"model": {...}});
- NVIDIA TAO grounding_dino / mask_grounding_dino Lightning checkpoints ({"state_dict": {"model.model.*"}});
- mmdetection GroundingDINO checkpoints, i.e. MM-Grounding-DINO ({"meta": {...}, "state_dict": {...}}; the
  keys are mapped by groundlab.models.gdino.mmdet_keys, without mmengine).

Every file is read with torch.load(weights_only=True). An mmengine training checkpoint also pickles its
bookkeeping (`message_hub` holds mmengine HistoryBuffer objects with numpy arrays): those classes, and only
names under mmengine / numpy, are read as inert stand-in records (_Record) that run none of their code; any
other refused global fails the read with one sentence naming it.

Keys that do not fit are reported by name (grouped by prefix) and fail the load; only weights that never
affect outputs (BERT's pooler, the Swin top layernorm that SwinBackbone does not use) may be absent/extra.
Whole optional heads are the one other exception (W.OPTIONAL_HEADS), so that one checkpoint serves several
models: a Grounding DINO checkpoint loaded into a Mask Grounding DINO leaves the mask head (`controller.*`,
`mask_head.*`) as initialized (LoadReport.new), and a Mask Grounding DINO checkpoint loaded into a Grounding DINO
drops it (LoadReport.ignored). The same holds for the referring region head (`region_head.*`): an instance
segmentation checkpoint starts a referring (VG) training, and a VG checkpoint serves an OD model.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from groundlab.errors import UserError
from groundlab.io.remote_files import local_path
from groundlab.models.checkpoint import is_groundlab_checkpoint
from groundlab.models.gdino import mmdet_keys as M
from groundlab.models.gdino import weight_keys as W

HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class WeightLoadError(UserError, ValueError):
    """Weights that do not fit the model; the message lists the keys by prefix."""


@dataclass
class LoadReport:
    """What a load did beyond the strict match. ignored: optional keys absent or extra (never used by outputs),
    and mask-head keys of the checkpoint that a model without a mask head has no place for. new: the model's
    mask-head keys that the checkpoint lacked entirely, left as initialized."""

    source: str  # "groundlab" | "hf" | "idea" | "tao" | "mmdet" | "state_dict"
    path: str
    ignored: List[str] = field(default_factory=list)
    new: List[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"loaded {self.source} weights from {self.path}"]
        for head in W.OPTIONAL_HEADS:
            new = [k for k in self.new if W.optional_head(k) == head]
            if new:
                parts.append(f"{len(new)} {head} weights newly initialized ({_modules(new)})")
            dropped = [k for k in self.ignored if W.optional_head(k) == head]
            if dropped:
                parts.append(f"{len(dropped)} {head} weights ignored ({_modules(dropped)}: the model has no "
                             f"{head.replace('-', ' ')})")
        optional = [k for k in self.ignored if W.optional_head(k) is None]
        if optional:
            parts.append(f"{len(optional)} unused optional keys ({W.describe_mismatch([], [], optional)})")
        return ", ".join(parts)


def _modules(keys: List[str]) -> str:
    """'controller, mask_head': the top-level modules of `keys`, sorted."""
    return ", ".join(sorted({k.split(".", 1)[0] for k in keys}))


class _Record:
    """Stands in for a class of mmengine / numpy that a checkpoint's bookkeeping pickled (mmengine's message_hub
    HistoryBuffer and its numpy arrays): keeps the arguments and state it is given and runs nothing else."""

    def __init__(self, *args: Any, **kwargs: Any):
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state


_STAND_IN_MODULES = ("mmengine.", "numpy.")
_REFUSED_GLOBAL = re.compile(r"GLOBAL ([\w.]+) was not an allowed global")


def read_checkpoint_file(path: str) -> Any:
    """The object of a checkpoint file, read weights-only (safetensors, or torch.load(weights_only=True) with
    mmengine / numpy globals read as _Record stand-ins; see the module doc). WeightLoadError names any other
    global the file needs."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    stand_ins: List[str] = []
    while True:
        try:
            with torch.serialization.safe_globals([(_Record, name) for name in stand_ins]):
                return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            m = _REFUSED_GLOBAL.search(str(err))
            name = m.group(1) if m else None
            if name is None or name in stand_ins or not name.startswith(_STAND_IN_MODULES):
                what = f"the Python object {name}" if name else "objects"
                raise WeightLoadError(f"{path}: holds {what}, which a weights-only load refuses to build (only "
                                      f"tensors, containers and mmengine's bookkeeping are read)") from None
            stand_ins.append(name)


def hf_weights_file(path: str) -> Optional[str]:
    """The weights file of an HF model directory (or the file itself), else None."""
    if os.path.isdir(path):
        for name in HF_WEIGHT_FILES:
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        return None
    return path if path.endswith(".safetensors") or os.path.basename(path) == "pytorch_model.bin" else None


def detect_layout(obj: Any) -> str:
    """"groundlab", "tao", "hf", "mmdet" or "idea" for a loaded checkpoint object."""
    if is_groundlab_checkpoint(obj):
        return "groundlab"
    if W.is_tao_checkpoint(obj):
        return "tao"
    try:
        sd = W.unwrap_checkpoint(obj)
    except ValueError as err:
        raise WeightLoadError(f"not a Grounding DINO checkpoint: {err}") from None
    if any(k.startswith(("model.text_backbone.", "model.backbone.conv_encoder.")) for k in sd):
        return "hf"
    if M.is_mmdet_state(sd):
        return "mmdet"
    if any(k.startswith(("backbone.0.", "transformer.")) for k in sd):
        return "idea"
    raise WeightLoadError("unrecognised checkpoint layout: neither groundlab, Hugging Face, IDEA-Research, TAO nor "
                          "mmdetection (MM-Grounding-DINO) keys")


def checkpoint_state(obj: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """The model weights of a groundlab checkpoint; training checkpoints (Lightning) prefix them."""
    prefix = obj.get("state_dict_prefix", "")
    return {k[len(prefix):]: v for k, v in obj["state_dict"].items() if k.startswith(prefix)}


def read_weights(path: str) -> Tuple[Dict[str, torch.Tensor], str, List[str]]:
    """(state dict in our key names, layout, keys that fit no part of the model) of a checkpoint path."""
    return _read_weights(path)[:3]


def _read_weights(path: str) -> Tuple[Dict[str, torch.Tensor], str, List[str], Any]:
    """read_weights plus the file's object."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    hf_file = hf_weights_file(path)
    obj = read_checkpoint_file(hf_file or path)
    layout = "hf" if hf_file else detect_layout(obj)
    if layout == "groundlab":
        return checkpoint_state(obj), layout, [], obj
    if layout == "hf":
        sd, unused = W.hf_to_ours(W.unwrap_checkpoint(obj))
    elif layout == "tao":
        try:
            sd, unused = W.tao_to_ours(obj)
        except ValueError as err:  # "tao_model" names another TAO model
            raise WeightLoadError(f"{path}: {err}") from None
    elif layout == "mmdet":
        sd, unused = M.mmdet_to_ours(obj)
    else:
        sd, unused = W.idea_to_ours(obj)
    return sd, layout, unused, obj


def settings_mismatch(model_cfg: Any, settings: Dict[str, Any]) -> List[str]:
    """The `model.<field>=<value>` overrides that `model_cfg` lacks to match the structural settings a file
    determines (mmdet_keys.mmdet_model_settings); a learnable log_scale matches any number."""
    wrong = []
    for field_name, want in settings.items():
        have = model_cfg.get(field_name) if model_cfg is not None else None
        if isinstance(want, float) and isinstance(have, (int, float)) and not isinstance(have, bool):
            continue
        if have != want:
            shown = "null" if want is None else str(want).lower() if isinstance(want, bool) else want
            wrong.append(f"model.{field_name}={shown}")
    return wrong


def apply_settings(model_cfg: Any, settings: Dict[str, Any]) -> List[str]:
    """Set the structural settings a file determines on `model_cfg` (a copy the caller owns); returns the
    overrides that changed something (for the log)."""
    changed = settings_mismatch(model_cfg, settings)
    for item in changed:
        field_name = item.split("=", 1)[0][len("model."):]
        model_cfg[field_name] = settings[field_name]
    return changed


# Parameters our model may share between decoder layers, and the setting that shares them
_SHARED_SETTING = (("bbox_embed.", "model.dec_pred_bbox_embed_share"),
                   ("transformer.decoder.bbox_embed.", "model.dec_pred_bbox_embed_share"),
                   ("class_embed.", "model.dec_pred_class_embed_share"))


def _shared_conflicts(model: nn.Module, state: Dict[str, torch.Tensor]) -> List[str]:
    """One sentence per tensor the model shares under several names (a shared box / class head) whose
    checkpoint values differ: loading would keep only the last of them, silently."""
    names: Dict[int, List[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        names.setdefault(id(tensor), []).append(name)
    found: Dict[str, str] = {}
    for group in names.values():
        present = [n for n in group if n in state]
        if len(present) > 1 and any(not torch.equal(state[present[0]], state[n]) for n in present[1:]):
            setting = next((s for prefix, s in _SHARED_SETTING if present[0].startswith(prefix)), None)
            sentence = (f"the checkpoint holds different {present[0]} and {present[-1]} but the model shares them: "
                        + (f"set {setting}=false" if setting else "build it without sharing"))
            found.setdefault(setting or present[0], sentence)
    return list(found.values())


def load_state(model: nn.Module, state: Dict[str, torch.Tensor], path: str, source: str,
               unplaced: List[str] = ()) -> LoadReport:
    """Strict load; mismatches other than optional keys and a whole optional head raise WeightLoadError naming
    them. `unplaced`: checkpoint keys the layout conversion could not name (reported as unexpected).

    Optional heads (W.OPTIONAL_HEADS: the mask head, the region head): a checkpoint with none of a head, loaded
    into a model with one, leaves the model's initialized head in place (LoadReport.new); its keys of a head,
    loaded into a model with none, are dropped (LoadReport.ignored). A checkpoint with part of the model's head
    stays an error: that is a different head, not a missing one."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own] + list(unplaced)
    shape = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
             for k in own if k in state and state[k].shape != own[k].shape]
    new: List[str] = []
    lenient = set()
    for head in W.OPTIONAL_HEADS:
        model_head = any(W.optional_head(k) == head for k in own)
        state_head = any(W.optional_head(k) == head for k in state)
        if model_head and not state_head:
            new += [k for k in missing if W.optional_head(k) == head]
        if state_head and not model_head:
            # `unplaced` keys stay hard: the conversion could not name them, head or not
            lenient |= {k for k in state if k not in own and W.optional_head(k) == head}
    lenient |= set(new)
    hard_missing = [k for k in missing if not W.is_optional_key(k) and k not in lenient]
    hard_unexpected = [k for k in unexpected if not W.is_optional_key(k) and k not in lenient]
    conflicts = _shared_conflicts(model, state) if not shape else []
    if hard_missing or hard_unexpected or shape or conflicts:
        lines = [W.describe_mismatch(hard_missing, hard_unexpected)] + shape[:20] + conflicts
        raise WeightLoadError(f"{path}: {source} weights do not fit the model (check the model config):\n"
                              + "\n".join(line for line in lines if line))
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    ignored = (set(missing) | set(unexpected)) - set(new)
    return LoadReport(source, path, sorted(ignored), sorted(new))


def load_weights(model: nn.Module, path: str) -> LoadReport:
    """Load a groundlab, HF, IDEA, TAO or mmdetection checkpoint into `model` (see module doc); `path` may be an
    s3:// / gs:// / https:// URI of a file (fetched once into the cache). An mmdetection file whose structural
    settings (mmdet_keys.mmdet_model_settings) differ from `model.cfg` fails with the overrides to set: a
    contrastive head scaled otherwise would load without a missing key and score wrongly."""
    path = local_path(path, key="checkpoint")
    state, layout, unplaced, obj = _read_weights(path)
    if layout == "mmdet" and getattr(model, "cfg", None) is not None:
        wrong = settings_mismatch(model.cfg, M.mmdet_model_settings(obj))
        if wrong:
            raise WeightLoadError(f"{path}: this mmdetection (MM-Grounding-DINO) checkpoint needs "
                                  f"{' '.join(wrong)} (the model was built otherwise)")
    return load_state(model, state, path, layout, unplaced)


def model_config_from_hf(path: str) -> Dict[str, Any]:
    """Our `model` fields from an HF Grounding DINO directory's config.json, so a user names only the path."""
    with open(os.path.join(path, "config.json")) as f:
        hf = json.load(f)
    bb = hf.get("backbone_config") or {}
    if bb.get("model_type", "swin") != "swin":
        raise WeightLoadError(f"{path}: backbone {bb.get('model_type')!r} is not supported (Swin only)")
    out_indices = bb.get("out_indices") or [2, 3, 4]
    swin = {k: bb[k] for k in ("embed_dim", "depths", "num_heads", "window_size", "image_size") if k in bb}
    return {
        "name": "gdino", "backbone": "swin_tiny_224_1k", "backbone_overrides": swin,
        "return_interm_indices": [i - 1 for i in out_indices],
        "text_encoder_type": path, "text_encoder_pretrained": False,
        "hidden_dim": hf.get("d_model", 256), "enc_layers": hf.get("encoder_layers", 6),
        "dec_layers": hf.get("decoder_layers", 6), "dim_feedforward": hf.get("encoder_ffn_dim", 2048),
        "nheads": hf.get("encoder_attention_heads", 8), "num_queries": hf.get("num_queries", 900),
        "num_select": min(300, hf.get("num_queries", 900)), "max_text_len": hf.get("max_text_len", 256),
        "num_feature_levels": hf.get("num_feature_levels", 4), "enc_n_points": hf.get("encoder_n_points", 4),
        "dec_n_points": hf.get("decoder_n_points", 4),
        "pe_temperatureH": hf.get("positional_embedding_temperature", 20),
        "pe_temperatureW": hf.get("positional_embedding_temperature", 20),
        "dropout": 0.0, "fusion_dropout": hf.get("fusion_dropout", 0.0), "fusion_droppath": hf.get("fusion_droppath", 0.1),
    }


def hf_text_config(path: str):
    """The BERT config stored inside an HF Grounding DINO directory."""
    from transformers import BertConfig

    with open(os.path.join(path, "config.json")) as f:
        text = json.load(f).get("text_config") or {}
    return BertConfig(**{k: v for k, v in text.items() if k not in ("model_type", "transformers_version")})
