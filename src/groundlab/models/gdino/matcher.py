"""Hungarian matching of Grounding DINO queries to ground-truth boxes (phrase-grounded, token-level classes).

Inputs (one decoder layer, or the encoder proposals):
    outputs: {"pred_logits": (B, Q, T) float, -inf on padding / invalid tokens (T = max_text_len) and on every
                             token of a padded query,
              "pred_boxes":  (B, Q, 4) normalized cxcywh}
    targets: list of B dicts {"boxes": (N_b, 4) normalized cxcywh,
                              "positive_map": (N_b, T) float 0/1, the tokens of each box's phrase}
Output: list of B pairs (query_idx (K_b,), target_idx (K_b,)) int64 on the CPU, K_b = min(R_b, N_b) with R_b the
real (not padded) queries; target_idx is sorted (scipy's order), query_idx[k] is the query assigned to target
target_idx[k].

Cost of assigning query q to target n (lower is better):
    C = cost_class * class + cost_bbox * L1(cxcywh) + cost_giou * (-GIoU(xyxy))
The class term is the focal-loss-shaped cost of Deformable DETR / DINO, computed per token and averaged over
the target's phrase tokens: with p = sigmoid(logit),
    pos = alpha * (1 - p)^gamma * -log(p + eps),   neg = (1 - alpha) * p^gamma * -log(1 - p + eps)
    class (Q, N) = (pos - neg) @ normalize_rows(positive_map).T
which is what Open-GroundingDino's HungarianMatcher and transformers' GroundingDinoHungarianMatcher compute
(eps = 1e-8 in both). A -inf logit gives p = 0 exactly, so pos is finite (alpha * -log(eps)) and is multiplied by
a zero positive-map weight: invalid tokens never reach the cost.

Padded queries (every logit -inf: an image with fewer feature-map tokens than queries) get a huge finite cost
(_PADDED_QUERY_COST; inf would make scipy fail), so they are assigned only when an image has more targets than
real queries, and those assignments are dropped: a padded query is never matched.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from groundlab.ops.boxes import box_cxcywh_to_xyxy, generalized_box_iou
from groundlab.models.gdino.postprocess import normalize_positive_map
from groundlab.models.gdino.query_selection import real_queries

Indices = List[Tuple[Tensor, Tensor]]

# Inside the logs of the focal cost: keeps -log(p) finite at p = 0 (a -inf logit). Same value as the references,
# so matchings agree with them.
_LOG_EPS = 1e-8
# Cost of a padded query against any target (it replaces the computed cost): far above any real cost (class and
# box costs are O(10)), and finite, since scipy rejects inf entries whenever it needs one of them.
_PADDED_QUERY_COST = 1e6


def focal_token_cost(logits: Tensor, alpha: float, gamma: float) -> Tensor:
    """(..., T) logits -> (..., T) focal matching cost per token, "is positive" minus "is negative" (float32).

    Finite for every non-NaN logit, +-inf included."""
    prob = logits.float().sigmoid()
    pos = alpha * (1 - prob).pow(gamma) * -(prob + _LOG_EPS).log()
    neg = (1 - alpha) * prob.pow(gamma) * -(1 - prob + _LOG_EPS).log()
    return pos - neg


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to targets per image, minimizing the summed cost (module docstring).

    cost_class / cost_bbox / cost_giou weigh the three costs (TAO / Open-GroundingDino: 1, 5, 2);
    focal_alpha / focal_gamma shape the class cost as the focal loss does."""

    def __init__(self, cost_class: float = 1.0, cost_bbox: float = 5.0, cost_giou: float = 2.0,
                 focal_alpha: float = 0.25, focal_gamma: float = 2.0):
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("HungarianMatcher: all matching costs are 0, the matching would be arbitrary")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    @torch.no_grad()
    def cost_matrix(self, outputs: Dict[str, Tensor], targets: Sequence[Dict[str, Tensor]]) -> Tensor:
        """(B, Q, sum_b N_b) float32 cost of every query against every target of the batch, on the CPU.

        Image b's own block is [b, :, offset_b:offset_b + N_b] (offsets = cumulative target counts); the
        cross-image blocks are computed only because one big batched product is faster than B small ones,
        as in DETR. Raises ValueError on NaN / inf costs, naming the likely cause."""
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        B, Q, T = logits.shape
        if len(targets) != B:
            raise ValueError(f"HungarianMatcher: {len(targets)} target dicts for a batch of {B}")
        device = logits.device
        tgt_boxes = torch.cat([t["boxes"] for t in targets]).to(device=device, dtype=torch.float32)
        if tgt_boxes.shape[0] == 0:
            return torch.zeros(B, Q, 0)
        pmaps = torch.cat([_positive_map(t, T) for t in targets]).to(device)

        # Check inputs first: NaN boxes would otherwise fail inside generalized_box_iou as "malformed boxes".
        if torch.isnan(logits).any() or not torch.isfinite(boxes).all():
            raise ValueError("HungarianMatcher: NaN in pred_logits or non-finite pred_boxes; the model has "
                             "likely diverged (check the learning rate, gradient clipping, AMP overflow)")
        if not torch.isfinite(tgt_boxes).all():
            raise ValueError("HungarianMatcher: non-finite target boxes")

        out_boxes = boxes.flatten(0, 1).float()  # (B*Q, 4)
        # (B*Q, T) @ (T, N): the mean token cost over each target's phrase (rows normalized; an all-zero
        # row, a phrase with no tokens, gives class cost 0 and the match is decided by the boxes alone).
        cost_class = focal_token_cost(logits.flatten(0, 1), self.focal_alpha, self.focal_gamma) \
            @ normalize_positive_map(pmaps).T
        cost_bbox = torch.cdist(out_boxes, tgt_boxes, p=1)
        cost_giou = -generalized_box_iou(box_cxcywh_to_xyxy(out_boxes), box_cxcywh_to_xyxy(tgt_boxes))
        C = self.cost_class * cost_class + self.cost_bbox * cost_bbox + self.cost_giou * cost_giou
        if not torch.isfinite(C).all():
            # scipy would fail with an obscure "cost matrix is infeasible" / "contains invalid numeric entries".
            raise ValueError("HungarianMatcher: NaN or inf in the matching cost matrix (check the predicted and "
                             "target boxes and the positive maps)")
        C = C.masked_fill(~real_queries(logits).flatten()[:, None], _PADDED_QUERY_COST)
        return C.view(B, Q, -1).cpu()

    @torch.no_grad()
    def forward(self, outputs: Dict[str, Tensor], targets: Sequence[Dict[str, Tensor]]) -> Indices:
        """Per image (query_idx, target_idx) int64 CPU tensors (module docstring); empty for an image with no
        targets. Padded queries are never in them (an image with more targets than real queries leaves the
        extra targets unmatched)."""
        C = self.cost_matrix(outputs, targets)
        sizes = [int(t["boxes"].shape[0]) for t in targets]
        indices: Indices = []
        for b, block in enumerate(C.split(sizes, dim=-1)):
            if sizes[b] == 0:
                empty = torch.zeros(0, dtype=torch.int64)
                indices.append((empty, empty.clone()))
                continue
            cost = block[b].numpy()
            q_idx, t_idx = linear_sum_assignment(cost)
            keep = cost[q_idx, t_idx] < _PADDED_QUERY_COST  # no real pair costs that much: drop padded queries
            if not keep.all():
                q_idx, t_idx = q_idx[keep], t_idx[keep]
            indices.append((torch.as_tensor(q_idx, dtype=torch.int64), torch.as_tensor(t_idx, dtype=torch.int64)))
        return indices


def _positive_map(target: Dict[str, Tensor], T: int) -> Tensor:
    """The target's (N, T) positive map as float32, checked against the logits' token width."""
    if "positive_map" not in target:
        raise KeyError("target has no 'positive_map' (the batch was collated without prompts)")
    pmap = target["positive_map"]
    if pmap.shape[-1] != T or pmap.shape[0] != target["boxes"].shape[0]:
        raise ValueError(f"positive_map has shape {tuple(pmap.shape)}, expected ({target['boxes'].shape[0]}, {T}) "
                         "(one row per box, max_text_len columns like pred_logits)")
    return pmap.float()
