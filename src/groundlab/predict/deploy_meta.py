"""What a predictor needs to know about an exported network that the network's tensors do not say: the text
encoder (to tokenize prompts), `num_select`, `max_text_len`, the label map, whether it has a mask head.

An ONNX file carries them as JSON in its metadata_props under the key "groundlab" (written by action=export);
an ONNX file without that key (exported elsewhere) takes them from the model config of the command. A TensorRT
engine cannot hold metadata, so action=gen_trt_engine writes them next to it as `<engine>.json`, with how the
engine was built:

    {"max_text_len": 256, "num_select": 300, "text_encoder_type": "bert-base-uncased", "class_names": null,
     "has_masks": false, "engine": {"data_type": "FP16", "input_size": [544, 960], "text_len": 256,
     "batch": [1, 1, 4], "onnx_file": "...", "tensorrt": "11.4.0.106"}}
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

from groundlab.errors import DataError, MissingFile
from groundlab.ops.atomic_write import atomic_write_text
from groundlab.predict.graph_contract import METADATA_KEY

ONNX_METADATA_KEY = METADATA_KEY  # the key action=export writes its GraphInfo JSON under


@dataclass
class DeployMeta:
    max_text_len: int
    num_select: int
    text_encoder_type: str
    has_masks: bool
    class_names: Optional[List[str]] = None
    engine: Dict[str, Any] = field(default_factory=dict)  # how a TensorRT engine was built (sidecar only)

    @classmethod
    def from_model_config(cls, model_cfg, has_masks: bool) -> "DeployMeta":
        """From the command's model config (an ONNX file without our metadata)."""
        return cls(int(model_cfg.max_text_len), int(model_cfg.num_select), str(model_cfg.text_encoder_type),
                   bool(has_masks))

    @classmethod
    def from_onnx(cls, model, model_cfg, has_masks: bool) -> "DeployMeta":
        """An onnx.ModelProto's "groundlab" metadata JSON, keys it lacks from `model_cfg`; has_masks is what the
        graph's outputs say (a `pred_masks` output), whatever the metadata claims."""
        meta = cls.from_model_config(model_cfg, has_masks)
        props = {p.key: p.value for p in model.metadata_props}
        if ONNX_METADATA_KEY in props:
            stored = json.loads(props[ONNX_METADATA_KEY])
            for key in ("max_text_len", "num_select", "text_encoder_type", "class_names"):
                if stored.get(key) is not None:
                    setattr(meta, key, stored[key])
        return meta

    def write(self, path: str) -> str:
        """Write as JSON to `path` (the engine's sidecar); returns path."""
        return atomic_write_text(path, json.dumps(asdict(self), indent=1))

    @classmethod
    def read(cls, path: str, what: str) -> "DeployMeta":
        """The JSON at `path`; `what` names it in errors (e.g. "the engine model.engine")."""
        if not os.path.isfile(path):
            raise MissingFile(f"{path} is missing: {what} needs it (written by action=gen_trt_engine next to the "
                              f"engine, with the text encoder, num_select and max_text_len); rebuild the engine.")
        with open(path) as f:
            data = json.load(f)
        missing = [k for k in ("max_text_len", "num_select", "text_encoder_type", "has_masks") if k not in data]
        if missing:
            raise DataError(f"lacks {', '.join(missing)}, which {what} needs; rebuild the engine with "
                            f"action=gen_trt_engine.", path)
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


def sidecar_path(engine_path: str) -> str:
    """`model.engine` -> `model.engine.json`."""
    return engine_path + ".json"
