"""The ONNX Runtime backend of the Grounding DINO predictor: runs an exported graph (TAO's or groundlab's; the contract
is predict/graph_contract.py) behind torch_backend.py's interface, so evaluate and inference run it unchanged.

- `encode_text(tokens)`: the prompt's tokens padded to the graph's max_text_len (the full graph takes tokens), or
  unpadded for a graph with a symbolic text length (export.dynamic_text_len: the text layers then run only the
  prompt's tokens); with a split export, the text graph's `text_features` with the masks that go with them,
  computed once per prompt.
- `stack_text(texts)`: one text per image, padded to the longest (padding masked out and attending only to itself).
- `encode_image(images, padding_mask)`: the images themselves; they must be exactly the graph's H x W, unpadded
  (the predictor's transforms resize to the graph's size: predict/backends.py).
- `detect(image, text)`: {"pred_logits" (B, Q, L), "pred_boxes" (B, Q, 4)[, "pred_masks" (B, Q, H/4, W/4) stride-4
  mask logits][, "no_targets" (B, 2), "union_mask_logits" (B, 2, H/8, W/8) with region queries]} as float32 torch
  tensors on the predictor's device. A graph of fixed batch N runs the images N
  at a time (the last group padded with copies, then dropped).

Providers: the CPU, or CUDA (with the CPU for what CUDA lacks) when the predictor's device is a GPU.
"""

from __future__ import annotations

import logging
import os
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from omegaconf import DictConfig

from groundlab.config import ConfigError
from groundlab.errors import MissingFile
from groundlab.predict.deploy_meta import METADATA_KEY, GraphInfo, text_graph_path
from groundlab.predict.graph_contract import (
    GRAPH_INPUTS, IMAGE_INPUT, INPUT_DTYPES, INPUT_SHAPES, MASK_OUTPUT, OUTPUTS, REGION_OUTPUTS, TEXT_FEATURES,
    TEXT_GRAPH_OUTPUTS, batch_groups, graph_tokens, pad_text,
)

log = logging.getLogger(__name__)


def providers_for(device: torch.device, onnx_file: str) -> List[object]:
    """onnxruntime execution providers for `device`; ConfigError naming the provider when it is missing."""
    import onnxruntime

    available = onnxruntime.get_available_providers()
    if device.type == "cpu":
        return ["CPUExecutionProvider"]
    if device.type == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise ConfigError(f"{onnx_file} is to run on {device}, but this onnxruntime has no CUDAExecutionProvider "
                              f"(it has {', '.join(available)}): install onnxruntime-gpu, or run on the CPU with "
                              f"num_gpus=0.")
        return [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]
    raise ConfigError(f"{onnx_file}: onnxruntime runs on the CPU or a CUDA GPU, not on {device}.")


def open_session(onnx_file: str, device: torch.device, threads: Optional[int] = None):
    """An onnxruntime session of `onnx_file` on `device`'s provider; threads: intra-op threads (None: onnxruntime's
    default, one per physical core)."""
    import onnxruntime

    if not os.path.isfile(onnx_file):
        raise MissingFile(f"ONNX file not found: {onnx_file}")
    providers = providers_for(device, onnx_file)
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only: the CUDA provider's warnings about CPU fallbacks are expected
    if threads:
        options.intra_op_num_threads = threads
    # no busy-waiting between ops: where other work shares the cores (data loading, PyTorch, other processes), the
    # spinning threads take the cores the op needs (GDINO-T at 544x960 on 2 shared cores: 0.67x the time); on
    # idle cores the cost is a thread wake-up per op
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        try:
            return onnxruntime.InferenceSession(onnx_file, options, providers=providers)
        except Exception as err:
            if "float8" not in str(err):
                raise
        # an FP8 Q/DQ graph (quantize.backend=modelopt.onnx with fp8_e4m3fn): the CPU's Q/DQ fusions take integer
        # types only and fail on it; without them the CPU runs it as fake quantization, FP8's rounding included
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC
        return onnxruntime.InferenceSession(onnx_file, options, providers=providers)
    except Exception as err:  # onnxruntime raises its own Fail / InvalidGraph / ... for files it cannot load
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"{onnx_file}: onnxruntime cannot load it ({reason}).") from err


