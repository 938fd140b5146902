"""action=quantize for Grounding DINO and Mask Grounding DINO: post-training quantization to an int8 (or fp8) ONNX
graph in Q/DQ format, then the float and the quantized graph are evaluated with the ONNX Runtime backend on the
validation split and both mAPs and their difference written to <results_dir>/quantize/results.json.

quantize.backend:
- `onnxruntime`: ONNX Runtime's static INT8 PTQ of the float graph (deploy/ort_quantize.py): uint8 activations,
  what ONNX Runtime's CPU kernels are fastest with, and which TensorRT refuses;
- `modelopt.onnx`: NVIDIA ModelOpt's PTQ of the float graph (deploy/modelopt_onnx_quantize.py): symmetric int8 or
  fp8 Q/DQ placed for TensorRT, the graph to build an INT8 / FP8 engine from;
- `modelopt.pytorch`: NVIDIA ModelOpt fake-quantizers in the PyTorch model, calibrated on the same images, then the
  Q/DQ graph exported (deploy/modelopt_quantize.py); quantize.model_path is a checkpoint.
For the graph backends quantize.model_path is a checkpoint (exported first, at export.input_height x
export.input_width) or an .onnx file, and both calibrate on the same feeds (`graph_feeds`). Calibration images
(dataset.quant_calibration_data_sources) go through the evaluation transforms at the graph's size with their
source's class prompts, as evaluate runs them; `quantize.skip_names` (globs over node / module names) stay float.

Without quantize.model_path, the latest checkpoint of the train run with the same model and run_name is quantized
(engine/run_dirs.py); the Q/DQ graph (<results_dir>/quantize/<model>.<int8|fp8>.onnx) is where an INT8 / FP8
action=gen_trt_engine looks by default.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
from dataclasses import replace
from typing import Dict, Iterator, List

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from groundlab.actions.evaluate import run as evaluate
from groundlab.actions.export import export_checkpoint
from groundlab.config import ConfigError
from groundlab.data.collate import GroundingCollator
from groundlab.data.grounding_dataset import GroundingDataset
from groundlab.data.sources import load_split
from groundlab.deploy.ort_quantize import quantize_onnx
from groundlab.engine.run_dirs import chained_file, quantized_onnx
from groundlab.ops.atomic_write import atomic_write_text
from groundlab.predict.backends import open_predictor, predictor_transforms
from groundlab.predict.gdino import GDinoPredictor
from groundlab.predict.graph_contract import batch_groups

log = logging.getLogger(__name__)

BACKENDS = ("onnxruntime", "modelopt.onnx", "modelopt.pytorch")


def calibration_batches(cfg: DictConfig, predictor: GDinoPredictor) -> Iterator[Dict[str, torch.Tensor]]:
    """Up to quantize.num_calibration_batches batches of dataset.quant_calibration_data_sources as the predictor
    sees them: {"images": (B, 3, H, W) at the graph's size, "padding_mask", "prompt": the class prompt (each
    chunk of a long class list in turn)}."""
    sources = load_split(cfg.dataset, cfg.cache_dir, "quant_calibration", use_masks=False)
    if not sources or not sum(len(s.records) for s in sources):
        raise ConfigError("dataset.quant_calibration_data_sources holds no images: give the image_dir and json_file "
                          "(COCO or ODVG with label_map) that calibrate the quantized activations.")
    dataset = GroundingDataset(sources, predictor.encoder, predictor_transforms(cfg.dataset.augmentation, predictor),
                               train=False)
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.dataset.batch_size, shuffle=False,
                                         num_workers=cfg.dataset.workers,
                                         collate_fn=GroundingCollator(predictor.encoder, tokenize=False))
    prompts = predictor.chunked(sources[0].class_names).prompts
    batches = (b for b in loader if b["images"] is not None)
    for k, batch in enumerate(itertools.islice(batches, int(cfg.quantize.num_calibration_batches))):
        yield {"images": batch["images"], "padding_mask": batch["padding_mask"], "prompt": prompts[k % len(prompts)]}


def graph_feeds(cfg: DictConfig, predictor: GDinoPredictor) -> Iterator[Dict[str, np.ndarray]]:
    """The float graph's inputs, as numpy arrays by input name, for each calibration batch (in groups of a
    fixed-batch graph's batch, the last group filled with copies of its last image, as the backend runs them):
    what both graph quantizers (onnxruntime, modelopt.onnx) calibrate on."""
    backend = predictor.backend
    for batch in calibration_batches(cfg, predictor):
        images = backend.encode_image(batch["images"], batch["padding_mask"])
        B = images.shape[0]
        text = {k: v.expand(B, *v.shape[1:]) for k, v in predictor.texts.get(batch["prompt"]).text.items()}
        feeds = {"inputs": images, **text}
        for group, _ in batch_groups({n: feeds[n] for n in backend.input_names}, *backend.info.batch_bounds(B)):
            yield {n: np.ascontiguousarray(v.numpy().astype(backend.types[n])) for n, v in group.items()}


def _evaluate(cfg: DictConfig, onnx_file: str, name: str) -> Dict[str, float]:
    """evaluate's metrics of one graph, in <results_dir>/quantize/<name>/."""
    run_cfg = OmegaConf.merge(cfg, {"evaluate": {"checkpoint": None, "trt_engine": None, "onnx_file": onnx_file,
                                                 "backend": "onnxruntime"},
                                    "results_dir": os.path.join(cfg.results_dir, "quantize", name)})
    return evaluate(run_cfg)


