"""Referring-expression segmentation ("VG" mode of TAO's Mask Grounding DINO): one image's network outputs for
one expression -> the instances it refers to, or "no target".

Inputs (one image; the caller slices the batch):
    outputs: {"pred_logits":       (Q, L) float token logits, -inf on padding tokens and padded queries,
              "pred_boxes":        (Q, 4) normalized cxcywh,
              "no_targets":        (2,) logits [target, no target],
              "union_mask_logits": (2, h, w) logits [background, foreground] of the referred objects' union, at
                                   stride `union_stride` (8) of the padded network input}
    expression: ExpressionWords, the expression's token columns and the word each belongs to
    masks_fn(query_idx (K,) long) -> (K, H, W) the instance masks of those queries at the output size (H, W):
              float logits (sigmoid > mask_threshold keeps a pixel) or bool (used as is). A callback because
              the dynamic mask head needs the network's outputs (MaskGroundingDINO / predict.mask_paste);
              it only runs for the queries that survive NMS.

Order (TAO's VG post-processing as issue 13 describes it; the TAO snapshot we read, 6.25.10, has no VG code):
    a. no-target: softmax(no_targets)[1] > 0.5 -> nothing is returned (no_target True, empty union);
    b. query score = max over the expression's tokens of sigmoid(pred_logits); the top num_select queries
       scoring >= conf_threshold are candidates (padded queries never);
    c. class-agnostic box NMS at nms_threshold (ops.boxes.nms; None skips it);
    d. instance masks of the survivors from masks_fn, binarized;
    e. intersection over instance with the predicted union (foreground logit > background logit, resized to
       (H, W)): an instance is kept when |inst & union| / |inst| >= ioi_threshold (an empty instance never);
    f. labels: per kept query, the expression's words holding a token with probability > text_threshold, in
       expression order, joined by spaces; when none passes, the word of the most probable token (IDEA's
       get_phrases_from_posmap idea, but cutting whole words out of the original text instead of decoding
       word pieces, so "man's" and casing survive).

Result: {"scores": (K,) float, "boxes": (K, 4) xyxy pixels of the output size (as GroundingPostProcessor),
"masks": (K, H, W) bool, "labels": list of K str, "query_idx": (K,) long, "no_target": bool,
"union": (H, W) bool the network's union mask (all False when no_target)}, sorted by decreasing score.

What a referring evaluator scores: prediction_union(result["masks"]), the OR of the kept instances. ReLA
scores its network's union mask instead (argmax of `ref_seg`); result["union"] is that mask, for comparison.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from groundlab.models.gdino.postprocess import scale_boxes
from groundlab.models.gdino.query_selection import real_queries
from groundlab.ops.boxes import nms
from groundlab.text.tokenizer import special_token_ids

Span = Tuple[int, int]  # [start, end) character offsets
NO_TARGET = 1  # index of "no target" in no_targets; index 1 of union_mask_logits is foreground
# A word: letters/digits, possibly joined by an apostrophe or hyphen ("man's", "t-shirt"); punctuation between
# words belongs to none, so a "," or "." token never becomes a label.
_WORD = re.compile(r"\w+(?:[-'\u2019]\w+)*")


@dataclass(frozen=True)
class ExpressionWords:
    """An expression's tokens and words.

    words:      the words holding at least one expression token, in text order, cut from the text as written.
    token_word: (L,) long, the index into `words` of each token column's word; -1 for columns outside the
                expression, special tokens, padding and punctuation.
    token_mask: (L,) bool, the expression's token columns: a query's score is its maximum over them."""

    words: Tuple[str, ...]
    token_word: Tensor
    token_mask: Tensor


def _encode_with_offsets(tokenizer, text: str, max_text_len: int):
    return tokenizer(text, truncation=True, max_length=max_text_len, return_offsets_mapping=True)


def token_char_spans(tokenizer, text: str, max_text_len: int) -> List[Optional[Span]]:
    """Character span of each token column of `text` as the model sees it (truncated to max_text_len tokens):
    None for [CLS], [SEP] and other tokens without characters. Needs a fast tokenizer (offset mapping)."""
    enc = _encode_with_offsets(tokenizer, text, max_text_len)
    return [(int(s), int(e)) if e > s else None for s, e in enc["offset_mapping"]]


def expression_words(text: str, token_spans: Sequence[Optional[Span]], token_mask: Tensor) -> ExpressionWords:
    """ExpressionWords of the expression whose token columns are `token_mask` (L,) bool, in caption `text`
    whose token columns span `token_spans` (token_char_spans; may be shorter than L: the rest is padding).
    A token belongs to the word its characters overlap."""
    token_mask = token_mask.bool()
    L = token_mask.shape[0]
    spans = [m.span() for m in _WORD.finditer(text)]
    word_of_token = torch.full((L,), -1, dtype=torch.long)
    for t, span in enumerate(token_spans[:L]):
        if span is None or not bool(token_mask[t]):
            continue
        for w, (ws, we) in enumerate(spans):
            if span[0] < we and ws < span[1]:
                word_of_token[t] = w
                break
    used = sorted(set(word_of_token[word_of_token >= 0].tolist()))
    renumber = torch.full((len(spans) + 1,), -1, dtype=torch.long)  # last slot maps -1 to -1
    renumber[torch.tensor(used, dtype=torch.long)] = torch.arange(len(used))
    return ExpressionWords(tuple(text[spans[w][0]:spans[w][1]] for w in used), renumber[word_of_token],
                           token_mask)


def expression_from_tokenizer(tokenizer, text: str, max_text_len: int,
                              token_mask: Optional[Tensor] = None) -> ExpressionWords:
    """ExpressionWords of caption `text`; token_mask (max_text_len,) bool defaults to the whole caption: every
    token column with characters except the phrase-closing "." and "?" (special tokens in Grounding DINO's
    text mask, which name nothing)."""
    enc = _encode_with_offsets(tokenizer, text, max_text_len)
    spans = [(int(s), int(e)) if e > s else None for s, e in enc["offset_mapping"]]
    if token_mask is None:
        special = set(special_token_ids(tokenizer))
        token_mask = torch.zeros(max_text_len, dtype=torch.bool)
        token_mask[[t for t, (s, i) in enumerate(zip(spans, enc["input_ids"])) if s is not None
                    and i not in special]] = True
    return expression_words(text, spans, token_mask)


def query_labels(token_probs: Tensor, expression: ExpressionWords, text_threshold: float) -> List[str]:
    """token_probs (K, L) sigmoid probabilities -> K labels: the words with a token above text_threshold, in
    expression order; the most probable token's word when none passes; "" when the expression has no word."""
    K, W = token_probs.shape[0], len(expression.words)
    if W == 0:
        return [""] * K
    token_word = expression.token_word.to(token_probs.device)
    in_word = token_word >= 0
    # per word, the highest probability of its tokens: (K, W)
    word_prob = token_probs.new_full((K, W), -1.0).scatter_reduce(
        1, token_word[in_word].expand(K, -1), token_probs[:, in_word], reduce="amax")
    chosen = word_prob > text_threshold
    fallback = ~chosen.any(1)
    chosen[fallback, word_prob[fallback].argmax(1)] = True
    return [" ".join(expression.words[w] for w in row.nonzero().flatten().tolist()) for row in chosen]


