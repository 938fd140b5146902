"""NVIDIA ModelOpt's post-training quantization of an exported graph (quantize.backend=modelopt.onnx): the graph a
TensorRT user wants.

ModelOpt places Q/DQ pairs where TensorRT fuses them (the inputs of MatMul, Conv, Gemm and the ops TensorRT runs
quantized around them; not MatMuls TensorRT would run as GEMV, nor attention MatMuls over 512 tokens), with
symmetric scales: zero point 0, int8 or float8e4m3fn, the only Q/DQ TensorRT builds
(gen_trt_engine.tensorrt.data_type=INT8 / FP8). ONNX Runtime runs the same graph on the CPU (INT8 with its integer
kernels, FP8 unfused as fake quantization: predict/onnx_backend.py), which is how action=quantize measures its mAP.
quantize.backend=onnxruntime's graph differs there: uint8 activations, which TensorRT refuses.

Calibration runs on ONNX Runtime's CPU execution provider over the feeds the onnxruntime backend calibrates on
(ort_quantize.FeedReader). Everything not quantized stays FP32 (ModelOpt's default would convert it to FP16,
which the CPU runs slowly; a TensorRT build keeps the graph's types as they are).

TAO's keys map as:
- `layers`: one dtype for the whole graph, weights and activations alike (int8 -> "int8", fp8_e4m3fn -> "fp8");
  `module_name` globs other than "*" are matched against node names, and nodes no layer matches stay float;
- `skip_names`: globs over node names -> ModelOpt's `nodes_to_exclude` (regular expressions: fnmatch.translate);
- `algorithm`: minmax / max -> "max", entropy -> "entropy";
- `mode`: static_ptq only (ModelOpt's ONNX PTQ always calibrates activations).
It needs nvidia-modelopt's ONNX dependencies (onnx-graphsurgeon, onnxslim, onnxscript, lief: requirements.txt).
"""

from __future__ import annotations

import contextlib
import fnmatch
import io
import logging
import sys
import time
import traceback
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, List, Mapping, Sequence

from groundlab.config import ConfigError
from groundlab.errors import UserError
from groundlab.deploy.ort_quantize import QUANTIZED_OPS, Feed, FeedReader, QuantReport, excluded_nodes

DTYPES = {"int8": "int8", "fp8_e4m3fn": "fp8"}
ALGORITHMS = {"minmax": "max", "max": "max", "entropy": "entropy"}

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Settings:
    """quantize.* as ModelOpt's quantize() takes them: mode "int8" | "fp8", calibration method, node-name regexes."""

    mode: str
    method: str
    exclude: List[str]


def glob_regex(glob: str) -> str:
    """A skip_names glob as the regular expression ModelOpt matches node names with (re.match, whole name)."""
    return fnmatch.translate(glob)


def settings(layers: Sequence[Mapping[str, Any]], skip_names: Sequence[str], mode: str, algorithm: str) -> Settings:
    """Check quantize.* for this backend (ConfigError naming the key, before any export or calibration) and map
    them onto ModelOpt's arguments."""
    if mode != "static_ptq":
        raise ConfigError(f"quantize.mode={mode!r}: quantize.backend=modelopt.onnx calibrates activations "
                          f"(static_ptq) only; weight_only_ptq is the onnxruntime or modelopt.pytorch backend's.")
    if algorithm not in ALGORITHMS:
        raise ConfigError(f"quantize.algorithm={algorithm!r}: quantize.backend=modelopt.onnx calibrates with one of "
                          f"{sorted(ALGORITHMS)}.")
    dtypes = {layer[part]["dtype"] for layer in layers for part in ("weights", "activations")}
    if len(dtypes) != 1 or not dtypes <= set(DTYPES):
        raise ConfigError(f"quantize.layers asks for {sorted(dtypes)}: quantize.backend=modelopt.onnx quantizes the "
                          f"whole graph to one dtype, weights and activations alike, one of {sorted(DTYPES)}.")
    exclude = [glob_regex(g) for g in skip_names]
    globs = [str(layer["module_name"]) for layer in layers]
    if "*" not in globs:  # nodes that no layer names stay float: whatever matches none of the globs
        exclude.append("(?!" + "|".join(glob_regex(g) for g in globs) + ")")
    return Settings(DTYPES[dtypes.pop()], ALGORITHMS[algorithm], exclude)


def check_installed() -> None:
    """UserError, before any export or calibration, when ModelOpt's ONNX quantization cannot be imported."""
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            import modelopt.onnx.quantization  # noqa: F401
    except ImportError as err:
        raise UserError(f"quantize.backend=modelopt.onnx needs nvidia-modelopt with its ONNX dependencies, but "
                        f"importing them fails ({str(err).splitlines()[0]}): pip install -c constraints.txt -r "
                        f"requirements.txt.") from None


