"""ONNX Runtime post-training INT8 quantization of an exported Grounding DINO graph (CPU).

Static PTQ (quantize.mode=static_ptq): activation ranges are calibrated on real inputs (the calibration images
at the graph's fixed size, with the class prompts they would be run with), then MatMul / Conv / Gemm nodes get
QuantizeLinear / DequantizeLinear pairs (QDQ format: uint8 activations, int8 per-channel weights), which ONNX
Runtime's CPU provider fuses into integer kernels (TensorRT takes symmetric int8 only: it builds INT8 engines
from quantize.backend=modelopt.onnx's or modelopt.pytorch's graphs). Weight-only PTQ
(quantize.mode=weight_only_ptq) is ONNX Runtime's dynamic quantization: int8 weights, activation ranges
computed per call, no calibration.

Nodes whose names match a `quantize.skip_names` glob stay float: by default the text encoder and the heads
(contrastive logits, boxes, mask head), where a rounding error moves a score or a box edge directly.
"""

from __future__ import annotations

import contextlib
import fnmatch
import io
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, List, Optional, Sequence

import numpy as np
import onnx

QUANTIZED_OPS = ("MatMul", "Conv", "Gemm")
# uint8 activations / int8 weights: what ONNX Runtime's CPU integer kernels are fastest with. TensorRT takes
# symmetric int8 only, so an engine is built from quantize.backend=modelopt.onnx's (or modelopt.pytorch's) graph.
ALGORITHMS = {"minmax": "MinMax", "max": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}

Feed = Dict[str, np.ndarray]


@dataclass
class QuantReport:
    """What a graph quantizer did (this module's and modelopt_onnx_quantize.py's)."""

    path: str
    quantized: int  # nodes of QUANTIZED_OPS that got QDQ pairs (static) or int8 weights (dynamic)
    excluded: List[str]  # nodes of those types left float by skip_names
    calibration_batches: int
    seconds: float
    nodes: str = "MatMul/Conv/Gemm nodes to int8"  # what `quantized` counts

    def summary(self) -> str:
        return (f"quantized {self.quantized} {self.nodes} ({len(self.excluded)} left float by "
                f"quantize.skip_names), {self.calibration_batches} calibration batches, {self.seconds:.1f} s: "
                f"{self.path}")


def excluded_nodes(model: onnx.ModelProto, skip_names: Sequence[str]) -> List[str]:
    """Names of the quantizable nodes that a skip_names glob matches (matched against the node name, which the
    exporter derives from the module path, e.g. `/model/transformer/decoder/layers.0/linear1/MatMul`)."""
    out = []
    for node in model.graph.node:
        if node.op_type in QUANTIZED_OPS and any(fnmatch.fnmatchcase(node.name, g) for g in skip_names):
            out.append(node.name)
    return out


class FeedReader:
    """The calibration feeds as both quantizers read them: onnxruntime's CalibrationDataReader protocol
    (`get_next`, None at the end) and ModelOpt's additions to it (`get_first` without advancing, `rewind`), since
    ModelOpt runs the first feed to size its attention and GEMV checks before it calibrates from the start. Feeds
    are drawn from the iterable as they are first asked for and kept, so a rewind replays the same ones.
    count: how many distinct feeds were read."""

    def __init__(self, feeds: Iterable[Feed]):
        self._source: Iterator[Feed] = iter(feeds)
        self._seen: List[Feed] = []
        self._next = 0

    @property
    def count(self) -> int:
        return len(self._seen)

    def get_next(self) -> Optional[Feed]:
        if self._next == len(self._seen):
            feed = next(self._source, None)
            if feed is None:
                return None
            self._seen.append(feed)
        self._next += 1
        return self._seen[self._next - 1]

    def get_first(self) -> Feed:
        if not self._seen and self.get_next() is not None:
            self._next = 0
        if not self._seen:
            raise ValueError("no calibration batch: dataset.quant_calibration_data_sources holds no image")
        return self._seen[0]

    def rewind(self) -> None:
        self._next = 0

    def __iter__(self):
        return self

    def __next__(self) -> Feed:
        feed = self.get_next()
        if feed is None:
            raise StopIteration
        return feed


@contextmanager
def _quiet():
    """onnxruntime.quantization logs advice through the root logger (bias not constant, pre-processing) and its
    calibrators print to stdout: not for the user's console."""
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the entropy / percentile calibrators print() progress
            yield
    finally:
        logging.disable(logging.NOTSET)


def quantize_onnx(float_path: str, out_path: str, feeds: Iterable[Feed], skip_names: Sequence[str],
                  mode: str = "static_ptq", algorithm: str = "minmax") -> QuantReport:
    """Write the int8 graph of `float_path` to `out_path`. feeds: calibration inputs by input name (static PTQ;
    ignored for weight-only). Raises ValueError for an unknown mode / algorithm or no calibration batch."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    model = onnx.load(float_path, load_external_data=False)
    excluded = excluded_nodes(model, skip_names)
    candidates = sum(node.op_type in QUANTIZED_OPS for node in model.graph.node)
    start = time.perf_counter()
    reader = FeedReader(feeds)
    with _quiet():
        if mode == "static_ptq":
            if algorithm not in ALGORITHMS:
                raise ValueError(f"quantize.algorithm={algorithm!r} is not one of {sorted(ALGORITHMS)}")
            quantize_static(float_path, out_path, reader, quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=list(QUANTIZED_OPS), per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            nodes_to_exclude=excluded, calibrate_method=getattr(CalibrationMethod, ALGORITHMS[algorithm]))
            if reader.count == 0:
                raise ValueError("no calibration batch: dataset.quant_calibration_data_sources holds no image")
        elif mode == "weight_only_ptq":
            quantize_dynamic(float_path, out_path, op_types_to_quantize=list(QUANTIZED_OPS), per_channel=True,
                             weight_type=QuantType.QInt8, nodes_to_exclude=excluded)
        else:
            raise ValueError(f"quantize.mode={mode!r} is not static_ptq or weight_only_ptq")
    return QuantReport(out_path, candidates - len(excluded), excluded, reader.count, time.perf_counter() - start)
