"""`model.pretrained_backbone_path`: backbone-only weights into `ImageBackbone.body` (transformers' state-dict keys).

Accepted: a transformers model directory or weights file (SwinModel/SwinBackbone/ResNet names, with or
without their `swin.`/`resnet.` prefix), an original Swin classification checkpoint (Microsoft / IDEA
names, `{"model": {...}}`), or a whole Grounding DINO checkpoint (its backbone part is taken). Missing
output norms of a classification checkpoint are initialised fresh, as IDEA does; every other mismatch is
reported by name.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Dict, List, Tuple

import torch
from torch import nn

from groundlab.errors import UserError
from groundlab.io.remote_files import local_path
from groundlab.models.common.key_templates import describe_mismatch, unwrap_checkpoint
from groundlab.models.common.swin_keys import idea_swin_to_hf, normalize_hf_swin

log = logging.getLogger(__name__)

# prefixes under which a backbone can sit in the checkpoints users have
_CONTAINER_PREFIXES = ("module.", "backbone.body.", "backbone.0.", "model.backbone.conv_encoder.model.")
_ORIGINAL_SWIN = re.compile(r"^(patch_embed\.|layers\.\d+\.blocks\.)")
# Classification-only parts of backbone checkpoints, never used by a detector's backbone.
_CLASSIFIER = re.compile(r"^(head\.|norm\.|classifier\.|swin\.pooler\.|pooler\.|layernorm\.|swin\.layernorm\.)")


class BackboneWeightError(UserError, ValueError):
    """Backbone weights that do not fit; the message names the keys."""


def read_backbone_state(path: str) -> Dict[str, torch.Tensor]:
    if os.path.isdir(path):
        for name in ("model.safetensors", "pytorch_model.bin"):
            if os.path.isfile(os.path.join(path, name)):
                path = os.path.join(path, name)
                break
        else:
            raise BackboneWeightError(f"model.pretrained_backbone_path={path!r}: no model.safetensors or pytorch_model.bin")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return unwrap_checkpoint(torch.load(path, map_location="cpu", weights_only=True))


def to_backbone_keys(sd: Dict[str, torch.Tensor], own: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """(state in `own`'s key names, source keys that fit nowhere)."""
    for prefix in _CONTAINER_PREFIXES:  # the backbone part of a larger checkpoint
        inner = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        if inner and (prefix != "module." or len(inner) == len(sd)):
            sd = inner
    unused = [k for k in sd if _CLASSIFIER.match(k)]
    sd = {k: v for k, v in sd.items() if not _CLASSIFIER.match(k)}
    if any(_ORIGINAL_SWIN.match(k) for k in sd):
        sd = idea_swin_to_hf(sd, strict=False)
    else:  # transformers 4.x names (what save_pretrained writes) -> the installed 5.x names
        sd = normalize_hf_swin(sd)
    own_prefix = next((p for p in ("swin.", "resnet.") if any(k.startswith(p) for k in own)), "")
    out: Dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        for candidate in (k, own_prefix + k, k.split(".", 1)[-1], own_prefix + k.split(".", 1)[-1]):
            if candidate in own:
                out[candidate] = v
                break
        else:
            unused.append(k)
    return out, unused


def load_backbone_weights(body: nn.Module, path: str) -> List[str]:
    """Load into `body`; returns the keys initialised fresh (output norms). Raises BackboneWeightError."""
    own = body.state_dict()
    path = local_path(path, key="model.pretrained_backbone_path")  # an s3:// / https:// file: fetched once
    state, unused = to_backbone_keys(read_backbone_state(os.path.expanduser(path)), own)
    fresh_ok = re.compile(r"^(hidden_states_norms\.|swin\.layernorm\.)")
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    hard_missing = [k for k in missing if not fresh_ok.match(k)]
    shape = [f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in state if state[k].shape != own[k].shape]
    ignorable = [k for k in unused if _CLASSIFIER.match(k) or k.endswith(("relative_position_index", "attn_mask"))]
    hard_unused = [k for k in unused if k not in ignorable]
    if hard_missing or hard_unused or shape:
        raise BackboneWeightError(
            f"model.pretrained_backbone_path={path!r} does not fit model.backbone:\n"
            + "\n".join(x for x in [describe_mismatch(hard_missing, hard_unused)] + shape[:10] if x))
    body.load_state_dict(state, strict=False)
    fresh = [k for k in missing if fresh_ok.match(k)]
    log.info("backbone weights from %s (%d tensors; %d output-norm tensors initialised fresh)", path, len(state), len(fresh))
    return fresh