@contextlib.contextmanager
def _to_log_file(log_file: str):
    """Everything ModelOpt says goes to `log_file`, not to the user's console: its logger (which also prints to
    stdout and propagates to the root logger), onnxruntime.quantization's advice through the root logger, and
    what onnx-graphsurgeon prints. (Its GPU-count probe logs an error on a machine without NVIDIA's driver:
    expected on the CPU.)"""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    to_file = logging.FileHandler(log_file, mode="w")
    to_file.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    root.handlers, printed = [to_file], io.StringIO()
    root.setLevel(logging.INFO)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
            warnings.simplefilter("ignore")
            yield
    finally:
        root.handlers = handlers
        root.setLevel(level)
        to_file.close()
        with open(log_file, "a") as f:  # what was printed, less ModelOpt's own lines (the file has them)
            f.writelines(line for line in printed.getvalue().splitlines(True) if "[modelopt][onnx]" not in line)


@contextlib.contextmanager
def _onnxruntime_quantization_kept():
    """Undo, on the way out, what ModelOpt changes in onnxruntime.quantization: its quantize() replaces methods of
    ORT's calibrators and quantizers and edits ORT's op registries for the whole process (ort_patching.py, "to fix
    bugs"), after which quantize.backend=onnxruntime in the same process calibrates the wrong tensors and fails.
    Module attributes, the methods of ORT's own classes and the registry dicts are put back as they were."""
    import onnxruntime.quantization.base_quantizer  # noqa: F401  (the modules ModelOpt patches, loaded first)
    import onnxruntime.quantization.calibrate  # noqa: F401
    import onnxruntime.quantization.qdq_quantizer  # noqa: F401
    import onnxruntime.quantization.registry  # noqa: F401

    modules = [m for name, m in list(sys.modules.items())
               if m is not None and (name == "onnxruntime.quantization" or name.startswith("onnxruntime.quantization."))]
    saved_modules = {m: dict(vars(m)) for m in modules}
    classes = {v for m in modules for v in vars(m).values()
               if isinstance(v, type) and getattr(v, "__module__", "").startswith("onnxruntime.quantization")}
    saved_classes = {c: dict(vars(c)) for c in classes}
    saved_dicts = {id(v): (v, dict(v)) for m in modules for v in vars(m).values() if type(v) is dict}
    try:
        yield
    finally:
        for m, attrs in saved_modules.items():
            for name in set(vars(m)) - set(attrs):
                delattr(m, name)
            for name, value in attrs.items():
                if vars(m).get(name) is not value:
                    setattr(m, name, value)
        for c, attrs in saved_classes.items():
            for name in set(vars(c)) - set(attrs):
                delattr(c, name)
            for name, value in attrs.items():
                if name not in ("__dict__", "__weakref__", "__doc__") and vars(c).get(name) is not value:
                    setattr(c, name, value)
        for d, items in saved_dicts.values():
            d.clear()
            d.update(items)


def quantize_graph(float_path: str, out_path: str, feeds: Iterable[Feed], config: Settings,
                   skip_names: Sequence[str]) -> QuantReport:
    """Write ModelOpt's Q/DQ graph of `float_path` to `out_path` (opset >= 19, the float graph's inputs and
    outputs; no metadata: the caller copies it), calibrated on `feeds` (the graph's inputs by name, numpy).
    ModelOpt's log goes to `<out_path>.log`; UserError naming it when ModelOpt fails."""
    import onnx

    log_file = f"{out_path}.log"
    reader = FeedReader(feeds)
    reader.get_first()  # no calibration image is a sentence now, not a failure deep inside ModelOpt
    start = time.perf_counter()
    try:
        with _to_log_file(log_file), _onnxruntime_quantization_kept():
            from modelopt.onnx.quantization import quantize

            quantize(float_path, quantize_mode=config.mode, calibration_data_reader=reader,
                     calibration_method=config.method, calibration_eps=["cpu"],
                     nodes_to_exclude=list(config.exclude), high_precision_dtype="fp32", output_path=out_path,
                     log_level="INFO")
    except Exception as err:
        with open(log_file, "a") as f:
            f.write(traceback.format_exc())
        raise UserError(f"ModelOpt could not quantize {float_path} ({type(err).__name__}: {err}); its log, with "
                        f"the traceback: {log_file}.") from err
    seconds = time.perf_counter() - start
    graph = onnx.load(out_path, load_external_data=False)
    fed = quantized_nodes(graph)
    ops = Counter(n.op_type for n in fed)
    main = sum(ops[op] for op in QUANTIZED_OPS)
    float_graph = onnx.load(float_path, load_external_data=False)
    return QuantReport(out_path, len(fed), excluded_nodes(float_graph, skip_names), reader.count, seconds,
                       nodes=f"nodes ({main} MatMul/Conv/Gemm) to {config.mode} Q/DQ with ModelOpt "
                             f"({config.method} calibration)")


def quantized_nodes(model) -> List[Any]:
    """The nodes of an onnx.ModelProto that compute on dequantized inputs (an input made by DequantizeLinear),
    Q/DQ nodes and Shape (which reads only the shape) left out."""
    dequantized = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return [n for n in model.graph.node if n.op_type not in ("QuantizeLinear", "DequantizeLinear", "Shape")
            and any(i in dequantized for i in n.input)]
