"""Which backend runs the network for evaluate and inference, in one place: the file the settings give
(`<action>.checkpoint` -> PyTorch, `<action>.onnx_file` -> ONNX Runtime, `<action>.trt_engine` -> TensorRT), or
`<action>.backend` when several are given. Everything else (prompts, post-processing, masks, writers, COCO
evaluation) is the predictor's, so an exported model evaluates exactly like its checkpoint.

A graph backend (BACKENDS) is built from (file, device, model config) and exposes torch_backend.py's contract plus
`info` (deploy_meta.GraphInfo): num_select, the text encoder, the class names and the fixed input size of the
graph. The TensorRT backend plugs in as `groundlab.predict.trt_backend.TensorRTBackend(engine_path, device)`.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Tuple

import torch
from omegaconf import DictConfig, OmegaConf

from groundlab.config import ConfigError
from groundlab.data.transforms import Compose, build_eval_transforms
from groundlab.io.remote_files import local_path
from groundlab.predict.gdino import GDinoPredictor
from groundlab.text.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

# backend -> the settings key naming its file
FILE_KEYS = {"torch": "checkpoint", "onnxruntime": "onnx_file", "tensorrt": "trt_engine"}


def _onnxruntime(path: str, device: torch.device, model_cfg: DictConfig) -> Any:
    from groundlab.predict.onnx_backend import OnnxRuntimeBackend

    return OnnxRuntimeBackend(path, device, model_cfg)


def _tensorrt(path: str, device: torch.device, model_cfg: DictConfig) -> Any:
    from groundlab.predict.trt_backend import TensorRTBackend

    return TensorRTBackend(path, device)


# backend name -> factory(file, device, model config) of the network runner; "torch" is the predictor's own
BACKENDS: Dict[str, Callable[[str, torch.device, DictConfig], Any]] = {
    "onnxruntime": _onnxruntime,
    "tensorrt": _tensorrt,
}


def choose_backend(settings: DictConfig, prefix: str) -> Tuple[str, str]:
    """(backend, file) from `settings` (cfg.evaluate or cfg.inference, named `prefix` in messages)."""
    files = {"torch": settings.checkpoint, "onnxruntime": settings.onnx_file, "tensorrt": settings.trt_engine}
    given = {b: path for b, path in files.items() if path}
    chosen = settings.backend
    if chosen:
        path = files[chosen]
        if not path:
            raise ConfigError(f"{prefix}.backend={chosen} runs {prefix}.{FILE_KEYS[chosen]}, which is not given.")
        return chosen, str(path)
    if not given:
        raise ConfigError(f"{prefix}.checkpoint (a groundlab .pth, an HF directory or an IDEA .pth), "
                          f"{prefix}.onnx_file or {prefix}.trt_engine is required.")
    if len(given) > 1:
        keys = ", ".join(f"{prefix}.{FILE_KEYS[b]}" for b in given)
        raise ConfigError(f"{keys} are given together: set {prefix}.backend to one of {', '.join(given)} to say "
                          f"which runs.")
    backend, path = next(iter(given.items()))
    return backend, str(path)


def open_predictor(model_cfg: DictConfig, settings: DictConfig, prefix: str, device: torch.device) -> GDinoPredictor:
    """The predictor of the file `settings` names, on `device`; a file given as an s3:// / gs:// / https:// URI is
    fetched once into the cache (the run's cache_dir) first."""
    backend, path = choose_backend(settings, prefix)
    path = local_path(path, key=f"{prefix}.{FILE_KEYS[backend]}")
    if backend == "torch":
        return GDinoPredictor.from_checkpoint(model_cfg, path, device)
    net = BACKENDS[backend](path, device, model_cfg)
    info = net.info
    config = OmegaConf.create(info.model_config) if info.model_config else model_cfg
    log.info("%s: %s runs a %s graph%s", path, backend, info.model,
             f" of fixed input {info.input_size[0]}x{info.input_size[1]}" if info.input_size else "")
    return GDinoPredictor(net, load_tokenizer(info.text_encoder_type), info.num_select, device, info.class_names,
                          config)


def predictor_transforms(aug: DictConfig, predictor: GDinoPredictor) -> Compose:
    """The eval transforms for `predictor`: dataset.augmentation's, resizing to exactly the graph's input size when
    the backend has one (no padding input). A different dataset.augmentation.fixed_input_size is a ConfigError."""
    size = predictor.input_size
    if size is None:
        return build_eval_transforms(aug)
    fixed = list(aug.fixed_input_size) if aug.fixed_input_size else None
    if fixed is not None and fixed != list(size):
        raise ConfigError(f"dataset.augmentation.fixed_input_size={fixed} differs from the graph's input "
                          f"{size[0]}x{size[1]}: leave it unset or set it to [{size[0]}, {size[1]}].")
    aug = OmegaConf.merge(aug, {"fixed_input_size": list(size)})
    return build_eval_transforms(aug)
