"""The ONNX contract an engine is built from, read off the file: six inputs with TAO/DeepStream names, a fixed
image size and text length, a dynamic or fixed batch; outputs `pred_logits`, `pred_boxes` (+ `pred_masks`).

    inputs           (B, 3, H, W)  float32 (normalized image)
    input_ids        (B, L)        int64
    attention_mask   (B, L)        bool (int64 accepted)
    position_ids     (B, L)        int64
    token_type_ids   (B, L)        int64
    text_token_mask  (B, L, L)     bool (the sub-sentence self-attention mask)
 -> pred_logits (B, Q, L'), pred_boxes (B, Q, 4) cxcywh in [0, 1], pred_masks (B, Q, H/4, W/4) mask logits

H, W and L must be numbers in the file (an engine is built for one size); B may be symbolic, and then one
optimization profile covers every input from min_batch_size to max_batch_size. A bad file fails with one
sentence naming the file and what was expected.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from groundlab.config import ConfigError
from groundlab.errors import DataError

# name -> (rank, what the dims are) in the order TAO's export declares them
INPUTS: Dict[str, Tuple[int, str]] = {
    "inputs": (4, "(B, 3, H, W)"),
    "input_ids": (2, "(B, L)"),
    "attention_mask": (2, "(B, L)"),
    "position_ids": (2, "(B, L)"),
    "token_type_ids": (2, "(B, L)"),
    "text_token_mask": (3, "(B, L, L)"),
}
OUTPUTS = ("pred_logits", "pred_boxes")
MASK_OUTPUT = "pred_masks"

Shape = Tuple[int, ...]


@dataclass(frozen=True)
class OnnxContract:
    """What an ONNX file says about itself. batch: None when dynamic (symbolic), else the fixed batch."""

    path: str
    batch: Optional[int]
    height: int
    width: int
    text_len: int
    has_masks: bool

    def shapes(self, batch: int) -> Dict[str, Shape]:
        """Every input's shape at `batch`."""
        L = self.text_len
        return {"inputs": (batch, 3, self.height, self.width), "input_ids": (batch, L), "attention_mask": (batch, L),
                "position_ids": (batch, L), "token_type_ids": (batch, L), "text_token_mask": (batch, L, L)}


def _dims(value_info) -> List:
    """An input's dims: ints where the file has a number, the symbol (or None) where it does not."""
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
            for d in value_info.type.tensor_type.shape.dim]


def read_contract(model, path: str) -> OnnxContract:
    """model: an onnx.ModelProto read from `path` (named in errors). DataError when an input is missing, has
    the wrong rank or a symbolic H, W or L, or when pred_logits / pred_boxes are not outputs."""
    initializers = {t.name for t in model.graph.initializer}
    given = {i.name: i for i in model.graph.input if i.name not in initializers}
    missing = [n for n in INPUTS if n not in given]
    if missing:
        raise DataError(f"lacks the input(s) {', '.join(missing)}; an engine is built from action=export's ONNX, whose "
                        f"inputs are {', '.join(INPUTS)} (gen_trt_engine.onnx_file).", path)
    dims = {n: _dims(given[n]) for n in INPUTS}
    for name, (rank, doc) in INPUTS.items():
        if len(dims[name]) != rank:
            raise DataError(f"input {name} has shape {dims[name]}, expected {rank} dimensions {doc}.", path)
    _, channels, height, width = dims["inputs"]
    if not all(isinstance(v, int) for v in (channels, height, width)) or channels != 3:
        raise DataError(f"input inputs has shape {dims['inputs']}; an engine needs a fixed (B, 3, H, W): export with "
                        f"fixed export.input_height / export.input_width.", path)
    lengths = {dims[n][1] for n in INPUTS if n != "inputs"} | {dims["text_token_mask"][2]}
    if len(lengths) != 1 or not isinstance(next(iter(lengths)), int):
        raise DataError(f"the text inputs have lengths {sorted(map(str, lengths))}; expected one fixed length L "
                        f"(the model's max_text_len) for input_ids, attention_mask, position_ids, token_type_ids and "
                        f"text_token_mask (B, L, L); export with export.dynamic_text_len=false.", path)
    outputs = [o.name for o in model.graph.output]
    absent = [n for n in OUTPUTS if n not in outputs]
    if absent:
        raise DataError(f"lacks the output(s) {', '.join(absent)}; expected {', '.join(OUTPUTS)} "
                        f"(+ {MASK_OUTPUT} for mask_gdino), action=export's names.", path)
    batches = {dims[n][0] for n in INPUTS}
    fixed = [b for b in batches if isinstance(b, int) and b > 0]
    if len(fixed) > 1 or (fixed and len(batches) > 1):
        raise DataError(f"the inputs have different batch dimensions {sorted(map(str, batches))}; expected one.", path)
    return OnnxContract(path, fixed[0] if fixed else None, height, width, next(iter(lengths)), MASK_OUTPUT in outputs)


def profile_shapes(contract: OnnxContract, min_batch: int, opt_batch: int, max_batch: int
                   ) -> Dict[str, Tuple[Shape, Shape, Shape]]:
    """input name -> (min, opt, max) shape of the one optimization profile: the batch ranges, H, W and L are the
    file's. A file with a fixed batch takes exactly that batch (ConfigError when the range asks otherwise)."""
    if contract.batch is not None and (min_batch, opt_batch, max_batch) != (contract.batch,) * 3:
        raise ConfigError(
            f"{contract.path} has a fixed batch of {contract.batch}: gen_trt_engine.tensorrt.min_batch_size, "
            f"opt_batch_size and max_batch_size ({min_batch}, {opt_batch}, {max_batch}) must all be {contract.batch} "
            f"(or export with a dynamic batch).")
    lo, opt, hi = contract.shapes(min_batch), contract.shapes(opt_batch), contract.shapes(max_batch)
    return {name: (lo[name], opt[name], hi[name]) for name in INPUTS}


def quantization(model) -> Optional[str]:
    """"INT8" or "FP8" when the graph has QuantizeLinear nodes (action=quantize's Q/DQ graph), read off their
    zero points (or opset 21's output_dtype); "UINT8" when any is uint8 (ONNX Runtime's CPU format, which TensorRT
    rejects: it takes symmetric int8 only); None for a float graph."""
    from onnx import TensorProto

    kinds = {TensorProto.INT8: "INT8", TensorProto.UINT8: "UINT8", TensorProto.FLOAT8E4M3FN: "FP8",
             TensorProto.FLOAT8E5M2: "FP8"}
    constants = {t.name: t.data_type for t in model.graph.initializer}
    constants.update({n.output[0]: a.t.data_type for n in model.graph.node if n.op_type == "Constant"
                      for a in n.attribute if a.name == "value"})
    found = set()
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear":
            continue
        dtype = next((a.i for a in node.attribute if a.name == "output_dtype"), 0)
        if not dtype and len(node.input) > 2 and node.input[2]:
            dtype = constants.get(node.input[2], 0)
        found.add(kinds.get(dtype or TensorProto.UINT8, "INT8"))  # no zero point: uint8, ONNX's default
    if "UINT8" in found:  # asymmetric uint8 anywhere: TensorRT cannot build the graph at all
        return "UINT8"
    if len(found) > 1:
        return "FP8" if "FP8" in found else "INT8"  # mixed Q/DQ graphs: FP8 needs the FP8-capable GPU
    return found.pop() if found else None
