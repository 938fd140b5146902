"""An exported graph checked against PyTorch: both run the same inputs, and the largest |difference| of each output
is reported; over TOLERANCE the export fails. The tolerance scales with an output whose values exceed 1 in
magnitude (TOLERANCE x its largest |value|): mask logits run into the hundreds, where float32 itself carries
differences of ~1e-5 relative.

Where outputs differ, the usual cause is not the graph: ONNX Runtime and PyTorch round differently (~1e-6), and
encoder proposals whose scores are closer than that swap ranks in the top-k query selection. Each rank has its own
learned content query, so a swap pairs other content queries with those boxes and every query shifts through
decoder self-attention: the outputs are then not comparable query by query. The check reads ONNX Runtime's
selection (the TopK indices, exposed as an extra output of a copy of the graph), runs PyTorch again with that
selection (models/gdino/query_selection.fixed_selection) and compares that, saying how many ranks differed and how
close the tied scores were. Exactly tied scores rank the same in both (lower token index first).
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from groundlab.models.gdino.query_selection import fixed_selection

log = logging.getLogger(__name__)

TOLERANCE = 1e-3

# (selection to force or None) -> (PyTorch outputs by name, PyTorch's own selection (B, n) or None, ProposalGaps)
Reference = Callable[[Optional[np.ndarray]], Tuple[Dict[str, np.ndarray], Optional[np.ndarray], "ProposalGaps"]]


class ExportMismatch(RuntimeError):
    """The exported graph's outputs disagree with PyTorch beyond what rank swaps explain."""


@dataclass
class ProposalGaps:
    """From PyTorch's encoder proposals' best scores: the smallest gap between neighbours within the top k, and
    between the k-th and the (k+1)-th (inf when there is none)."""

    within: float
    boundary: float


@dataclass
class Agreement:
    """max |ONNX - PyTorch| per output over what was compared; `compared` says what that was, `note` why."""

    max_abs_diff: Dict[str, float]
    scales: Dict[str, float]  # each output's largest |value| (at least 1): its tolerance is TOLERANCE x this
    compared: str = "same inputs"
    note: str = ""

    def lines(self) -> List[str]:
        out = [f"max |onnxruntime - pytorch| {name}: {diff:.2e} ({self.compared}"
               + (f"; values up to {self.scales[name]:.1e})" if self.scales[name] > 1 else ")")
               for name, diff in self.max_abs_diff.items()]
        return out + ([self.note] if self.note else [])


def proposal_gaps(scores: torch.Tensor, k: int) -> ProposalGaps:
    """scores: (B, S, L) proposal logits (enc_out_class_embed's output), k = num_queries."""
    best = scores.float().amax(-1)
    best = torch.where(torch.isfinite(best), best, torch.full_like(best, -1e30))
    top = torch.sort(best, dim=1, descending=True).values
    n = min(k, top.shape[1])
    within = float((top[:, : n - 1] - top[:, 1:n]).min()) if n > 1 else float("inf")
    boundary = float((top[:, n - 1] - top[:, n]).min()) if top.shape[1] > n else float("inf")
    return ProposalGaps(within, boundary)


def max_abs_diffs(reference: Dict[str, np.ndarray], got: Dict[str, np.ndarray]) -> Dict[str, float]:
    """max |a - b| per output over finite entries; inf where the -inf pattern (padding tokens, padded queries) or
    the shape differs."""
    out = {}
    for name, a in reference.items():
        b = got[name]
        fa, fb = np.isfinite(a), np.isfinite(b)
        if a.shape != b.shape or not np.array_equal(fa, fb):
            out[name] = float("inf")
        else:
            out[name] = float(np.abs(a[fa] - b[fa]).max()) if fa.any() else 0.0
    return out


def scales_of(reference: Dict[str, np.ndarray]) -> Dict[str, float]:
    """max(1, largest finite |value|) per output."""
    return {n: max(1.0, float(np.abs(a[np.isfinite(a)]).max()) if np.isfinite(a).any() else 1.0)
            for n, a in reference.items()}


