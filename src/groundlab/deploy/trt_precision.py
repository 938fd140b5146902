"""FP16 engines that keep their accuracy: the float graph converted to FP16 with explicit casts, the numerically
fragile layers kept in FP32.

TensorRT 11 builds strongly typed networks only (BuilderFlag.FP16 and OBEY_PRECISION_CONSTRAINTS are gone): the
ONNX graph's types decide each layer's precision. Users report Grounding DINO collapsing when the whole
encoder/decoder runs in FP16; the layers below are why, and stay in FP32:

| match | pattern | why it stays FP32 |
|---|---|---|
| op | Softmax | exp of attention logits: FP16 overflows at 11.1, sums of many small terms underflow |
| op | LayerNormalization, InstanceNormalization, GroupNormalization, ReduceMean, Pow | variance: a sum of squares over the channels leaves FP16's range (65504) |
| op | Exp, Log | inverse_sigmoid(x) = log(x / (1 - x)) of the reference points: FP16 resolves 1 - x only to 5e-4 |
| op | Sigmoid | box and reference-point refinement (sigmoid(delta + inverse_sigmoid(ref))) and the class scores |
| op | TopK, ReduceMax | the query selection: per-token max of the encoder's class logits, near-ties must not swap |
| name | `fusion_layers.N/attn/` | the image-text bi-attention: its logits reach +-50000 (the model clamps there) |
| name | `class_embed` | the contrastive head: image-text dot products, the TopK input and pred_logits |

After the table, each kept node also keeps the cheap elementwise nodes feeding it (Add, Sub, Mul, Div, Clip, ...,
up to GROW_DEPTH steps back): inverse_sigmoid's clamp and division, the attention scale and bias, computed in
FP16 and then cast, would lose what the FP32 node is there to keep.

Data movement (Reshape, Transpose, Gather, Concat, Where, ...) and comparisons take the precision of their
inputs, so a reshape between two FP32 nodes stays FP32. Graph inputs and outputs stay float32: the engine's
interface does not change with its data type.
"""

from __future__ import annotations

import re
from typing import Dict, List, Optional, Set, Tuple

from groundlab.errors import DataError

# (match, pattern, why): match "op" compares the node's op_type, "name" searches the node's name (a regex)
FP32_LAYERS: List[Tuple[str, str, str]] = [
    ("op", "Softmax", "exp of attention logits overflows FP16"),
    ("op", "LayerNormalization", "sum of squares leaves FP16's range"),
    ("op", "InstanceNormalization", "sum of squares leaves FP16's range"),
    ("op", "GroupNormalization", "sum of squares leaves FP16's range"),
    ("op", "ReduceMean", "normalization statistics"),
    ("op", "Pow", "normalization statistics"),
    ("op", "Exp", "exp overflows FP16"),
    ("op", "Log", "inverse_sigmoid of reference points near 0 and 1"),
    ("op", "Sigmoid", "box refinement and class scores"),
    ("op", "TopK", "query selection: near-tied scores must not swap"),
    ("op", "ReduceMax", "query selection input: per-token max of class logits"),
    ("name", r"fusion_layers\.\d+/attn/", "image-text bi-attention logits reach +-50000"),
    ("name", r"class_embed", "contrastive head: dot products, TopK input, pred_logits"),
]
GROW_DEPTH = 3
ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Clip", "Max", "Min", "Neg", "Abs", "Reciprocal", "Sqrt"}
# ops that compute nothing on their float inputs (or only compare them): they take their inputs' precision
FOLLOW_INPUTS = {"Reshape", "Transpose", "Gather", "GatherElements", "GatherND", "Slice", "Concat", "Split",
                 "Squeeze", "Unsqueeze", "Expand", "Identity", "Flatten", "Tile", "Where", "ScatterND",
                 "ScatterElements", "Shape", "Size", "Cast", "Equal", "Less", "LessOrEqual", "Greater",
                 "GreaterOrEqual", "Pad", "Resize", "NonZero", "ArgMax", "ArgMin"}
# (op, input index) that ONNX types as float32 whatever the data's type: never cast
FIXED_FLOAT_INPUTS = {("Resize", 1), ("Resize", 2)}
FP16_MAX = 65504.0


def fp32_reason(op_type: str, name: str) -> Optional[str]:
    """The FP32_LAYERS row that keeps a node (op_type, name) in FP32, as "pattern: why"; None for FP16."""
    for match, pattern, why in FP32_LAYERS:
        if (match == "op" and op_type == pattern) or (match == "name" and re.search(pattern, name)):
            return f"{pattern}: {why}"
    return None


def fp32_nodes(graph) -> Set[int]:
    """Indices of the graph's nodes that stay FP32: the table's, then the elementwise nodes feeding them."""
    producer = {out: i for i, node in enumerate(graph.node) for out in node.output}
    keep = {i for i, node in enumerate(graph.node) if fp32_reason(node.op_type, node.name)}
    frontier = set(keep)
    for _ in range(GROW_DEPTH):
        feeding = {producer[name] for i in frontier for name in graph.node[i].input if name in producer}
        frontier = {j for j in feeding if graph.node[j].op_type in ELEMENTWISE} - keep
        keep |= frontier
    return keep