def run(cfg: DictConfig) -> Dict[str, float]:
    q = cfg.quantize
    if q.backend not in BACKENDS:
        raise ConfigError(f"quantize.backend={q.backend!r} is not one of {list(BACKENDS)}.")
    model_path = chained_file(cfg, "quantize.model_path", q.model_path)  # not given: the train run's latest checkpoint
    out_dir = os.path.join(cfg.results_dir, "quantize")
    os.makedirs(out_dir, exist_ok=True)
    is_onnx = model_path.endswith(".onnx")
    if q.backend == "modelopt.pytorch" and is_onnx:
        raise ConfigError(f"quantize.backend=modelopt.pytorch quantizes the PyTorch model: quantize.model_path="
                          f"{model_path} is an ONNX file (use quantize.backend=modelopt.onnx or onnxruntime for "
                          f"it).")
    dtypes = {dtype for layer in q.layers for dtype in (layer.weights.dtype, layer.activations.dtype)}
    if q.backend == "onnxruntime" and dtypes != {"int8"}:
        raise ConfigError(f"quantize.layers asks for {sorted(dtypes)}: quantize.backend=onnxruntime makes int8 graphs "
                          f"only (fp8_e4m3fn needs quantize.backend=modelopt.onnx or modelopt.pytorch).")
    mo_onnx = None
    if q.backend == "modelopt.onnx":
        from groundlab.deploy import modelopt_onnx_quantize as mo_onnx

        mo_settings = mo_onnx.settings(OmegaConf.to_container(q.layers, resolve=True), list(q.skip_names), q.mode,
                                       q.algorithm)
        mo_onnx.check_installed()
    dtype = "fp8" if dtypes == {"fp8_e4m3fn"} and q.backend != "onnxruntime" else "int8"
    float_onnx = model_path if is_onnx else os.path.join(out_dir, f"{cfg.model.name}.float.onnx")
    quant_onnx = q.onnx_file or quantized_onnx(cfg.results_dir, cfg.model.name, dtype)
    if not is_onnx:
        export_checkpoint(cfg, model_path, float_onnx)
    device = torch.device("cpu")
    float_predictor = open_predictor(cfg.model, OmegaConf.create(
        {"checkpoint": None, "onnx_file": float_onnx, "trt_engine": None, "backend": None}), "quantize", device)
    if q.backend == "onnxruntime":
        summary = quantize_onnx(float_onnx, quant_onnx, graph_feeds(cfg, float_predictor), list(q.skip_names),
                                q.mode, q.algorithm).summary()
    elif mo_onnx is not None:
        summary = mo_onnx.quantize_graph(float_onnx, quant_onnx, graph_feeds(cfg, float_predictor), mo_settings,
                                         list(q.skip_names)).summary()
    else:
        summary = _modelopt(cfg, model_path, float_predictor, quant_onnx)
    precision = record_quantization(float_onnx, quant_onnx, q.backend)
    log.info("%s", summary)
    float_metrics = _evaluate(cfg, float_onnx, "float")
    quant_metrics = _evaluate(cfg, quant_onnx, "quantized")
    delta = {k: quant_metrics[k] - float_metrics[k] for k in float_metrics if "mAP" in k}
    results = {"backend": q.backend, "mode": q.mode, "precision": precision, "float_onnx": float_onnx,
               "quantized_onnx": quant_onnx, "summary": summary, "float": float_metrics, "quantized": quant_metrics,
               "delta": delta}
    atomic_write_text(os.path.join(out_dir, "results.json"), json.dumps(results, indent=1))
    for key, value in delta.items():
        log.info("quantized %s: %.4f (float %.4f, delta %+.4f)", key, quant_metrics[key], float_metrics[key], value)
    return {**{f"float_{k}": v for k, v in float_metrics.items() if "mAP" in k},
            **{f"quantized_{k}": v for k, v in quant_metrics.items() if "mAP" in k},
            **{f"delta_{k}": v for k, v in delta.items()}}


