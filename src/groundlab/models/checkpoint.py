"""groundlab checkpoints: weights plus the structural model config (and label map), written atomically,
read with `weights_only=True`, so evaluate/inference/export rebuild the model without repeating settings.

Layout: {"format": "groundlab", "version": 1, "model_name": "gdino", "model_config": {...},
"state_dict": {...}, "class_names": [...] or None, "meta": {...}, **extra} (meta: epoch, step, ... for
training; extra: e.g. "text_config", the BERT config, so no hub access is needed to rebuild).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from groundlab.io.remote_files import local_path, redact
from groundlab.ops.atomic_write import atomic_write

FORMAT = "groundlab"
VERSION = 1


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig) else value


def save_checkpoint(path: str, model: torch.nn.Module, model_config: Any, class_names: Optional[List[str]] = None,
                    meta: Optional[Dict[str, Any]] = None, state_dict: Optional[Dict[str, torch.Tensor]] = None,
                    extra: Optional[Dict[str, Any]] = None) -> str:
    """Write atomically (temp file in the same dir + os.replace): a crash never leaves a half file."""
    cfg = _plain(model_config)
    payload = {
        "format": FORMAT, "version": VERSION, "model_name": cfg.get("name"), "model_config": cfg,
        "state_dict": state_dict if state_dict is not None else model.state_dict(),
        "class_names": list(class_names) if class_names is not None else None, "meta": dict(meta or {}),
        **(extra or {}),
    }
    return atomic_write(path, lambda tmp: torch.save(payload, tmp))


def is_groundlab_checkpoint(obj: Any) -> bool:
    return isinstance(obj, dict) and obj.get("format") == FORMAT


def load_checkpoint(path: str, key: str = "checkpoint") -> Dict[str, Any]:
    """The checkpoint dict (see module doc) of a file or an s3:// / gs:// / https:// URI (fetched once into the
    cache; `key` names the config key in messages). Raises ValueError naming the file if it is not one of ours."""
    obj = torch.load(local_path(path, key=key), map_location="cpu", weights_only=True)
    path = redact(path)
    if not is_groundlab_checkpoint(obj):
        raise ValueError(f"{path}: not a groundlab checkpoint (no 'format': 'groundlab' entry)")
    if obj.get("version", 0) > VERSION:
        raise ValueError(f"{path}: checkpoint version {obj['version']} is newer than this groundlab ({VERSION})")
    return obj
