"""ONNX export of Grounding DINO and Mask Grounding DINO with TAO's input and output names (predict/graph_contract.py
has the contract: names, shapes, dtypes, the split text / image graphs; predict/deploy_meta.py the GraphInfo stored
with them).

The graphs are traced (torch.onnx's TorchScript exporter) from thin wrappers around the model, so the model itself
is never patched: deformable attention takes its grid_sample path under tracing (models/common/ms_deform_attn.py;
TensorRT has GridSample, no custom op is needed) or, with deform_attn_impl="gather_matmul", the same sampling as
Gather + MatMul (faster in ONNX Runtime on the CPU; plain ONNX ops too), and constant folding leaves TopK with a
fixed K. The images have no padding input: the graph runs exactly H x W inputs, as TAO's deploy does. Mask
Grounding DINO's `pred_masks` holds every query's stride-4 mask logits (TAO's contract), computed in the wrapper by
the same parameter-free `query_masks` that training and the PyTorch predictor use.

With `dynamic_text` (export.dynamic_text_len) the token axes are symbolic (graph_contract.TEXT_AXES): the graph is
traced at the example prompt's own length, shorter than max_text_len, so that ContrastiveEmbed's -inf padding up to
max_text_len is in the graph and `pred_logits` keeps its fixed width.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from groundlab.config import ConfigError
from groundlab.models.common.ms_deform_attn import traced_impl
from groundlab.models.gdino.model import GroundingDINO
from groundlab.models.mask_gdino.dynamic_mask import query_masks
from groundlab.models.mask_gdino.model import MaskGroundingDINO
from groundlab.predict.deploy_meta import GraphInfo, set_onnx_info
from groundlab.predict.graph_contract import (
    IMAGE_GRAPH_INPUTS, INPUTS, MASK_OUTPUT, OUTPUTS, REGION_OUTPUTS, TEXT_AXES, TEXT_AXIS, TEXT_GRAPH_INPUTS,
    TEXT_GRAPH_OUTPUTS, split_graph_paths,
)

log = logging.getLogger(__name__)


def every_query_mask(out: Dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, Q, H/4, W/4) stride-4 mask logits of every (image, query) pair of MaskGroundingDINO's outputs; B and Q
    stay symbolic in a traced graph."""
    params = out["mask_params"]
    B, Q = params.shape[:2]
    images = torch.arange(B, device=params.device)[:, None].expand(B, Q).reshape(-1)
    queries = torch.arange(Q, device=params.device)[None, :].expand(B, Q).reshape(-1)
    masks = query_masks(out, images, queries)
    return masks.view(B, Q, masks.shape[-2], masks.shape[-1])


def _outputs(model: GroundingDINO, out: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, ...]:
    result = (out["pred_logits"], out["pred_boxes"])
    if isinstance(model, MaskGroundingDINO):
        result += (every_query_mask(out),)
        if model.region_head is not None:
            result += tuple(out[name] for name in REGION_OUTPUTS)
    return result


class FullGraph(nn.Module):
    """TAO's graph: images and tokens -> pred_logits, pred_boxes (, pred_masks)."""

    def __init__(self, model: GroundingDINO):
        super().__init__()
        self.model = model

    def forward(self, inputs, input_ids, attention_mask, position_ids, token_type_ids, text_token_mask):
        out = self.model(inputs, input_ids, attention_mask, token_type_ids, position_ids, text_token_mask)
        return _outputs(self.model, out)


class TextGraph(nn.Module):
    """Tokens -> text_features (B, L, hidden_dim): BERT with the sub-sentence mask, projected (encode_text). BERT
    attends by the sub-sentence mask alone, so attention_mask is no input here (the image graph takes it)."""

    def __init__(self, model: GroundingDINO):
        super().__init__()
        self.model = model

    def forward(self, input_ids, position_ids, token_type_ids, text_token_mask):
        unused = torch.ones_like(input_ids, dtype=torch.bool)  # becomes encode_text's text_token_mask, not returned
        return self.model.encode_text(input_ids, unused, token_type_ids, position_ids, text_token_mask)["text"]