def record_quantization(float_onnx: str, quant_onnx: str, backend: str) -> str:
    """The float graph's GraphInfo (the predictor's model facts) onto the quantized graph, with its precision
    (INT8 | FP8 | UINT8, read off its Q/DQ nodes) and how it was made; a graph without groundlab metadata (exported
    elsewhere) keeps none. Returns the precision."""
    import onnx

    from groundlab.deploy.onnx_contract import quantization
    from groundlab.predict.deploy_meta import onnx_info, set_onnx_info

    graph = onnx.load(quant_onnx)
    # weight-only (dynamic) graphs compute with integer ops and have no QuantizeLinear: int8 weights all the same
    integer = any(n.op_type in ("MatMulInteger", "ConvInteger", "DynamicQuantizeLinear") for n in graph.graph.node)
    precision = quantization(graph) or ("INT8" if integer else "FP32")
    info = onnx_info(onnx.load(float_onnx, load_external_data=False))
    if info is not None:
        set_onnx_info(graph, replace(info, precision=precision, build={
            "quantize_backend": backend, "float_onnx": os.path.abspath(float_onnx)}))
        onnx.save(graph, quant_onnx)
    return precision


def _modelopt(cfg: DictConfig, model_path: str, float_predictor: GDinoPredictor, quant_onnx: str) -> str:
    """ModelOpt PTQ of checkpoint `model_path`'s PyTorch model, calibrated on the calibration batches (at the float
    graph's size), exported as a Q/DQ graph. Returns the summary line."""
    from groundlab.deploy.modelopt_quantize import count_quantizers, modelopt_config, quantize_model
    from groundlab.predict.torch_backend import TorchBackend

    q = cfg.quantize
    torch_predictor = open_predictor(cfg.model, OmegaConf.create(
        {"checkpoint": model_path, "onnx_file": None, "trt_engine": None, "backend": None}), "quantize",
        torch.device("cpu"))
    model = torch_predictor.backend.model.eval()
    batches: List[Dict[str, torch.Tensor]] = list(calibration_batches(cfg, float_predictor))
    backend = TorchBackend(model)

    def forward_loop(m) -> None:
        for batch in batches:
            backend.detect(backend.encode_image(batch["images"], batch["padding_mask"]),
                           torch_predictor.texts.get(batch["prompt"]).text)

    config = modelopt_config(list(OmegaConf.to_container(q.layers, resolve=True)), list(q.skip_names), q.algorithm,
                             weight_only=q.mode == "weight_only_ptq")
    quantize_model(model, config, forward_loop)
    # the fake-quantized model against PyTorch would only measure int8 rounding: the mAPs below do that
    export_checkpoint(cfg, model_path, quant_onnx, model=model, verify=False)
    return f"ModelOpt quantized {count_quantizers(model)} quantizers, {len(batches)} calibration batches: {quant_onnx}"
