"""ONNX Runtime post-training INT8 quantization of an exported Grounding DINO graph (CPU).

Static PTQ (quantize.mode=static_ptq): activation ranges are calibrated on real inputs (the calibration images
at the graph's fixed size, with the class prompts they would be run with), then the MatMul / Conv / Gemm nodes
with a constant weight get QuantizeLinear / DequantizeLinear pairs on their inputs (QDQ format: uint8
activations, int8 per-channel weights) and none on their outputs, which ONNX Runtime's CPU provider runs as
integer kernels with a float output (no requantization of every product: ~10% faster than QLinearMatMul with its
DequantizeLinear); the Linear layers are first rewritten from MatMul + Add to Gemm (`linears_as_gemm`), whose
integer kernel (QGemm) adds the bias itself (another ~8%). A MatMul of two activations (attention scores, the deformable
attention's weighted sums) stays float: quantizing it costs a QuantizeLinear of a large data-dependent tensor per
call for little or no gain, and its ranges are not calibrated at all (calibrating every tensor of a Swin-T graph
at 544x960 runs out of memory). TensorRT takes symmetric int8 only: it builds INT8 engines from
quantize.backend=modelopt.onnx's or modelopt.pytorch's graphs. Weight-only PTQ (quantize.mode=weight_only_ptq)
is ONNX Runtime's dynamic quantization: int8 weights, activation ranges computed per call, no calibration.

Nodes whose names match a `quantize.skip_names` glob stay float: by default the text encoder and the heads
(contrastive logits, boxes, mask head), where a rounding error moves a score or a box edge directly.
"""

from __future__ import annotations

import contextlib
import fnmatch
import io
import logging
import os
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Set

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


def weight_nodes(model: onnx.ModelProto) -> List[onnx.NodeProto]:
    """The QUANTIZED_OPS nodes whose weight (second input) is a constant (an initializer or a Constant node's
    output): what static PTQ quantizes. A MatMul of two activations is not one of them."""
    constants = {t.name for t in model.graph.initializer}
    constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    return [n for n in model.graph.node
            if n.op_type in QUANTIZED_OPS and len(n.input) > 1 and n.input[1] in constants]


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