def union_mask(union_mask_logits: Tensor, image_size: Tuple[int, int], input_size: Optional[Tuple[int, int]] = None,
               stride: int = 8) -> Tensor:
    """(2, h, w) [background, foreground] logits -> (H, W) bool foreground at image_size (H, W).

    With input_size (h_in, w_in), the unpadded network-input size, the logits are resized to the padded
    input (h * stride, w * stride), cropped to it and resized to image_size, as the instance masks are
    (predict/mask_paste.py); without it they are resized straight to image_size. Bilinear resizing is linear,
    so resizing fg - bg and keeping > 0 equals the argmax (and softmax fg > 0.5) of the resized logits; ties
    go to the background."""
    diff = (union_mask_logits[1] - union_mask_logits[0]).float()[None, None]
    if input_size is not None:
        h, w = diff.shape[-2:]
        diff = F.interpolate(diff, size=(h * stride, w * stride), mode="bilinear", align_corners=False)
        diff = diff[:, :, : int(input_size[0]), : int(input_size[1])]
    if tuple(diff.shape[-2:]) != tuple(image_size):
        diff = F.interpolate(diff, size=tuple(int(v) for v in image_size), mode="bilinear", align_corners=False)
    return diff[0, 0] > 0


def prediction_union(masks: Tensor) -> Tensor:
    """(K, H, W) bool kept instance masks -> (H, W) bool, their OR (all False when K = 0): the prediction a
    referring evaluator scores (eval/referring_metrics.py)."""
    return masks.bool().any(0)


