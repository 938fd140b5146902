"""Typed schema of the `quantize` group (TAO's `quantize` keys), read by action=quantize.

    python run.py model=gdino action=quantize quantize.model_path=<checkpoint .pth or .onnx> \\
        'dataset.quant_calibration_data_sources={image_dir: ..., json_file: ...}'
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional


@dataclass
class QuantDtype:
    dtype: str = "int8"  # int8 | fp8_e4m3fn (fp8: ModelOpt backends, TensorRT engines)


@dataclass
class QuantLayer:
    """One `layers` entry: modules matching `module_name` (a glob over ONNX node / module names) get these dtypes."""

    module_name: str = "*"
    weights: QuantDtype = field(default_factory=QuantDtype)
    activations: QuantDtype = field(default_factory=QuantDtype)


@dataclass
class QuantizeConfig:
    model_path: Optional[str] = None  # a groundlab / HF / IDEA / TAO checkpoint (exported first) or an .onnx file
    backend: str = "onnxruntime"  # onnxruntime (CPU INT8, uint8 activations) | modelopt.pytorch (symmetric, TensorRT)
    mode: str = "static_ptq"  # static_ptq (calibrated activations) | weight_only_ptq
    algorithm: str = "minmax"  # calibration: minmax (TAO/ModelOpt "max") | entropy | percentile
    layers: List[QuantLayer] = field(default_factory=lambda: [QuantLayer()])
    # never quantized (globs over node / module names): the text encoder and the prediction heads, whose logits
    # and boxes carry the accuracy; TAO's default skips heads too
    skip_names: List[str] = field(default_factory=lambda: [
        "*bert*", "*feat_map*", "*bbox_embed*", "*class_embed*", "*enc_out_*", "*controller*", "*mask_head*"])
    num_calibration_batches: int = 8
    onnx_file: Optional[str] = None  # the quantized graph (default <results_dir>/quantize/<model>.int8.onnx)
