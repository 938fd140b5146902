"""Language-guided query selection (two-stage): every encoder token proposes a box; proposals are scored
against the text, and the top `num_queries` become the decoder's reference boxes. An input with fewer image
tokens than queries (under ~210 px a side with 900 queries) gets padded queries for the rest, masked all the
way through: decoder self-attention, -inf logits, no matching, no loss, never post-processed."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, List, Optional, Tuple

import torch

# the ranks another implementation chose (fixed_selection), else None: select_topk ranks the scores itself
_fixed_index: Optional[torch.Tensor] = None


@contextmanager
def fixed_selection(index: torch.Tensor) -> Iterator[None]:
    """Within this block select_topk returns `index` (B, n) instead of ranking the scores. Proposals whose scores
    are tied within float noise rank differently in two implementations (PyTorch and an exported graph), and each
    rank has its own learned content query, so their outputs are comparable only under the same selection: the
    export check runs PyTorch with ONNX Runtime's (deploy/onnx_verify.py)."""
    global _fixed_index
    previous, _fixed_index = _fixed_index, index
    try:
        yield
    finally:
        _fixed_index = previous


def encoder_proposals(memory: torch.Tensor, padding_mask: torch.Tensor, spatial_shapes: List[Tuple[int, int]]):
    """One box per encoder token: the cell centre, size 0.05 * 2^level (normalized to the valid area).

    memory: (B, S, C); padding_mask: (B, S) True on padding.
    Returns (memory with padding and invalid proposals zeroed (B, S, C), proposals in logit space (B, S, 4),
    +inf where invalid: padding, or centre/size outside (0.01, 0.99))."""
    B = memory.shape[0]
    proposals, start = [], 0
    for lvl, (h, w) in enumerate(spatial_shapes):
        mask = padding_mask[:, start : start + h * w].view(B, h, w)
        valid_h = (~mask[:, :, 0]).sum(1)
        valid_w = (~mask[:, 0, :]).sum(1)
        grid_y, grid_x = torch.meshgrid(
            torch.linspace(0, h - 1, h, dtype=memory.dtype, device=memory.device),
            torch.linspace(0, w - 1, w, dtype=memory.dtype, device=memory.device),
            indexing="ij",
        )
        grid = torch.cat([grid_x[..., None], grid_y[..., None]], -1)
        scale = torch.cat([valid_w[:, None], valid_h[:, None]], 1).view(B, 1, 1, 2)
        grid = (grid[None].expand(B, -1, -1, -1) + 0.5) / scale
        wh = torch.ones_like(grid) * 0.05 * (2.0 ** lvl)
        proposals.append(torch.cat((grid, wh), -1).view(B, -1, 4))
        start += h * w
    proposals = torch.cat(proposals, 1)
    valid = ((proposals > 0.01) & (proposals < 0.99)).all(-1, keepdim=True)
    proposals = torch.log(proposals / (1 - proposals))
    proposals = proposals.masked_fill(padding_mask[..., None], float("inf")).masked_fill(~valid, float("inf"))
    memory = memory.masked_fill(padding_mask[..., None], 0.0).masked_fill(~valid, 0.0)
    return memory, proposals


def select_topk(scores: torch.Tensor, padding_mask: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The k tokens whose best text-token logit is highest, per image, and which of the k slots are real queries.

    scores: (B, S, L) proposal logits; padding_mask: (B, S) True on image padding. Returns (index (B, k) long,
    real (B, k) bool). Padding tokens score -inf, so they are taken only once an image's N real tokens are all
    taken: when N < k (a small input, or an image much smaller than its batch's padded size) the last k - N
    slots are padded queries, real False (their index points at a padding token, or at token 0 where
    k > S). k stays the number of queries whatever the input size, so shapes are static (ONNX export)."""
    best = scores.max(-1)[0].masked_fill(padding_mask, float("-inf"))
    # S follows from the image size, which an exported graph fixes (only the batch is dynamic): the tracer's
    # warning that it becomes a constant is expected
    n = min(k, int(best.shape[1]))
    if _fixed_index is not None:
        index = _fixed_index.to(best.device)
    elif torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        index = torch.topk(best, n, dim=1)[1]  # ONNX TopK breaks ties by the lower index
    else:  # the same tie-break (torch.topk's is unspecified): exactly tied proposals rank as in an exported graph
        index = torch.sort(best, dim=1, descending=True, stable=True)[1][:, :n]
    real = ~torch.gather(padding_mask, 1, index)
    if n < k:  # fewer tokens than queries
        index = torch.cat([index, index.new_zeros(index.shape[0], k - n)], 1)
        real = torch.cat([real, real.new_zeros(real.shape[0], k - n)], 1)
    return index, real


def real_queries(pred_logits: torch.Tensor) -> torch.Tensor:
    """(B, Q, T) logits -> (B, Q) bool, False on padded queries: the model gives them -inf on every token
    (a real query is finite on every real text token). The matcher, the criterion and the post-processors use
    this, so outputs carry no extra key and an exported model's outputs say the same."""
    return pred_logits.amax(-1) > float("-inf")  # a tenth of the time of isfinite().any(-1)


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x: (B, S, D), index: (B, K) -> (B, K, D)."""
    return torch.gather(x, 1, index[..., None].expand(-1, -1, x.shape[-1]))
