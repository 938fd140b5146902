"""Grounding DINO training losses: per-layer Hungarian matching, token-level focal loss, L1 and GIoU box losses.

Model outputs used (GroundingDINO.forward):
    {"pred_logits": (B, Q, T) -inf on invalid tokens and on every token of a padded query (fewer image tokens
                    than queries: no matching and no loss for it), "pred_boxes": (B, Q, 4) normalized cxcywh,
     "aux_outputs": [{"pred_logits", "pred_boxes"}] earlier decoder layers (optional),
     "interm_outputs": {"pred_logits", "pred_boxes"} selected encoder proposals (optional),
     "text_token_mask": (B, L) bool, True on real tokens, L <= T (tokens >= L are invalid)}
Targets: list of B dicts {"boxes": (N_b, 4) normalized cxcywh, "positive_map": (N_b, T) float 0/1}.

Loss dict keys: "loss_ce", "loss_bbox", "loss_giou" (final layer), the same with "_{i}" for aux_outputs[i], and
with "_interm" for the encoder proposals. Every layer is matched on its own, as in DINO / Open-GroundingDino.

Normalization (all three losses): sum over matched boxes (or over all (query, valid token) pairs for loss_ce)
divided by num_boxes = the batch's target boxes, averaged over ranks, clamped >= 1. Checked in the references:
  - IDEA DINO (models/dino/utils.py sigmoid_focal_loss): loss.mean(1).sum() / num_boxes, multiplied by Q by the
    caller (dino.py loss_labels) -> sum over queries and classes / num_boxes;
  - transformers (loss/loss_grounding_dino.py sigmoid_focal_loss): loss.sum() / num_boxes over the text_mask-selected
    logits, num_boxes reduced across processes;
  - Open-GroundingDino (groundingdino.py token_sigmoid_binary_focal_loss): loss.sum() over masked_select'ed valid
    tokens / max(number of matched queries on this rank, 1) -- the same count on one GPU whenever Q >= N_b, but not
    all-reduced; we use the all-reduced num_boxes so every layer and rank shares one normalizer;
  - MM-Grounding-DINO (mmdet GroundingDINOHead.loss_by_feat_single): focal loss over text-masked tokens with
    avg_factor = number of positive queries (synced across GPUs).
So not DETR's per-token mean: a sum over tokens, which keeps loss_ce independent of the text length.
"""

from __future__ import annotations

import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from groundlab.ops.boxes import box_cxcywh_to_xyxy, generalized_box_iou
from groundlab.models.gdino.matcher import HungarianMatcher, Indices
from groundlab.models.gdino.query_selection import real_queries

