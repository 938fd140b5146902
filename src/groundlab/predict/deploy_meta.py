"""What a deployed Grounding DINO graph records about itself, in one definition (GraphInfo) for every deployed
form: the ONNX graphs of action=export and action=quantize, and the TensorRT engines of action=gen_trt_engine.
The tensors' names and shapes are graph_contract.py's; these are the facts the tensors do not say (the text
encoder to tokenize with, num_select, the label map) and those a runner must know before it feeds them (the
fixed input size, the batch it takes, the text length L).

Where it is stored:
- an ONNX file: GraphInfo as JSON in its metadata_props under the key "groundlab" (action=export writes it,
  action=quantize copies it with the quantized `precision`). A graph exported elsewhere (TAO's) has none: it is
  described by the command's model config and what its inputs say (`from_metadata`).
- a TensorRT engine, which holds no metadata: the same JSON next to it as `<engine>.json` (`sidecar_path`),
  the ONNX file's GraphInfo with the engine's facts (precision, profile batch range, `build`). Sidecars written
  before this layout ({"max_text_len", "num_select", "text_encoder_type", "class_names", "has_masks",
  "engine": {"data_type", "input_size", "text_len", "batch": [min, opt, max], "onnx_file", "tensorrt"}}) still
  read (`read`).

    {"model": "gdino", "max_text_len": 256, "num_select": 300, "text_encoder_type": "bert-base-uncased",
     "has_masks": false, "class_names": null, "input_size": [544, 960], "batch_size": null,
     "batch_range": [1, 1, 4], "kind": "full", "text_graph": null, "precision": "FP16",
     "build": {"onnx_file": "...", "tensorrt": "11.4.0.106"}, "model_config": {...}}
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Dict, List, Mapping, Optional, Tuple

from groundlab.errors import DataError, MissingFile
from groundlab.ops.atomic_write import atomic_write_text

METADATA_KEY = "groundlab"  # the ONNX metadata_props key holding GraphInfo's JSON
REQUIRED = ("max_text_len", "num_select", "text_encoder_type", "has_masks")


@dataclass
class GraphInfo:
    """What a predictor needs to know about a deployed graph besides its tensors.

    kind: "full" | "text" | "image" (the split export's graphs); input_size: (H, W) every image must have (None:
    any size); batch_size: the graph's fixed batch (None: dynamic); batch_range: an engine's optimization profile
    (min, opt, max) batch (None for an ONNX graph); text_graph: an image graph's text graph, a file name next to
    it; precision: what the graph computes in, FP32 | FP16 (an engine) | INT8 | FP8 | UINT8 (Q/DQ graphs; UINT8 is
    ONNX Runtime's asymmetric format); build: how it was made (an engine: its ONNX file and TensorRT version; a
    quantized graph: the quantize backend and the float graph)."""

    model: str  # gdino | mask_gdino
    max_text_len: int  # L: the text length the graph takes (prompts are chunked to fit)
    num_select: int
    text_encoder_type: str
    has_masks: bool
    class_names: Optional[List[str]] = None
    input_size: Optional[Tuple[int, int]] = None
    batch_size: Optional[int] = None
    batch_range: Optional[Tuple[int, int, int]] = None
    kind: str = "full"
    text_graph: Optional[str] = None
    precision: str = "FP32"
    build: Dict[str, Any] = field(default_factory=dict)
    model_config: Dict[str, Any] = field(default_factory=dict)  # the structural model config, plain values

    # ------------------------------------------------------------------------------------------ reading
    def to_json(self, indent: Optional[int] = None) -> str:
        return json.dumps(asdict(self), indent=indent)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "GraphInfo":
        # keys this version does not know (written by a newer groundlab) are left out, not an error
        fields = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        for key in ("input_size", "batch_range"):
            if fields.get(key) is not None:
                fields[key] = tuple(int(v) for v in fields[key])
        return cls(**fields)

    @classmethod
    def from_json(cls, text: str) -> "GraphInfo":
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_model_config(cls, model_cfg, has_masks: bool) -> "GraphInfo":
        """A graph without groundlab metadata, described by the command's model config."""
        plain = model_cfg if isinstance(model_cfg, dict) else _plain(model_cfg)
        return cls(model=str(plain.get("name") or ("mask_gdino" if has_masks else "gdino")),
                   max_text_len=int(plain["max_text_len"]), num_select=int(plain["num_select"]),
                   text_encoder_type=str(plain["text_encoder_type"]), has_masks=bool(has_masks), model_config=plain)

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str], model_cfg=None, **facts: Any) -> Optional["GraphInfo"]:
        """An ONNX file's GraphInfo: the JSON under "groundlab" in `metadata` (its metadata_props as a dict);
        the keys it lacks (all of them for a graph exported elsewhere) from `model_cfg`; then `facts`, what the
        graph's tensors say (e.g. input_size, max_text_len, batch_size, has_masks), over both. None when there
        is neither metadata nor a model config."""
        stored = json.loads(metadata[METADATA_KEY]) if METADATA_KEY in metadata else None
        if stored is not None and all(k in stored for k in ("model", *REQUIRED)):
            info = cls.from_dict(stored)
        elif model_cfg is None:
            return None
        else:
            base = asdict(cls.from_model_config(model_cfg, bool(facts.get("has_masks", False))))
            base.update({k: v for k, v in (stored or {}).items() if v is not None})
            info = cls.from_dict(base)
        return replace(info, **{k: v for k, v in facts.items() if v is not None})

    def batch_bounds(self, batch: int) -> Tuple[int, int]:
        """(smallest, largest) group a batch of `batch` images runs in (graph_contract.batch_groups): a fixed
        batch's (b, b), an engine profile's (min, max), else the whole batch at once."""
        if self.batch_size:
            return self.batch_size, self.batch_size
        if self.batch_range:
            return self.batch_range[0], self.batch_range[2]
        return 1, max(batch, 1)

    # ------------------------------------------------------------------------------------------ the engine sidecar
    def write(self, path: str) -> str:
        """Write as JSON to `path` (an engine's sidecar); returns path."""
        return atomic_write_text(path, self.to_json(indent=1))

    @classmethod
    def read(cls, path: str, what: str) -> "GraphInfo":
        """The sidecar JSON at `path` (this layout or the earlier DeployMeta one); `what` names its engine in
        errors (e.g. "the engine model.engine")."""
        if not os.path.isfile(path):
            raise MissingFile(f"{path} is missing: {what} needs it (written by action=gen_trt_engine next to the "
                              f"engine, with the text encoder, num_select and max_text_len); rebuild the engine.")
        with open(path) as f:
            data = json.load(f)
        missing = [k for k in REQUIRED if k not in data]
        if missing:
            raise DataError(f"lacks {', '.join(missing)}, which {what} needs; rebuild the engine with "
                            f"action=gen_trt_engine.", path)
        return cls.from_dict(_from_deploy_meta(data) if "engine" in data else data)


