"""TensorRT engine building from an ONNX file with the TensorRT Python API (10.x and 11.x).

The graph decides every layer's precision (a strongly typed network, the only kind TensorRT 11 builds):

- FP32: the exported float graph as it is.
- FP16: the float graph converted with explicit casts, the fragile layers kept in FP32 (trt_precision.py).
- INT8 / FP8: action=quantize's Q/DQ graph as it is; a float graph is refused rather than silently built FP32.

One optimization profile covers all six inputs (onnx_contract.profile_shapes): min/opt/max batch, the file's
fixed H, W and text length L. Everything up to `build_engine` runs without TensorRT (and is tested on the CPU);
`build_engine` needs TensorRT and a CUDA GPU.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from groundlab.deploy.onnx_contract import OnnxContract, Shape, quantization
from groundlab.deploy.trt_precision import convert_to_fp16, precision_summary
from groundlab.errors import DataError, UserError
from groundlab.ops.atomic_write import atomic_write

log = logging.getLogger(__name__)


def import_tensorrt(what: str):
    """The tensorrt module; UserError naming `what` needed it when it is not installed."""
    try:
        import tensorrt
    except ImportError as err:
        raise UserError(f"{what} needs TensorRT and a CUDA GPU, but `import tensorrt` fails here ({err}); install "
                        f"the GPU extras: pip install -c constraints.txt -r requirements-gpu.txt.") from None
    return tensorrt


def prepare_graph(model, contract: OnnxContract, data_type: str):
    """The onnx.ModelProto to build for `data_type` (FP32 | FP16 | FP8 | INT8): FP16 converts a float graph;
    the others are the file's graph. DataError when the file's quantization does not match the data type."""
    quantized = quantization(model)
    if quantized == "UINT8":
        raise DataError("is quantized with uint8 activations (quantize.backend=onnxruntime makes ONNX Runtime's CPU "
                        "format), which TensorRT cannot build (it takes symmetric int8 only): quantize with "
                        "quantize.backend=modelopt.onnx (or modelopt.pytorch) for an engine, or build the float "
                        "ONNX.", contract.path)
    if data_type in ("INT8", "FP8"):
        if quantized is None:
            raise DataError(f"has no Q/DQ (QuantizeLinear) nodes, but gen_trt_engine.tensorrt.data_type={data_type} "
                            f"builds a quantized graph: quantize it first (action=quantize) or build FP16.",
                            contract.path)
        if quantized != data_type:
            raise DataError(f"is quantized to {quantized}, not {data_type}: set "
                            f"gen_trt_engine.tensorrt.data_type={quantized}.", contract.path)
        return model
    if quantized is not None:
        raise DataError(f"is quantized to {quantized} (Q/DQ nodes), which a {data_type} build cannot undo: set "
                        f"gen_trt_engine.tensorrt.data_type={quantized}, or build from the float ONNX.", contract.path)
    if data_type == "FP16":
        try:
            half = convert_to_fp16(model)
        except DataError as err:
            raise DataError(str(err), contract.path) from None
        log.info("FP16 graph of %s: %s", contract.path, precision_summary(half))
        return half
    return model


@dataclass
class BuildResult:
    engine_path: str
    seconds: float
    size_bytes: int

    def summary(self, data_type: str, shapes: Dict[str, Tuple[Shape, Shape, Shape]]) -> str:
        """One line: path, size, data type, the profile (batch range and the image input's size), build time."""
        lo, opt, hi = shapes["inputs"]
        return (f"engine {self.engine_path}: {self.size_bytes / 2**20:.1f} MiB, {data_type}, profile batch "
                f"{lo[0]}/{opt[0]}/{hi[0]} at {lo[2]}x{lo[3]} with {shapes['input_ids'][0][1]} text tokens, built in "
                f"{self.seconds:.1f} s")


def build_engine(model, onnx_path: str, engine_path: str, shapes: Dict[str, Tuple[Shape, Shape, Shape]],
                 workspace_mib: int, timing_cache_file: Optional[str] = None, verbose: bool = False) -> BuildResult:
    """Parse `model` (an onnx.ModelProto; external weights are looked up next to `onnx_path`), build one
    optimization profile from `shapes` (input -> (min, opt, max)), write the serialized engine to
    `engine_path` (atomically) and the timing cache to `timing_cache_file` (when given)."""
    trt = import_tensorrt("gen_trt_engine")
    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # STRONGLY_TYPED: 10.x honours it; 11.x keeps the flag (ignored) since every network is strongly typed
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(model.SerializeToString(), os.path.abspath(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise DataError(f"TensorRT's ONNX parser refused it: {errors}", onnx_path)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mib) << 20)
    # TensorRT allows TF32 by default, which rounds FP32 matmul inputs to FP16's 10-bit mantissa: an FP32 engine
    # and the layers an FP16 graph keeps in FP32 are meant to be FP32
    config.clear_flag(trt.BuilderFlag.TF32)
    dynamic = {network.get_input(i).name for i in range(network.num_inputs)
               if any(d < 0 for d in network.get_input(i).shape)}
    if dynamic:  # a fixed-batch file has no dynamic input, and TensorRT wants no profile then
        profile = builder.create_optimization_profile()
        for name in sorted(dynamic):
            profile.set_shape(name, *shapes[name])
        config.add_optimization_profile(profile)
    cache = None
    if timing_cache_file:
        old = b""
        if os.path.isfile(timing_cache_file):
            with open(timing_cache_file, "rb") as f:
                old = f.read()
        cache = config.create_timing_cache(old)
        config.set_timing_cache(cache, ignore_mismatch=False)  # a cache from another GPU is not used
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if serialized is None:
        raise UserError(f"TensorRT could not build an engine from {onnx_path} (its log above says why; "
                        f"gen_trt_engine.verbose=true shows every layer), e.g. too little "
                        f"gen_trt_engine.tensorrt.workspace_size={workspace_mib} MiB.")

    def write(path: str, data) -> None:
        with open(path, "wb") as f:
            f.write(data)

    atomic_write(engine_path, lambda tmp: write(tmp, serialized))
    if cache is not None:
        atomic_write(timing_cache_file, lambda tmp: write(tmp, config.get_timing_cache().serialize()))
    return BuildResult(engine_path, seconds, os.path.getsize(engine_path))


def tensorrt_version() -> str:
    """The installed TensorRT's version, "" without one (recorded in the engine's sidecar)."""
    try:
        import tensorrt
    except ImportError:
        return ""
    return str(tensorrt.__version__)