def agreement(reference: Reference, got: Dict[str, np.ndarray], onnx_selection: Optional[np.ndarray],
              tolerance: float = TOLERANCE) -> Agreement:
    """Compare ONNX Runtime's outputs `got` with PyTorch's (`reference`), under ONNX Runtime's query selection
    (B, n) when PyTorch's own differs. ExportMismatch (one sentence) when they disagree beyond tolerance."""
    ref, selection, gaps = reference(None)
    scales = scales_of(ref)

    def close(diffs: Dict[str, float]) -> bool:
        return all(d <= tolerance * scales[n] for n, d in diffs.items())

    direct = max_abs_diffs(ref, got)
    if close(direct):
        return Agreement(direct, scales)
    gap = f"smallest gap between proposal scores within the top k {gaps.within:.1e}, at the k-th {gaps.boundary:.1e}"
    if onnx_selection is None or selection is None or np.array_equal(onnx_selection, selection):
        raise ExportMismatch(f"the exported graph disagrees with PyTorch under the same query selection: "
                             f"{_show(direct)} (tolerance {tolerance}{_scaled(scales)}; {gap}).")
    moved = int((onnx_selection != selection).sum())
    same_set = all(set(a) == set(b) for a, b in zip(onnx_selection.tolist(), selection.tolist()))
    forced = max_abs_diffs(reference(onnx_selection)[0], got)
    why = (f"{moved} of {selection.size} ranks of the top-k query selection differ "
           f"({'the same proposals in another order' if same_set else 'other proposals at the k-th place'}: "
           f"near-tied scores, {gap}), which pairs other content queries with those boxes; directly "
           f"{_show(direct)}")
    if close(forced):
        return Agreement(forced, scales, "PyTorch given ONNX Runtime's query selection", why)
    raise ExportMismatch(f"the exported graph disagrees with PyTorch even under ONNX Runtime's query selection: "
                         f"{_show(forced)} (tolerance {tolerance}{_scaled(scales)}); {why}.")


def _show(diffs: Dict[str, float]) -> str:
    return ", ".join(f"{n} {d:.2e}" for n, d in diffs.items())


def _scaled(scales: Dict[str, float]) -> str:
    big = [f"{n} {s:.1e}" for n, s in scales.items() if s > 1]
    return f" times the largest |value|: {', '.join(big)}" if big else ""


def selection_session(path: str):
    """An onnxruntime (CPU) session of the graph at `path` whose outputs also hold the query selection's TopK
    indices (the last output; None when the graph has no TopK, e.g. a text graph)."""
    import onnx
    import onnxruntime

    proto = onnx.load(path)
    topk = [n for n in proto.graph.node if n.op_type == "TopK"]
    name = topk[0].output[1] if len(topk) == 1 else None
    if name is not None:
        proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # onnxruntime's own warnings are not the user's concern here
    session = onnxruntime.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session, name


def torch_reference(module: torch.nn.Module, model, args: Sequence[torch.Tensor], names: Sequence[str]) -> Reference:
    """The Reference of a graph's PyTorch module (FullGraph, TextGraph, ImageGraph of `model`) on `args`."""

    def reference(selection: Optional[np.ndarray]):
        scores: List[torch.Tensor] = []
        hook = model.transformer.enc_out_class_embed.register_forward_hook(lambda m, i, o: scores.append(o))
        try:
            with torch.no_grad(), (fixed_selection(torch.from_numpy(selection)) if selection is not None
                                   else nullcontext()):
                out = module.eval()(*args)
        finally:
            hook.remove()
        out = dict(zip(names, (o.numpy() for o in (out if isinstance(out, tuple) else (out,)))))
        if not scores:  # no query selection in this graph (the text graph)
            return out, None, ProposalGaps(float("inf"), float("inf"))
        k = model.transformer.num_queries
        best = scores[0].amax(-1)  # select_topk's ranking (an exported graph's inputs have no padding)
        own = torch.sort(best, dim=1, descending=True, stable=True)[1][:, : min(k, best.shape[1])].numpy()
        return out, own, proposal_gaps(scores[0], k)

    return reference


def check_graph(graph, model, dynamic_batch: bool) -> Agreement:
    """Run `graph` (an onnx_export.ExportedGraph) in ONNX Runtime and its PyTorch module on the example it was
    traced with (its first image only for a dynamic batch, which also proves the batch is dynamic) and compare;
    `model` is the exported GroundingDINO."""
    example = {k: v[:1] for k, v in graph.example.items()} if dynamic_batch else graph.example
    args = [example[n] for n in graph.input_names]
    names: Sequence[str] = list(graph.output_names)
    session, selection_name = selection_session(graph.path)
    outs = session.run(names + ([selection_name] if selection_name else []),
                       {n: a.numpy() for n, a in zip(graph.input_names, args)})
    onnx_selection = outs[-1] if selection_name else None
    return agreement(torch_reference(graph.module, model, args, names), dict(zip(names, outs)), onnx_selection)