class ImageGraph(nn.Module):
    """Images and text_features (with the token masks they came with) -> the full graph's outputs."""

    def __init__(self, model: GroundingDINO):
        super().__init__()
        self.model = model

    def forward(self, inputs, text_features, attention_mask, position_ids, text_token_mask):
        text = {"text": text_features, "text_token_mask": attention_mask, "text_self_attention_mask": text_token_mask,
                "position_ids": position_ids}
        return _outputs(self.model, self.model.forward_with_text(inputs, text))


@dataclass
class ExportedGraph:
    """One written graph: its kind ("full" | "text" | "image"), path, names and the example inputs it was traced
    with (the export action checks onnxruntime against PyTorch on them)."""

    kind: str
    path: str
    module: nn.Module
    input_names: Sequence[str]
    output_names: Sequence[str]
    example: Dict[str, torch.Tensor]


def output_names(model: GroundingDINO) -> List[str]:
    names = list(OUTPUTS)
    if isinstance(model, MaskGroundingDINO):
        names += [MASK_OUTPUT] + (list(REGION_OUTPUTS) if model.region_head is not None else [])
    return names


def check_simplifier(simplify: bool) -> None:
    """ConfigError, before any work, when export.simplify asks for onnxslim and it is not installed."""
    if simplify:
        try:
            import onnxslim  # noqa: F401
        except ImportError:
            raise ConfigError("export.simplify=true needs onnxslim, which is not installed (pip install onnxslim, "
                              "or set export.simplify=false).") from None


def _dynamic_axes(names: Sequence[str], dynamic_batch: bool, dynamic_text: bool) -> Dict[str, Dict[int, str]]:
    """torch.onnx.export's dynamic_axes: dim 0 of every tensor for a dynamic batch, the token axes of the text
    tensors (graph_contract.TEXT_AXES) for a dynamic text length."""
    axes: Dict[str, Dict[int, str]] = {}
    for name in names:
        dims = {0: "batch_size"} if dynamic_batch else {}
        if dynamic_text:
            dims.update({i: TEXT_AXIS for i in TEXT_AXES.get(name, ())})
        if dims:
            axes[name] = dims
    return axes


def _fix_output_dims(proto, shapes: Dict[str, Tuple[int, ...]], dynamic: Dict[str, Dict[int, str]]) -> None:
    """Give every output dim but the dynamic ones (batch, text axis) its size: the tracer leaves sizes it computed
    symbolic (e.g. pred_masks' queries and H/4, W/4), which TensorRT and DeepStream would have to resolve at build
    time."""
    for output in proto.graph.output:
        dims = output.type.tensor_type.shape.dim
        for i, size in enumerate(shapes[output.name]):
            if i in dynamic.get(output.name, {}):
                continue
            dims[i].Clear()
            dims[i].dim_value = int(size)


def _write(graph: ExportedGraph, dynamic_batch: bool, opset: int, verbose: bool, info: GraphInfo,
           simplify: bool, dynamic_text: bool = False) -> None:
    import onnx

    names = list(graph.input_names) + list(graph.output_names)
    args = tuple(graph.example[n] for n in graph.input_names)
    with torch.no_grad():
        outputs = graph.module.eval()(*args)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    shapes = {n: tuple(o.shape) for n, o in zip(graph.output_names, outputs)}
    os.makedirs(os.path.dirname(os.path.abspath(graph.path)), exist_ok=True)
    dynamic = _dynamic_axes(names, dynamic_batch, dynamic_text)
    # eval() on the wrapper: the exporter restores the wrapper's mode, recursively, when it is done. The tracer
    # warns at every size it turns into a constant: the graph fixes H, W and L by contract, so those are expected
    # and not the user's concern (the ONNX Runtime check below proves the graph)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(graph.module.eval(), args, graph.path, input_names=list(graph.input_names),
                          output_names=list(graph.output_names), opset_version=opset, do_constant_folding=True,
                          dynamic_axes=dynamic or None, verbose=verbose, dynamo=False)
    proto = onnx.load(graph.path)
    if simplify:
        import onnxslim

        proto = onnxslim.slim(proto)  # fewer nodes, same arithmetic (its documented in-script use)
    _fix_output_dims(proto, shapes, dynamic)
    set_onnx_info(proto, info)
    onnx.checker.check_model(proto, full_check=True)  # the ONNX checker, shape inference included
    onnx.save(proto, graph.path)