def _float_types(model) -> Dict[str, int]:
    """tensor name -> ONNX elem type, from shape inference over the whole graph."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in list(g.input) + list(g.output) + list(g.value_info)}
    types.update({t.name: t.data_type for t in g.initializer})
    return types


def convert_to_fp16(model):
    """A copy of the float32 onnx.ModelProto `model` computing in FP16 except the fp32_nodes(), with Cast nodes
    where the two meet; float32 constants are stored in both precisions as needed (values clamped to FP16's
    range). Inputs and outputs keep their float32 types. DataError for a graph with control flow (If, Loop)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    flow = sorted({n.op_type for n in graph.node if n.op_type in ("If", "Loop", "Scan")})
    if flow:
        raise DataError(f"has control flow ({', '.join(flow)}), which the FP16 conversion does not enter; build "
                        f"it with gen_trt_engine.tensorrt.data_type=FP32.")
    _constants_to_initializers(graph)
    types = _float_types(model)
    keep = fp32_nodes(graph)
    F32, F16 = TensorProto.FLOAT, TensorProto.FLOAT16
    consts = {t.name: t for t in graph.initializer}
    const_fp32 = {n for n, t in consts.items() if t.data_type == F32}
    half_const: Dict[str, str] = {}
    precision: Dict[str, int] = {i.name: F32 for i in graph.input if types.get(i.name) == F32}
    casts: Dict[Tuple[str, int], str] = {}
    outputs = {o.name for o in graph.output}
    renamed: Dict[str, str] = {}
    nodes = []

    def as_type(name: str, want: int) -> str:
        name = renamed.get(name, name)
        if name in const_fp32:
            if want == F32:
                return name
            if name not in half_const:
                value = np.clip(numpy_helper.to_array(consts[name]), -FP16_MAX, FP16_MAX).astype(np.float16)
                half_const[name] = f"{name}__fp16"
                graph.initializer.append(numpy_helper.from_array(value, half_const[name]))
            return half_const[name]
        if precision.get(name, F32) == want:
            return name
        if (name, want) not in casts:
            casts[(name, want)] = f"{name}__to_{'fp32' if want == F32 else 'fp16'}"
            nodes.append(helper.make_node("Cast", [name], [casts[(name, want)]], to=want,
                                          name=f"{name}/cast_{'fp32' if want == F32 else 'fp16'}"))
        return casts[(name, want)]

    def is_float32(name: str) -> bool:
        return bool(name) and (renamed.get(name, name) in precision or name in const_fp32 or types.get(name) == F32)

    for index, node in enumerate(graph.node):
        floats = [n for n in node.input if is_float32(n)]
        if index in keep:
            want = F32
        elif node.op_type in FOLLOW_INPUTS and floats:
            live = [precision.get(renamed.get(n, n)) for n in floats if n not in const_fp32]
            want = F32 if F32 in live or not live else F16
        else:
            want = F16
        for slot, name in enumerate(node.input):
            if is_float32(name) and (node.op_type, slot) not in FIXED_FLOAT_INPUTS:
                node.input[slot] = as_type(name, want)
        if want == F16:
            _set_attribute_types(node, F32, F16)
        for slot, out in enumerate(node.output):
            if types.get(out) != F32:
                continue
            precision[out] = want
            if want == F16 and out in outputs:  # the graph's output stays float32: a final cast
                renamed[out] = node.output[slot] = f"{out}__fp16"
                precision[renamed[out]] = F16
        nodes.append(node)
    for out, half in renamed.items():
        nodes.append(helper.make_node("Cast", [half], [out], to=F32, name=f"{out}/cast_fp32"))
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for node in nodes for name in node.input} | outputs
    unused = [t for t in graph.initializer if t.name not in used]  # float32 originals only FP16 nodes read
    for t in unused:
        graph.initializer.remove(t)
    del graph.value_info[:]  # the types changed; TensorRT and onnxruntime infer them again
    return model


def _constants_to_initializers(graph) -> None:
    """Constant nodes holding a float32 tensor become initializers, so FP16 consumers get an FP16 copy rather
    than a cast of a rounded value."""
    from onnx import TensorProto

    kept = []
    for node in graph.node:
        value = next((a.t for a in node.attribute if a.name == "value"), None)
        if node.op_type == "Constant" and value is not None and value.data_type == TensorProto.FLOAT:
            value.name = node.output[0]
            graph.initializer.append(value)
        else:
            kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)


def _set_attribute_types(node, old: int, new: int) -> None:
    """An FP16 node whose attributes name float32 (Cast's `to`, ConstantOfShape's `value`) makes FP16 instead."""
    import numpy as np
    from onnx import numpy_helper

    for a in node.attribute:
        if node.op_type in ("Cast", "CastLike") and a.name == "to" and a.i == old:
            a.i = new
        elif node.op_type == "ConstantOfShape" and a.name == "value" and a.t.data_type == old:
            value = np.clip(numpy_helper.to_array(a.t), -FP16_MAX, FP16_MAX).astype(np.float16)
            a.t.CopyFrom(numpy_helper.from_array(value, a.t.name))


def precision_summary(model) -> Dict[str, int]:
    """{"fp32_nodes", "fp16_nodes", "casts"} of a converted graph: how much runs where (logged by the build)."""
    import onnx

    types = _float_types(model)
    count = {"fp32_nodes": 0, "fp16_nodes": 0, "casts": 0}
    for node in model.graph.node:
        if node.op_type == "Cast" and "/cast_fp" in node.name:
            count["casts"] += 1
            continue
        out = [types.get(o) for o in node.output]
        if onnx.TensorProto.FLOAT16 in out:
            count["fp16_nodes"] += 1
        elif onnx.TensorProto.FLOAT in out:
            count["fp32_nodes"] += 1
    return count