def _static(dim) -> Optional[int]:
    return dim if isinstance(dim, int) and dim > 0 else None


# onnxruntime's type names of the contract's inputs -> numpy (a graph may declare int32 ids, e.g. for TensorRT)
NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
               "tensor(int32)": np.int32, "tensor(bool)": np.bool_}


def input_types(session, onnx_file: str) -> Dict[str, type]:
    """numpy dtype of each input, as the graph declares it (the contract's: predict/graph_contract.INPUT_DTYPES)."""
    types = {}
    for i in session.get_inputs():
        if i.type not in NUMPY_TYPES:
            raise ConfigError(f"{onnx_file}: input {i.name} is {i.type}; a Grounding DINO graph takes "
                              f"{INPUT_DTYPES.get(i.name, np.float32).__name__} there.")
        types[i.name] = NUMPY_TYPES[i.type]
    return types


def graph_info(session, onnx_file: str, model_cfg: Optional[DictConfig]) -> GraphInfo:
    """The GraphInfo stored at export; a foreign graph (no "groundlab" metadata) is described from its input shapes
    and the config's model keys. ConfigError (one sentence naming the file) when the inputs are not the contract's."""
    names = {i.name: i for i in session.get_inputs()}
    meta = session.get_modelmeta().custom_metadata_map
    facts = {}
    if METADATA_KEY not in meta:  # a foreign graph: what its tensors say, over the config's model keys
        ids = names.get("input_ids")
        image = names.get(IMAGE_INPUT)
        H, W = (_static(d) for d in image.shape[2:4]) if image is not None and len(image.shape) == 4 else (None, None)
        facts = {"max_text_len": _static(ids.shape[1]) if ids is not None and len(ids.shape) == 2 else None,
                 "has_masks": MASK_OUTPUT in {o.name for o in session.get_outputs()},
                 "input_size": (H, W) if H and W else None,
                 "batch_size": _static(image.shape[0]) if image is not None else None}
    info = GraphInfo.from_metadata(meta, model_cfg, **facts)
    if info is None:
        raise ConfigError(f"{onnx_file} carries no groundlab metadata and no model config was given to read it.")
    if facts:
        log.info("%s has no groundlab metadata: read as a %s graph with model.max_text_len=%d, model.num_select=%d, "
                 "model.text_encoder_type=%s", onnx_file, info.model, info.max_text_len, info.num_select,
                 info.text_encoder_type)
    expected = GRAPH_INPUTS.get(info.kind, GRAPH_INPUTS["full"])
    missing = [n for n in expected if n not in names]
    if missing:
        raise ConfigError(f"{onnx_file} lacks the inputs {', '.join(missing)}: a Grounding DINO graph takes "
                          f"{', '.join(expected)} (action=export or TAO's export writes them).")
    for n in expected:
        rank = INPUT_SHAPES[n].count(",") + 1
        if len(names[n].shape) != rank:
            raise ConfigError(f"{onnx_file}: input {n} has shape {names[n].shape}; a Grounding DINO graph takes "
                              f"{n} {INPUT_SHAPES[n]}.")
    extra = [n for n in names if n not in expected]
    if extra:
        raise ConfigError(f"{onnx_file} has inputs that a Grounding DINO graph does not take: {', '.join(extra)} "
                          f"(expected {', '.join(expected)}).")
    outputs = [o.name for o in session.get_outputs()]
    wanted = TEXT_GRAPH_OUTPUTS if info.kind == "text" else OUTPUTS
    if any(n not in outputs for n in wanted):
        raise ConfigError(f"{onnx_file} has the outputs {', '.join(outputs)}; a Grounding DINO {info.kind} graph "
                          f"gives {', '.join(wanted)}.")
    return info