def trace_text_length(example: Dict[str, torch.Tensor], max_text_len: int) -> Dict[str, torch.Tensor]:
    """The example's text cut to its prompt's tokens (the longest row's), and below max_text_len, for tracing a
    graph with a symbolic text length (module doc)."""
    L = max(1, min(int(example["attention_mask"].sum(1).max()), max_text_len - 1))
    out = {}
    for name, value in example.items():
        for axis in TEXT_AXES.get(name, ()):
            value = value.narrow(axis, 0, L)
        out[name] = value.contiguous()
    return out


def export_gdino(model: GroundingDINO, info: GraphInfo, onnx_file: str, example: Dict[str, torch.Tensor],
                 dynamic_batch: bool = True, opset: int = 17, split_text_encoder: bool = False,
                 simplify: bool = False, verbose: bool = False, dynamic_text: bool = False,
                 deform_attn_impl: str = "grid_sample") -> List[ExportedGraph]:
    """Write the full graph to `onnx_file` and, with split_text_encoder, also `<stem>.text.onnx` and
    `<stem>.image.onnx`; each is checked by the ONNX checker and carries `info` (its kind and, for the image
    graph, its text graph's name). example: the full graph's six inputs by name (the trace's shapes: H, W and,
    for a fixed batch, B are fixed by them; L too unless dynamic_text, which traces at the prompt's length);
    deform_attn_impl: the deformable attention's formulation in the graph (ms_deform_attn.TRACED_IMPLS). Returns
    the graphs written, full first (each with the example it was traced with)."""
    check_simplifier(simplify)
    model = model.eval()
    if dynamic_text:
        example = trace_text_length(example, int(model.max_text_len))
    if dynamic_batch and example["inputs"].shape[0] == 1:
        # traced at batch 1, torch's MultiheadAttention folds the batch into constant shapes (the graph then
        # fails at batch 2): a dynamic-batch graph is traced at batch 2
        example = {k: torch.cat([v, v]) for k, v in example.items()}
    names = output_names(model)
    graphs = [ExportedGraph("full", onnx_file, FullGraph(model), INPUTS, names, example)]
    if split_text_encoder:
        text_path, image_path = split_graph_paths(onnx_file)
        with torch.no_grad():
            features = TextGraph(model)(*(example[n] for n in TEXT_GRAPH_INPUTS))
        graphs.append(ExportedGraph("text", text_path, TextGraph(model), TEXT_GRAPH_INPUTS, TEXT_GRAPH_OUTPUTS,
                                    {n: example[n] for n in TEXT_GRAPH_INPUTS}))
        graphs.append(ExportedGraph("image", image_path, ImageGraph(model), IMAGE_GRAPH_INPUTS, names,
                                    {**{n: example[n] for n in IMAGE_GRAPH_INPUTS if n in example},
                                     "text_features": features}))
    text_name = os.path.basename(graphs[1].path) if split_text_encoder else None
    for graph in graphs:
        kind_info = dataclasses.replace(info, kind=graph.kind, text_graph=text_name if graph.kind == "image" else None)
        log.info("exporting the %s graph to %s", graph.kind, graph.path)
        with traced_impl(deform_attn_impl):
            _write(graph, dynamic_batch, opset, verbose, kind_info, simplify, dynamic_text)
    return graphs


def graph_info(model: GroundingDINO, model_config: Dict, class_names: Optional[List[str]],
               input_size: Tuple[int, int], batch_size: Optional[int]) -> GraphInfo:
    """The facts a predictor reads back from an exported graph (kind "full"; export_gdino sets each graph's)."""
    return GraphInfo(model=model_config.get("name") or ("mask_gdino" if isinstance(model, MaskGroundingDINO)
                                                        else "gdino"),
                     max_text_len=int(model.max_text_len), num_select=int(model_config["num_select"]),
                     text_encoder_type=str(model_config["text_encoder_type"]),
                     has_masks=isinstance(model, MaskGroundingDINO),
                     class_names=list(class_names) if class_names else None,
                     input_size=(int(input_size[0]), int(input_size[1])), batch_size=batch_size,
                     model_config=model_config)