LOSS_KEYS = {"labels": ("loss_ce",), "boxes": ("loss_bbox", "loss_giou")}
INTERM_SUFFIX = "_interm"
_SUFFIX = re.compile(r"^(?P<base>.+?)(?P<suffix>_\d+|_interm)$")


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Element-wise focal loss (RetinaNet) of logits against 0/1 targets, same shape, no reduction.

    Built on binary_cross_entropy_with_logits (log-sum-exp form), so large |logits| never overflow; logits must be
    finite (mask -inf ones out before calling). alpha < 0 disables the class-balance weight."""
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t).pow(gamma)
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss


def base_loss_name(key: str) -> Tuple[str, str]:
    """Split a loss key into base name and layer suffix: "loss_ce_3" -> ("loss_ce", "_3"),
    "loss_bbox_interm" -> ("loss_bbox", "_interm"), "loss_ce" -> ("loss_ce", "")."""
    m = _SUFFIX.match(key)
    return (m.group("base"), m.group("suffix")) if m else (key, "")


def weighted_total(loss_dict: Mapping[str, Tensor], weight_dict: Mapping[str, float],
                   interm_loss_coef: float = 1.0) -> Tensor:
    """sum(loss * weight) over the keys of loss_dict that have a weight.

    A key's weight is weight_dict[key] when present (explicit per-layer weights, Open-GroundingDino style), else
    weight_dict[base name] (suffix "_{i}" / "_interm" stripped), times interm_loss_coef for "_interm" keys.
    Keys with no weight (logging-only values) are skipped. Raises ValueError when no key has a weight."""
    total: Optional[Tensor] = None
    for key, value in loss_dict.items():
        if key in weight_dict:
            weight = weight_dict[key]
        else:
            base, suffix = base_loss_name(key)
            if base not in weight_dict:
                continue
            weight = weight_dict[base] * (interm_loss_coef if suffix == INTERM_SUFFIX else 1.0)
        total = value * weight if total is None else total + value * weight
    if total is None:
        raise ValueError(f"weighted_total: none of {sorted(loss_dict)} has a weight in {sorted(weight_dict)}")
    return total


def average_num_boxes(targets: Sequence[Dict[str, Tensor]], device: torch.device) -> float:
    """Target boxes in the batch, averaged over ranks when torch.distributed is initialized and gradients are
    computed, clamped >= 1.

    Every rank then divides by the same number, so the summed gradients equal those of one big batch. Without
    gradients (validation's loss) no collective: validation ranks may run different numbers of batches (each
    sample validated once), and a collective there would wait forever for a rank that has finished."""
    num = torch.tensor([float(sum(int(t["boxes"].shape[0]) for t in targets))], device=device)
    if torch.is_grad_enabled() and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(num)
        num = num / torch.distributed.get_world_size()
    return max(float(num.item()), 1.0)


class SetCriterion(nn.Module):
    """Grounding DINO set losses (module docstring for inputs, keys and normalization).

    matcher: HungarianMatcher; weight_dict: {"loss_ce": w, "loss_bbox": w, "loss_giou": w} used by weighted_total;
    losses: subset of ("labels", "boxes"); aux_loss: include aux_outputs; interm_loss_coef: extra factor on the
    "_interm" weights (Open-GroundingDino's interm_loss_coef)."""

    loss_keys = LOSS_KEYS  # loss_types name -> the loss dict keys it produces (subclasses add their own)

    def __init__(self, matcher: HungarianMatcher, weight_dict: Mapping[str, float], focal_alpha: float = 0.25,
                 focal_gamma: float = 2.0, losses: Sequence[str] = ("labels", "boxes"), aux_loss: bool = True,
                 interm_loss_coef: float = 1.0):
        super().__init__()
        unknown = [name for name in losses if name not in self.loss_keys]
        if unknown:
            raise ValueError(f"{type(self).__name__}: unknown losses {unknown}; known: {sorted(self.loss_keys)}")
        self.matcher = matcher
        self.weight_dict = dict(weight_dict)
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.losses = tuple(losses)
        self.aux_loss = aux_loss
        self.interm_loss_coef = interm_loss_coef

    def forward(self, outputs: Dict[str, Any], targets: Sequence[Dict[str, Tensor]],
                return_indices: bool = False) -> Union[Dict[str, Tensor], Tuple[Dict[str, Tensor], Indices]]:
        """Loss dict (module docstring); with return_indices, also the final layer's matching (the matcher's
        per-image (query_idx, target_idx) CPU tensors)."""
        logits = outputs["pred_logits"]
        token_mask = self._token_mask(outputs, logits)
        num_boxes = average_num_boxes(targets, logits.device)

        layers: List[Tuple[str, Dict[str, Tensor]]] = [("", outputs)]
        if self.aux_loss:
            layers += [(f"_{i}", aux) for i, aux in enumerate(outputs.get("aux_outputs") or [])]
        if outputs.get("interm_outputs") is not None:
            layers.append((INTERM_SUFFIX, outputs["interm_outputs"]))

        losses: Dict[str, Tensor] = {}
        final_indices: Indices = []
        for suffix, layer in layers:
            indices = self.matcher(layer, targets)
            if suffix == "":
                final_indices = indices
            for name, value in self.layer_losses(layer, targets, indices, token_mask, num_boxes).items():
                losses[name + suffix] = value
        if outputs.get("dn_outputs") is not None:
            losses.update(self.denoising_losses(outputs["dn_outputs"], targets, token_mask, num_boxes))
        return (losses, final_indices) if return_indices else losses

    def denoising_losses(self, dn: Dict[str, Any], targets, token_mask: Tensor, num_boxes: float) -> Dict[str, Tensor]:
        """Losses of the denoising queries ("_dn", "_dn_{i}" for earlier layers): no matching, each positive
        query answers for the box it was made from; negatives only learn "no phrase". Normalized per group."""
        meta = dn["meta"]
        indices = [(q, j) for q, j in meta["indices"]]
        norm = num_boxes * meta["num_groups"]
        out: Dict[str, Tensor] = {}
        layers = [("_dn", dn)] + ([(f"_dn_{i}", a) for i, a in enumerate(dn.get("aux_outputs") or [])]
                                  if self.aux_loss else [])
        for suffix, layer in layers:
            for name, value in self.layer_losses(layer, targets, indices, token_mask, norm).items():
                out[name + suffix] = value
        return out

    def layer_losses(self, layer: Dict[str, Tensor], targets: Sequence[Dict[str, Tensor]], indices: Indices,
                     token_mask: Tensor, num_boxes: float) -> Dict[str, Tensor]:
        """{"loss_ce", "loss_bbox", "loss_giou"} (those of self.losses) of one layer given its matching.
        token_mask: (B, T) bool, True on valid tokens."""
        device = layer["pred_boxes"].device
        batch_idx = torch.cat([torch.full_like(q, b) for b, (q, _) in enumerate(indices)]).to(device)
        query_idx = torch.cat([q for q, _ in indices]).to(device)
        out: Dict[str, Tensor] = {}
        if "labels" in self.losses:
            out["loss_ce"] = self._loss_labels(layer["pred_logits"], targets, indices, batch_idx, query_idx,
                                               token_mask, num_boxes)
        if "boxes" in self.losses:
            out.update(self._loss_boxes(layer["pred_boxes"], targets, indices, batch_idx, query_idx, num_boxes))
        return out

    def _loss_labels(self, logits: Tensor, targets, indices: Indices, batch_idx: Tensor, query_idx: Tensor,
                     token_mask: Tensor, num_boxes: float) -> Tensor:
        """Token focal loss: matched queries learn their target's phrase tokens, all other (query, token) pairs
        learn 0; only valid tokens of real (not padded) queries count."""
        B, Q, T = logits.shape
        # 0/1 targets even if a caller passes a row-normalized positive map (the matcher normalizes its own copy).
        matched = torch.cat([t["positive_map"][j.to(t["positive_map"].device)] for t, (_, j) in zip(targets, indices)])
        target = logits.new_zeros(B, Q, T, dtype=torch.float32)
        target[batch_idx, query_idx] = (matched.to(device=logits.device) > 0).float()
        valid = token_mask[:, None, :] & real_queries(logits)[:, :, None]
        # -inf logits of invalid tokens and padded queries would make BCE NaN (-inf * 0): replace them by 0
        # *before* the loss, then drop those terms; masked_fill passes no gradient to the replaced entries, so no
        # NaN gradient either.
        safe = logits.float().masked_fill(~valid, 0.0)
        loss = sigmoid_focal_loss(safe, target, self.focal_alpha, self.focal_gamma) * valid
        return loss.sum() / num_boxes

    def _loss_boxes(self, boxes: Tensor, targets, indices: Indices, batch_idx: Tensor, query_idx: Tensor,
                    num_boxes: float) -> Dict[str, Tensor]:
        """L1 on normalized cxcywh and 1 - GIoU on xyxy of the matched pairs, each summed / num_boxes."""
        src = boxes[batch_idx, query_idx].float()  # (K, 4)
        tgt = torch.cat([t["boxes"][j.to(t["boxes"].device)] for t, (_, j) in zip(targets, indices)])
        tgt = tgt.to(device=src.device, dtype=torch.float32)
        loss_bbox = F.l1_loss(src, tgt, reduction="none").sum() / num_boxes
        # Pairwise (K, K) then the diagonal: K is the batch's box count, small enough that the simpler code wins.
        giou = torch.diag(generalized_box_iou(box_cxcywh_to_xyxy(src), box_cxcywh_to_xyxy(tgt)))
        loss_giou = (1 - giou).sum() / num_boxes
        return {"loss_bbox": loss_bbox, "loss_giou": loss_giou}

    @staticmethod
    def _token_mask(outputs: Dict[str, Any], logits: Tensor) -> Tensor:
        """(B, T) bool valid-token mask: text_token_mask padded with False up to the logits' T. Without one,
        the tokens whose logits are finite for some query (the model puts -inf on every invalid token)."""
        B, _, T = logits.shape
        mask = outputs.get("text_token_mask")
        if mask is None:
            return torch.isfinite(logits).any(dim=1)
        mask = mask.to(device=logits.device, dtype=torch.bool)
        if mask.shape[0] != B or mask.shape[1] > T:
            raise ValueError(f"text_token_mask has shape {tuple(mask.shape)}; expected ({B}, L <= {T})")
        return F.pad(mask, (0, T - mask.shape[1]), value=False)

    def weighted_total(self, loss_dict: Mapping[str, Tensor]) -> Tensor:
        """sum(loss * weight): module-level weighted_total with this criterion's weights and interm_loss_coef."""
        return weighted_total(loss_dict, self.weight_dict, self.interm_loss_coef)


def build_criterion(model_cfg: Any, kind: type = SetCriterion, extra_weights: Optional[Mapping[str, float]] = None
                    ) -> SetCriterion:
    """A `kind` (SetCriterion or a subclass) from a GDinoModelConfig (DictConfig or dataclass): loss weights
    cls/bbox/giou_loss_coef (+ extra_weights), matching costs set_cost_*, focal_alpha/gamma, aux_loss,
    interm_loss_coef, loss_types. models/gdino/build.criterion_for picks kind and weights for a model config."""
    matcher = HungarianMatcher(
        cost_class=model_cfg.set_cost_class, cost_bbox=model_cfg.set_cost_bbox, cost_giou=model_cfg.set_cost_giou,
        focal_alpha=model_cfg.focal_alpha, focal_gamma=model_cfg.focal_gamma,
    )
    weight_dict = {"loss_ce": model_cfg.cls_loss_coef, "loss_bbox": model_cfg.bbox_loss_coef,
                   "loss_giou": model_cfg.giou_loss_coef}
    weight_dict.update({f"{k}_dn": v for k, v in list(weight_dict.items())})  # denoising terms weigh the same
    weight_dict.update(extra_weights or {})
    losses = tuple(getattr(model_cfg, "loss_types", None) or ("labels", "boxes"))
    return kind(matcher, weight_dict, focal_alpha=model_cfg.focal_alpha, focal_gamma=model_cfg.focal_gamma,
                losses=losses, aux_loss=bool(model_cfg.aux_loss), interm_loss_coef=model_cfg.interm_loss_coef)