def linears_as_gemm(model: onnx.ModelProto) -> int:
    """Rewrite, in place, every MatMul by a 2-D constant weight followed by an Add of a 1-D constant bias (a
    torch Linear on a (B, N, C) input) as Reshape to 2-D -> Gemm -> Reshape back: quantized, a Gemm becomes one
    QGemm with the bias inside, where a MatMul leaves a separate float Add over its whole output (~8% of the int8
    Swin-T graph's time). The Gemm keeps the MatMul's name, so skip_names match it as before. Returns how many."""
    from onnx import helper, numpy_helper

    graph = model.graph
    weights = {t.name: t for t in graph.initializer}
    users: Dict[str, List[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    nodes, fused, rewritten = [], set(), 0
    for node in graph.node:
        if id(node) in fused:
            continue
        add = users.get(node.output[0], [None])
        add = add[0] if node.op_type == "MatMul" and len(add) == 1 else None
        bias = None if add is None or add.op_type != "Add" else next(
            (i for i in add.input if i != node.output[0] and i in weights and len(weights[i].dims) == 1), None)
        w = weights.get(node.input[1]) if bias is not None else None
        if w is None or len(w.dims) != 2:
            nodes.append(node)
            continue
        name, (K, N) = node.name or node.output[0], w.dims
        graph.initializer.extend([numpy_helper.from_array(np.array([-1, K], np.int64), f"{name}/gemm_2d"),
                                  numpy_helper.from_array(np.array([N], np.int64), f"{name}/gemm_width")])
        nodes += [helper.make_node("Shape", [node.input[0]], [f"{name}/gemm_lead"], name=f"{name}/gemm_shape", end=-1),
                  helper.make_node("Concat", [f"{name}/gemm_lead", f"{name}/gemm_width"], [f"{name}/gemm_nd"],
                                   name=f"{name}/gemm_out_shape", axis=0),
                  helper.make_node("Reshape", [node.input[0], f"{name}/gemm_2d"], [f"{name}/gemm_in"],
                                   name=f"{name}/gemm_flatten"),
                  helper.make_node("Gemm", [f"{name}/gemm_in", node.input[1], bias], [f"{name}/gemm_out"], name=name),
                  helper.make_node("Reshape", [f"{name}/gemm_out", f"{name}/gemm_nd"], [add.output[0]],
                                   name=f"{name}/gemm_unflatten")]
        fused.add(id(add))
        rewritten += 1
    del graph.node[:]
    graph.node.extend(nodes)
    return rewritten


def _calibrated_ranges(float_path: str, tensors: Set[str], reader: "FeedReader", algorithm: str, cache: str) -> None:
    """Calibrate the ranges of `tensors` only (onnxruntime's calibrators take every float tensor of the node types
    they are given) on the reader's feeds and write them where quantize_static reads a calibration cache."""
    from onnxruntime.quantization import calibrate

    base = {"minmax": calibrate.MinMaxCalibrater, "max": calibrate.MinMaxCalibrater,
            "entropy": calibrate.EntropyCalibrater, "percentile": calibrate.PercentileCalibrater}[algorithm]

    class Calibrater(base):
        def select_tensors_to_calibrate(self, model):
            found, value_infos = super().select_tensors_to_calibrate(model)
            return found & tensors, value_infos

    # percentile: symmetric, as quantize_static's own calibrator makes it
    calibrater = Calibrater(float_path, list(QUANTIZED_OPS), os.path.join(os.path.dirname(cache), "augmented.onnx"),
                            **({"symmetric": True} if algorithm == "percentile" else {}))
    calibrater.augment_graph()
    calibrater.create_inference_session()
    calibrater.collect_data(reader)
    calibrate.save_tensors_data(calibrater.compute_data(), cache)


def quantize_onnx(float_path: str, out_path: str, feeds: Iterable[Feed], skip_names: Sequence[str],
                  mode: str = "static_ptq", algorithm: str = "minmax") -> QuantReport:
    """Write the int8 graph of `float_path` to `out_path`. feeds: calibration inputs by input name (static PTQ;
    ignored for weight-only). Raises ValueError for an unknown mode / algorithm or no calibration batch."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    if mode not in ("static_ptq", "weight_only_ptq"):
        raise ValueError(f"quantize.mode={mode!r} is not static_ptq or weight_only_ptq")
    if mode == "static_ptq" and algorithm not in ALGORITHMS:
        raise ValueError(f"quantize.algorithm={algorithm!r} is not one of {sorted(ALGORITHMS)}")
    start = time.perf_counter()
    reader = FeedReader(feeds)
    with tempfile.TemporaryDirectory(prefix="groundlab_quantize_") as tmp, _quiet():
        model = onnx.load(float_path)
        if mode == "static_ptq":  # (onnxruntime's dynamic quantization takes MatMul, not Gemm)
            linears_as_gemm(model)
        source = os.path.join(tmp, "float.onnx")
        onnx.save(model, source)
        excluded = excluded_nodes(model, skip_names)
        weighted = {n.name: n for n in weight_nodes(model)}
        # every quantizable node that is not a constant-weight one stays float (module doc)
        left_float = [n.name for n in model.graph.node if n.op_type in QUANTIZED_OPS and n.name not in weighted]
        quantized = [n for name, n in weighted.items() if name not in set(excluded)]
        del model
        if mode == "static_ptq":
            cache = os.path.join(tmp, "ranges.json")
            _calibrated_ranges(source, {n.input[0] for n in quantized}, reader, algorithm, cache)
            if reader.count == 0:
                raise ValueError("no calibration batch: dataset.quant_calibration_data_sources holds no image")
            quantize_static(source, out_path, None, quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=list(QUANTIZED_OPS), per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            nodes_to_exclude=excluded + left_float,
                            calibrate_method=getattr(CalibrationMethod, ALGORITHMS[algorithm]),
                            extra_options={"OpTypesToExcludeOutputQuantization": list(QUANTIZED_OPS)},
                            calibration_cache_path=cache)
        else:
            quantize_dynamic(source, out_path, op_types_to_quantize=list(QUANTIZED_OPS), per_channel=True,
                             weight_type=QuantType.QInt8, nodes_to_exclude=excluded + left_float)
    return QuantReport(out_path, len(quantized), excluded, reader.count, time.perf_counter() - start)
