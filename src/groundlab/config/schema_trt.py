"""Typed schema of the `gen_trt_engine` group: TensorRT engine building, keyed as TAO's `gen_trt_engine` spec
(`gen_trt_engine.onnx_file`, `gen_trt_engine.tensorrt.data_type`, ...), so a TAO user's overrides carry over.

The group is chosen per model (`conf/gen_trt_engine/<model>.yaml`): Mask Grounding DINO engines are batch 1, as
TAO builds them. MAL has no engine, so the group is absent there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

DATA_TYPES = ("FP32", "FP16", "FP8", "INT8")


@dataclass
class TensorRTBuildConfig:
    """TAO's `gen_trt_engine.tensorrt` node. INT8 and FP8 build a Q/DQ graph (action=quantize's ONNX) as it
    is typed; FP16 converts a float graph to FP16 with explicit casts that keep the fragile layers in FP32
    (deploy/trt_precision.py). TensorRT 11 builds strongly typed networks only, so the graph decides."""

    data_type: str = "FP32"  # FP32 | FP16 | FP8 | INT8 (any case)
    workspace_size: int = 8192  # MiB of scratch memory the builder's tactics may use (TAO: MB)
    min_batch_size: int = 1  # the optimization profile's batch range (a dynamic-batch ONNX file)
    opt_batch_size: int = 1  # the batch TensorRT tunes its kernels for
    max_batch_size: int = 4


@dataclass
class GenTrtEngineConfig:
    onnx_file: Optional[str] = None  # action=export's ONNX (or action=quantize's Q/DQ ONNX)
    #   None: that of the export run (INT8 / FP8: the quantize run) with the same model and run_name
    trt_engine: Optional[str] = None  # engine path; None: <results_dir>/<onnx name>.<data type>.engine
    timing_cache_file: Optional[str] = None  # read when it exists, written after the build: rebuilds are faster
    verbose: bool = False  # TensorRT's builder log at VERBOSE (each layer, each tactic) instead of WARNING
    tensorrt: TensorRTBuildConfig = field(default_factory=TensorRTBuildConfig)