class OnnxRuntimeBackend:
    """onnx_file: a full graph, or the image graph of a split export (its text graph is read from next to it);
    device: where results go and which provider runs; model_cfg: read only for a graph without groundlab metadata."""

    name = "onnxruntime"

    def __init__(self, onnx_file: str, device: torch.device, model_cfg: Optional[DictConfig] = None):
        self.onnx_file, self.device = onnx_file, torch.device(device)
        self.session = open_session(onnx_file, self.device)
        self.info = graph_info(self.session, onnx_file, model_cfg)
        self.text_session = None
        if self.info.kind == "text":
            raise ConfigError(f"{onnx_file} is the text graph of a split export; give its image graph "
                              f"({os.path.basename(onnx_file).replace('.text.onnx', '.image.onnx')}).")
        if self.info.kind == "image":
            text_file = text_graph_path(onnx_file, self.info)
            self.text_session = open_session(text_file, self.device)
            graph_info(self.text_session, text_file, None)
            self.text_types = input_types(self.text_session, text_file)
        self.types = input_types(self.session, onnx_file)
        self.input_names = list(self.types)
        # a symbolic token axis (export.dynamic_text_len): text is fed at the prompt's length, not max_text_len
        tokens_input = next(i for i in (self.text_session or self.session).get_inputs() if i.name == "input_ids")
        self.dynamic_text = _static(tokens_input.shape[1]) is None
        self.output_names = [n for n in (*OUTPUTS, MASK_OUTPUT, *REGION_OUTPUTS)
                             if n in {o.name for o in self.session.get_outputs()}]

    @property
    def max_text_len(self) -> int:
        return self.info.max_text_len

    @property
    def has_masks(self) -> bool:
        """detect() also returns "pred_masks", every query's stride-4 mask logits."""
        return self.info.has_masks

    @property
    def has_region_head(self) -> bool:
        """detect() also returns "no_targets" and "union_mask_logits" (referring segmentation)."""
        return all(n in self.output_names for n in REGION_OUTPUTS)

    @property
    def input_size(self) -> Optional[Tuple[int, int]]:
        """(H, W) every image must have (None: the graph takes any size)."""
        return self.info.input_size

    def encode_text(self, tokens: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        length = tokens["input_ids"].shape[1] if self.dynamic_text else self.max_text_len
        text = {k: v.cpu() for k, v in graph_tokens(tokens, length).items()}
        if self.text_session is None:
            return text
        feeds = {n: text[n].numpy().astype(t) for n, t in self.text_types.items()}
        (features,) = self.text_session.run(list(TEXT_GRAPH_OUTPUTS), feeds)
        return {TEXT_FEATURES: torch.from_numpy(features), "attention_mask": text["attention_mask"],
                "position_ids": text["position_ids"], "text_token_mask": text["text_token_mask"]}

    @staticmethod
    def stack_text(texts: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
        """Texts of batch 1 as one batch, padded to the longest (a fixed-length graph's are all max_text_len)."""
        length = max(t["attention_mask"].shape[1] for t in texts)
        padded = [pad_text(t, length) for t in texts]
        return {k: torch.cat([t[k] for t in padded]) for k in texts[0]}

    def encode_image(self, images: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        size = self.input_size
        if size is not None and tuple(images.shape[-2:]) != tuple(size):
            raise ValueError(f"{self.onnx_file} takes {size[0]}x{size[1]} images, got {tuple(images.shape[-2:])}: "
                             f"resize them to the graph's size (dataset.augmentation.fixed_input_size).")
        if bool(padding_mask.any()):
            raise ValueError(f"{self.onnx_file} has no padding input, but the batch holds padded images: resize "
                             f"every image to the graph's size (dataset.augmentation.fixed_input_size).")
        return images.float().cpu()

    def detect(self, image: torch.Tensor, text: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        B = image.shape[0]
        text = {k: v.expand(B, *v.shape[1:]) if v.shape[0] != B else v for k, v in text.items()}
        feeds = {IMAGE_INPUT: image, **text}
        smallest, largest = self.info.batch_bounds(B)  # a fixed-batch graph runs the batch in groups of its batch
        parts: List[List[np.ndarray]] = []
        for group, real in batch_groups({n: feeds[n] for n in self.input_names}, smallest, largest):
            arrays = {n: np.ascontiguousarray(v.numpy().astype(self.types[n], copy=False)) for n, v in group.items()}
            outs = self.session.run(self.output_names, arrays)
            parts.append([o[:real] for o in outs])
        return {n: torch.from_numpy(np.concatenate([p[i] for p in parts])).to(self.device)
                for i, n in enumerate(self.output_names)}
