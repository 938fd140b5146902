"""NVIDIA ModelOpt post-training quantization of the PyTorch model (quantize.backend=modelopt.pytorch).

ModelOpt inserts fake-quantizers before and in the quantized modules' weights, calibrates the activation ranges on
real inputs (the `forward_loop`), and the quantized model exports to ONNX with QuantizeLinear /
DequantizeLinear pairs, which TensorRT builds as an INT8 (or FP8) engine and ONNX Runtime runs on the CPU (INT8).
This module maps TAO's `quantize` keys onto a ModelOpt config:

- `layers`: [{module_name: glob, weights: {dtype}, activations: {dtype}}] -> quantizer patterns
  `<glob>weight_quantizer` / `<glob>input_quantizer` (int8: 8 bits, per output channel for weights; fp8_e4m3fn:
  (4, 3) bits, per tensor);
- `skip_names`: globs whose quantizers are disabled (the text encoder and heads by default);
- `algorithm`: minmax / max -> ModelOpt "max" calibration (the only one ModelOpt offers for these layers).
"""

from __future__ import annotations

import contextlib
import io
import warnings
from typing import Any, Callable, Dict, List, Mapping, Sequence

from torch import nn

DTYPES = {"int8": {"num_bits": 8}, "fp8_e4m3fn": {"num_bits": (4, 3)}}
ALGORITHMS = {"minmax": "max", "max": "max"}


def _pattern(module_name: str, quantizer: str) -> str:
    """`*` -> `*weight_quantizer`; `transformer.decoder*` -> `transformer.decoder*weight_quantizer`;
    `backbone.body` -> `backbone.body.*weight_quantizer` (every quantizer under that module)."""
    return f"{module_name}{quantizer}" if module_name.endswith("*") else f"{module_name}.*{quantizer}"


def modelopt_config(layers: Sequence[Mapping[str, Any]], skip_names: Sequence[str], algorithm: str,
                    weight_only: bool = False) -> Dict[str, Any]:
    """A ModelOpt quantization config (`mtq.quantize`'s second argument) from TAO's quantize keys. Raises
    ValueError naming the key for an unknown dtype or algorithm."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"quantize.algorithm={algorithm!r}: the modelopt backends calibrate with one of "
                         f"{sorted(ALGORITHMS)}")
    quant_cfg: List[Dict[str, Any]] = [{"quantizer_name": "*", "enable": False}]
    for i, layer in enumerate(layers):
        parts = (("weights", layer["weights"]["dtype"], "weight_quantizer", 0),
                 ("activations", layer["activations"]["dtype"], "input_quantizer", None))
        for part, dtype, quantizer, axis in parts:
            if dtype not in DTYPES:
                raise ValueError(f"quantize.layers[{i}].{part}.dtype={dtype!r} is not one of {sorted(DTYPES)}")
            if part == "activations" and weight_only:
                continue
            cfg = dict(DTYPES[dtype], axis=axis if dtype == "int8" else None)
            quant_cfg.append({"quantizer_name": _pattern(layer["module_name"], quantizer), "cfg": cfg})
    quant_cfg += [{"quantizer_name": glob, "enable": False} for glob in skip_names]
    return {"quant_cfg": quant_cfg, "algorithm": ALGORITHMS[algorithm]}


def quantize_model(model: nn.Module, config: Dict[str, Any], forward_loop: Callable[[nn.Module], None]) -> nn.Module:
    """The model with ModelOpt's calibrated fake-quantizers (in place); forward_loop(model) runs the calibration
    batches through it."""
    with warnings.catch_warnings():  # its import warns about untested transformers versions: not the user's concern
        warnings.simplefilter("ignore")
        import modelopt.torch.quantization as mtq

    with contextlib.redirect_stdout(io.StringIO()):  # it prints "Inserted N quantizers": the summary line says it
        return mtq.quantize(model, config, forward_loop=forward_loop)


def count_quantizers(model: nn.Module) -> int:
    """Enabled ModelOpt quantizers in the model (weights and inputs)."""
    return sum(1 for name, m in model.named_modules()
               if name.endswith(("weight_quantizer", "input_quantizer")) and getattr(m, "is_enabled", False))