def _plain(model_cfg) -> Dict[str, Any]:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(model_cfg, resolve=True)


def _from_deploy_meta(data: Mapping[str, Any]) -> Dict[str, Any]:
    """An earlier sidecar (flat model facts + "engine": how it was built) in GraphInfo's keys."""
    engine = dict(data.get("engine") or {})
    out = {k: v for k, v in data.items() if k != "engine"}
    out.setdefault("model", "mask_gdino" if data.get("has_masks") else "gdino")
    if engine.get("text_len"):
        out["max_text_len"] = engine["text_len"]
    if engine.get("input_size"):
        out["input_size"] = engine["input_size"]
    if engine.get("batch"):
        out["batch_range"] = engine["batch"]
    if engine.get("data_type"):
        out["precision"] = engine["data_type"]
    out["build"] = {k: v for k, v in engine.items() if k in ("onnx_file", "tensorrt")}
    return out


def onnx_info(model) -> Optional[GraphInfo]:
    """The GraphInfo an onnx.ModelProto carries (None without groundlab metadata)."""
    return GraphInfo.from_metadata({p.key: p.value for p in model.metadata_props})


def set_onnx_info(model, info: GraphInfo) -> None:
    """Store `info` as the onnx.ModelProto's only metadata (in place)."""
    del model.metadata_props[:]
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, info.to_json()


def text_graph_path(image_graph: str, info: GraphInfo) -> str:
    """The text graph that goes with an image graph (stored by name, looked up next to it)."""
    return os.path.join(os.path.dirname(os.path.abspath(image_graph)), info.text_graph or "")


def sidecar_path(engine_path: str) -> str:
    """`model.engine` -> `model.engine.json`."""
    return engine_path + ".json"
