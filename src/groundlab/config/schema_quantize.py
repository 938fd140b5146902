"""Typed schema of the `quantize` group (TAO's `quantize` keys), read by action=quantize.

    python run.py model=gdino action=quantize quantize.model_path=<checkpoint .pth or .onnx> \\
        'dataset.quant_calibration_data_sources={image_dir: ..., json_file: ...}'
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional


@dataclass
class QuantDtype:
    dtype: str = "int8"  # int8 | fp8_e4m3fn (fp8: the ModelOpt backends; modelopt.onnx: one dtype for the graph)


@dataclass
class QuantLayer:
    """One `layers` entry: modules matching `module_name` (a glob over ONNX node / module names) get these dtypes."""

    module_name: str = "*"
    weights: QuantDtype = field(default_factory=QuantDtype)
    activations: QuantDtype = field(default_factory=QuantDtype)


@dataclass
class QuantizeConfig:
    model_path: Optional[str] = None  # a groundlab / HF / IDEA / TAO checkpoint (exported first) or an .onnx file
    #   None: the latest checkpoint of the train run with the same model and run_name
    # onnxruntime: ONNX Runtime's INT8 PTQ of the graph, uint8 activations (fastest on the CPU; TensorRT refuses it)
    # modelopt.onnx: ModelOpt's PTQ of the graph, symmetric int8 / fp8 Q/DQ placed for TensorRT: the graph a
    #   TensorRT user wants (gen_trt_engine.tensorrt.data_type=INT8 / FP8)
    # modelopt.pytorch: ModelOpt's PTQ of the PyTorch model (a checkpoint), exported as symmetric Q/DQ
    backend: str = "onnxruntime"
    mode: str = "static_ptq"  # static_ptq (calibrated activations) | weight_only_ptq (not modelopt.onnx)
    # calibration: minmax (TAO/ModelOpt "max") | entropy (not modelopt.pytorch) | percentile (onnxruntime only)
    algorithm: str = "minmax"
    layers: List[QuantLayer] = field(default_factory=lambda: [QuantLayer()])
    # never quantized (globs over node / module names): the text encoder and the prediction heads, whose logits
    # and boxes carry the accuracy; TAO's default skips heads too
    skip_names: List[str] = field(default_factory=lambda: [
        "*bert*", "*feat_map*", "*bbox_embed*", "*class_embed*", "*enc_out_*", "*controller*", "*mask_head*"])
    num_calibration_batches: int = 8
    onnx_file: Optional[str] = None  # the quantized graph (default <results_dir>/quantize/<model>.<int8|fp8>.onnx)
