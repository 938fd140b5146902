"""action=gen_trt_engine (TAO's name; action=trt is the same) for Grounding DINO and Mask Grounding DINO: a
TensorRT engine from action=export's ONNX file. gen_trt_engine.onnx_file defaults to the graph of the run this
follows, with the same model and run_name (engine/run_dirs.py): the export run's <model>.onnx, or for an INT8 / FP8
engine the quantize run's Q/DQ graph.

Reads `gen_trt_engine.*` (TAO's keys): the ONNX file's contract is checked first (six inputs, fixed size and
text length, pred_masks exactly when model=mask_gdino), then the graph is prepared for the data type (FP16: explicit
casts keep the fragile layers FP32; INT8/FP8: the Q/DQ graph) and built with one optimization profile. Writes the
engine, `<engine>.json` (the ONNX file's GraphInfo, predict/deploy_meta.py, with the engine's precision, batch
profile and how it was built: what the TensorRT backend needs to run it), and logs one summary line. Returns {"build_seconds", "engine_mib"}.
"""

from __future__ import annotations

import logging
import os
from typing import Dict, Tuple

from omegaconf import DictConfig

from groundlab.deploy.onnx_contract import MASK_OUTPUT, OnnxContract, Shape, profile_shapes, read_contract
from groundlab.deploy.trt_build import build_engine, import_tensorrt, prepare_graph, tensorrt_version
from groundlab.engine.run_dirs import chained_file
from groundlab.errors import DataError, MissingFile
from groundlab.predict.deploy_meta import GraphInfo, sidecar_path

log = logging.getLogger(__name__)


def engine_path(g: DictConfig, onnx_file: str, results_dir: str) -> str:
    """gen_trt_engine.trt_engine, or <results_dir>/<onnx name>.<data type>.engine (fp16 beside fp32, no clash)."""
    if g.trt_engine:
        return str(g.trt_engine)
    stem = os.path.splitext(os.path.basename(onnx_file))[0]
    return os.path.join(results_dir, f"{stem}.{g.tensorrt.data_type.lower()}.engine")


def engine_info(model, model_cfg: DictConfig, contract: OnnxContract, shapes: Dict[str, Tuple[Shape, Shape, Shape]],
                data_type: str) -> GraphInfo:
    """The engine's sidecar: the ONNX file's own GraphInfo (the config's model keys for a graph exported
    elsewhere) with the engine's facts: input size, text length, batch profile (min, opt, max), precision and how
    it was built."""
    return GraphInfo.from_metadata(
        {p.key: p.value for p in model.metadata_props}, model_cfg, has_masks=contract.has_masks,
        input_size=(contract.height, contract.width), max_text_len=contract.text_len, batch_size=contract.batch,
        batch_range=tuple(shapes["inputs"][i][0] for i in range(3)), precision=data_type,
        build={"onnx_file": os.path.abspath(contract.path), "tensorrt": tensorrt_version()})


def run(cfg: DictConfig) -> Dict[str, float]:
    g = cfg.gen_trt_engine
    t = g.tensorrt
    data_type = t.data_type.upper()
    # not given: the float graph of the export run, or the Q/DQ graph of the quantize run for a quantized engine
    quantized = data_type in ("INT8", "FP8")
    onnx_file = chained_file(cfg, "gen_trt_engine.onnx_file", g.onnx_file, "quantize" if quantized else "export",
                             dtype=data_type.lower())
    if not os.path.isfile(onnx_file):
        raise MissingFile(f"gen_trt_engine.onnx_file={onnx_file} does not exist.")
    import onnx

    model = onnx.load(onnx_file)
    contract = read_contract(model, onnx_file)
    wants_masks = cfg.model.name == "mask_gdino"
    if contract.has_masks != wants_masks:
        have = "has a" if contract.has_masks else "has no"
        raise DataError(f"{have} {MASK_OUTPUT} output, but model={cfg.model.name} "
                        f"{'needs one' if wants_masks else 'has no mask head'}: build it with model="
                        f"{'mask_gdino' if contract.has_masks else 'gdino'} (or export the other checkpoint).",
                        onnx_file)
    shapes = profile_shapes(contract, t.min_batch_size, t.opt_batch_size, t.max_batch_size)
    graph = prepare_graph(model, contract, data_type)
    import_tensorrt("action=gen_trt_engine")  # the file's faults are said first, then what the machine lacks
    path = engine_path(g, onnx_file, cfg.results_dir)
    result = build_engine(graph, onnx_file, path, shapes, t.workspace_size, g.timing_cache_file, g.verbose)
    engine_info(model, cfg.model, contract, shapes, data_type).write(sidecar_path(path))
    log.info(result.summary(data_type, shapes))
    return {"build_seconds": round(result.seconds, 2), "engine_mib": round(result.size_bytes / 2**20, 2)}