def _binarize(masks: Tensor, threshold: float) -> Tensor:
    return masks if masks.dtype == torch.bool else masks.float().sigmoid() > threshold


def _empty_result(dev: torch.device, image_size: Tuple[int, int], no_target: bool,
                  union: Optional[Tensor] = None) -> Dict[str, Any]:
    H, W = (int(v) for v in image_size)
    return {"scores": torch.zeros(0, device=dev), "boxes": torch.zeros(0, 4, device=dev),
            "masks": torch.zeros(0, H, W, dtype=torch.bool, device=dev), "labels": [],
            "query_idx": torch.zeros(0, dtype=torch.long, device=dev), "no_target": no_target,
            "union": union if union is not None else torch.zeros(H, W, dtype=torch.bool, device=dev)}


@torch.no_grad()
def referring_postprocess(
    outputs: Mapping[str, Tensor],
    expression: ExpressionWords,
    masks_fn: Callable[[Tensor], Tensor],
    image_size: Tuple[int, int],
    *,
    num_select: int,
    conf_threshold: float,
    nms_threshold: Optional[float],
    mask_threshold: float,
    ioi_threshold: float,
    text_threshold: float,
    input_size: Optional[Tuple[int, int]] = None,
    union_stride: int = 8,
) -> Dict[str, Any]:
    """One image's referred instances (steps a-f and the result's keys in the module docstring).

    image_size: (H, W) of the output (the original image): masks, union and pixel boxes. input_size and
    union_stride: how the union logits map onto it (union_mask)."""
    logits, device = outputs["pred_logits"], outputs["pred_logits"].device
    Q, L = logits.shape
    if expression.token_mask.shape != (L,):
        raise ValueError(f"expression token_mask is {tuple(expression.token_mask.shape)}, pred_logits has {L} "
                         f"token columns")
    if not bool(expression.token_mask.any()):
        raise ValueError("the expression has no token column: nothing to score queries against")
    # a. the no-target class wins: nothing refers
    if float(outputs["no_targets"].float().softmax(-1)[NO_TARGET]) > 0.5:
        return _empty_result(device, image_size, True)
    # b. score = best expression token; top num_select at or above conf_threshold
    probs = logits.float().sigmoid()
    scores = probs[:, expression.token_mask.to(device)].amax(-1)
    scores = scores.masked_fill(~real_queries(logits[None])[0], float("-inf"))
    order = torch.sort(scores, descending=True, stable=True).indices[: int(num_select)]
    order = order[scores[order] >= conf_threshold]
    # c. class-agnostic NMS, on the boxes the result reports
    boxes = scale_boxes(outputs["pred_boxes"][None].float(),
                        torch.tensor([list(image_size)], device=device))[0]
    if nms_threshold is not None and order.numel():
        order = order[nms(boxes[order], scores[order], float(nms_threshold))]
    union = union_mask(outputs["union_mask_logits"], image_size, input_size, union_stride)
    if order.numel() == 0:
        return _empty_result(device, image_size, False, union.to(device))
    # d. masks of the survivors only
    masks = masks_fn(order)
    H, W = (int(v) for v in image_size)
    if tuple(masks.shape) != (order.numel(), H, W):
        raise ValueError(f"masks_fn returned {tuple(masks.shape)} for {order.numel()} queries, expected "
                         f"({order.numel()}, {H}, {W})")
    masks = _binarize(masks, mask_threshold)
    # e. intersection over instance with the predicted union
    union = union.to(masks.device)
    area = masks.flatten(1).sum(1)
    inside = (masks & union).flatten(1).sum(1)
    ioi = inside.double() / area.clamp(min=1).double()  # the ratio itself, so a boundary case is exact
    keep = (area > 0) & (ioi >= ioi_threshold)
    order, masks = order[keep.to(order.device)], masks[keep]
    # f. labels from the kept queries' token probabilities
    return {"scores": scores[order], "boxes": boxes[order], "masks": masks,
            "labels": query_labels(probs[order], expression, text_threshold), "query_idx": order,
            "no_target": False, "union": union}
