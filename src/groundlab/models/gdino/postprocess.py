"""Grounding DINO outputs -> detections: class scores from token probabilities, top-k, optional NMS.

Model outputs (all functions here):
    {"pred_logits": (B, Q, L) float, -inf on padding / invalid tokens (L = model.max_text_len) and on every
                    token of a padded query (an input with fewer image tokens than queries),
     "pred_boxes":  (B, Q, 4) normalized cxcywh in [0, 1]}
A token's probability is sigmoid(logit) (exactly 0 at -inf). Padded queries are never returned.

Detection result (one dict per image):
    {"scores": (K,) float, "labels": (K,) long class index, "boxes": (K, 4) xyxy in original-image
     pixels}, sorted by decreasing score. Boxes are not clipped to the image (TAO and IDEA do not clip
     either, and COCO evaluation expects the raw boxes).

Class lists: a class's score is the mean probability of its tokens (its positive-map row), as in
IDEA-Research's and TAO's PostProcess. Class lists longer than one prompt run as several prompts
(data.captions.ChunkedPrompts); merge_chunk_results joins their results. Free-form captions use
select_free_form, which names each box by the caption tokens it lights up.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from groundlab.text.captions import ChunkedPrompts
from groundlab.text.tokenizer import special_token_ids
from groundlab.ops.boxes import batched_nms, box_cxcywh_to_xyxy
from groundlab.models.gdino.query_selection import real_queries

Result = Dict[str, Tensor]


def normalize_positive_map(positive_map: Tensor) -> Tensor:
    """(C, L) 0/1 map -> rows divided by their sum, so prob @ map.T is the mean over a class's tokens.
    An all-zero row stays zero (its class then scores 0) instead of dividing by zero."""
    pmap = positive_map.float()
    return pmap / pmap.sum(dim=-1, keepdim=True).clamp(min=1e-12)


def class_scores(pred_logits: Tensor, positive_map: Tensor) -> Tensor:
    """pred_logits (B, Q, L), positive_map (C, L) -> (B, Q, C) mean token probability per class."""
    if positive_map.shape[-1] != pred_logits.shape[-1]:
        raise ValueError(
            f"positive map has {positive_map.shape[-1]} token columns but pred_logits has "
            f"{pred_logits.shape[-1]}; both must be model.max_text_len wide"
        )
    prob = pred_logits.sigmoid()
    return prob @ normalize_positive_map(positive_map).to(prob).transpose(0, 1)


def scale_boxes(boxes_cxcywh: Tensor, target_sizes: Tensor) -> Tensor:
    """(B, Q, 4) normalized cxcywh, target_sizes (B, 2) as (h, w) -> (B, Q, 4) xyxy pixels."""
    img_h, img_w = target_sizes.to(boxes_cxcywh).unbind(-1)
    scale = torch.stack([img_w, img_h, img_w, img_h], dim=-1)
    return box_cxcywh_to_xyxy(boxes_cxcywh) * scale[:, None, :]


def topk_pairs(scores: Tensor, boxes: Tensor, k: int) -> Dict[str, Tensor]:
    """Top-k (query, class) pairs per image, vectorized over the batch (traces for export).

    scores (B, Q, C), boxes (B, Q, 4) -> {"scores": (B, K), "labels": (B, K) long,
    "boxes": (B, K, 4), "queries": (B, K) long, the query of each pair} with K = min(k, Q * C), sorted by
    decreasing score. A query may appear once
    per class (IDEA / TAO behaviour), so one object can be reported under two similar classes."""
    B, Q, C = scores.shape
    k = min(int(k), Q * C)
    top_scores, flat_idx = torch.topk(scores.reshape(B, Q * C), k, dim=1)
    query = torch.div(flat_idx, C, rounding_mode="floor")
    labels = flat_idx % C
    top_boxes = torch.gather(boxes, 1, query.unsqueeze(-1).expand(B, k, 4))
    return {"scores": top_scores, "labels": labels, "boxes": top_boxes, "queries": query}


def drop_padded(result: Result) -> Result:
    """One image's top-k result without the pairs of padded queries (score -inf); unchanged when none."""
    keep = torch.isfinite(result["scores"])
    if bool(keep.all()):
        return result
    return {key: value[keep] for key, value in result.items()}


def apply_nms(result: Result, nms_threshold: Optional[float]) -> Result:
    """Class-wise NMS on one image's result (already sorted by score); unchanged when threshold is None."""
    if nms_threshold is None:
        return result
    keep = batched_nms(result["boxes"], result["scores"], result["labels"], float(nms_threshold))
    return {key: value[keep] for key, value in result.items()}


class GroundingPostProcessor(nn.Module):
    """num_select top (query, class) pairs per image; boxes in original-image pixels xyxy.

    num_select:    pairs kept per image (before NMS).
    nms_threshold: IoU above which a lower-scoring box of the same class is dropped; None = no NMS
                   (the DETR default: set prediction needs none, but top-k over (query, class) pairs
                   can repeat a box, so NMS can help precision for visual outputs).
    """

    def __init__(self, num_select: int = 300, nms_threshold: Optional[float] = None):
        super().__init__()
        if num_select < 1:
            raise ValueError(f"num_select must be >= 1, got {num_select}")
        self.num_select = int(num_select)
        self.nms_threshold = nms_threshold

    @torch.no_grad()
    def forward(
        self, outputs: Dict[str, Tensor], target_sizes: Tensor, positive_maps: Union[Tensor, Sequence[Tensor]]
    ) -> List[Result]:
        """outputs: {"pred_logits": (B, Q, L), "pred_boxes": (B, Q, 4)}; target_sizes: (B, 2) as (h, w)
        of the original images; positive_maps: (C, L) shared by the batch, or a list of B (C_b, L) maps
        (one prompt per image). Returns B dicts {"scores": (K,), "labels": (K,) long, "boxes": (K, 4),
        "queries": (K,) long (the query of each detection, for its mask)},
        K <= num_select, sorted by decreasing score; padded queries never appear (fewer than num_select pairs
        when the real queries times the classes are fewer)."""
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        if target_sizes.shape != (logits.shape[0], 2):
            raise ValueError(f"target_sizes must be (B, 2) = ({logits.shape[0]}, 2), got {tuple(target_sizes.shape)}")
        pixel_boxes = scale_boxes(boxes, target_sizes)
        # padded queries score 0 like a hopeless real one; -inf sorts them last and marks them for removal
        padded = ~real_queries(logits)[:, :, None]
        if isinstance(positive_maps, Tensor):
            # One prompt for the whole batch: the selection is a single batched op.
            scores = class_scores(logits, positive_maps).masked_fill(padded, float("-inf"))
            top = topk_pairs(scores, pixel_boxes, self.num_select)
            per_image = [{key: value[b] for key, value in top.items()} for b in range(logits.shape[0])]
        else:
            if len(positive_maps) != logits.shape[0]:
                raise ValueError(f"{len(positive_maps)} positive maps for a batch of {logits.shape[0]}")
            per_image = []
            for b, pmap in enumerate(positive_maps):
                scores = class_scores(logits[b : b + 1], pmap).masked_fill(padded[b : b + 1], float("-inf"))
                top = topk_pairs(scores, pixel_boxes[b : b + 1], self.num_select)
                per_image.append({key: value[0] for key, value in top.items()})
        return [apply_nms(drop_padded(r), self.nms_threshold) for r in per_image]


def merge_chunk_results(
    per_chunk: Sequence[Sequence[Result]],
    chunked: ChunkedPrompts,
    num_select: int,
    nms_threshold: Optional[float] = None,
) -> List[Result]:
    """Join the results of the prompts of a chunked class list into one result per image.

    per_chunk[k][b]: result of prompt k for image b, labels local to that prompt. Labels are mapped to
    global class ids through chunked.class_ids[k]; each image's detections from all chunks are
    re-sorted by score, cut to num_select, then class-wise NMS (when nms_threshold is given). Other per-detection
    keys the results share ("queries") are carried along, and "chunks" (K,) long says which prompt each
    detection came from. Scores compare across chunks because each class's score depends only on its own
    tokens' logits."""
    if len(per_chunk) != len(chunked.class_ids):
        raise ValueError(f"{len(per_chunk)} chunk results for {len(chunked.class_ids)} prompts")
    if not per_chunk:
        return []
    num_images = len(per_chunk[0])
    if any(len(results) != num_images for results in per_chunk):
        raise ValueError("every chunk needs one result per image")
    merged: List[Result] = []
    extra = [key for key in per_chunk[0][0] if key not in ("scores", "labels", "boxes")] if num_images else []
    for b in range(num_images):
        parts: Dict[str, List[Tensor]] = {key: [] for key in ["scores", "labels", "boxes", "chunks", *extra]}
        for k, results in enumerate(per_chunk):
            r = results[b]
            ids = torch.as_tensor(chunked.class_ids[k], dtype=torch.long, device=r["labels"].device)
            parts["scores"].append(r["scores"])
            parts["labels"].append(ids[r["labels"].long()])
            parts["boxes"].append(r["boxes"].reshape(-1, 4))
            parts["chunks"].append(torch.full_like(r["labels"], k, dtype=torch.long))
            for key in extra:
                parts[key].append(r[key])
        all_scores = torch.cat(parts["scores"])
        order = torch.sort(all_scores, descending=True, stable=True).indices[:num_select]
        merged.append(apply_nms({key: torch.cat(values)[order] for key, values in parts.items()}, nms_threshold))
    return merged


def _excluded_token_ids(tokenizer) -> List[int]:
    """Token ids that never name anything: [CLS], [SEP], ".", "?" and padding."""
    ids = special_token_ids(tokenizer)
    if tokenizer.pad_token_id is not None:
        ids.append(tokenizer.pad_token_id)
    return ids


def phrases_from_token_probs(
    token_probs: Tensor, input_ids: Tensor, tokenizer, text_threshold: float
) -> List[str]:
    """Per selected query, the caption text made of its tokens with probability > text_threshold.

    token_probs (K, L) with L >= len(input_ids) (columns beyond the caption are padding and ignored);
    input_ids (L',) the caption's ids. Special tokens ([CLS], [SEP], ".", "?", padding) are skipped
    and the rest decoded together, so word pieces re-join ("hydrant", not "hydra ##nt"): IDEA's
    get_phrases_from_posmap. Returns K strings, "" for a query with no token above the threshold."""
    n = input_ids.shape[-1]
    probs = token_probs[:, :n]
    ids = input_ids.to(probs.device)
    usable = ~torch.isin(ids, torch.tensor(_excluded_token_ids(tokenizer), device=ids.device))
    selected = (probs > text_threshold) & usable[None, :]
    id_list = ids.tolist()
    return [tokenizer.decode([id_list[j] for j in row.nonzero().flatten().tolist()]) for row in selected]


def select_free_form(
    outputs: Dict[str, Tensor],
    target_sizes: Tensor,
    input_ids: Tensor,
    tokenizer,
    box_threshold: float,
    text_threshold: float,
) -> List[Dict[str, object]]:
    """Detections for free-form captions (IDEA's demo `predict`): per image, the queries whose
    highest token probability exceeds box_threshold, each named by its tokens above text_threshold.

    input_ids: (B, L') ids of each image's caption, or (L',) for one caption shared by the batch.
    Returns per image {"scores": (K,) max token probability, "boxes": (K, 4) xyxy pixels,
    "phrases": list of K str, "queries": (K,) long}, sorted by decreasing score. As in IDEA, the max runs over all
    caption tokens (special ones included), so a kept box may get an empty phrase."""
    logits = outputs["pred_logits"]
    probs = logits.sigmoid()
    pixel_boxes = scale_boxes(outputs["pred_boxes"], target_sizes)
    best = probs.max(dim=-1).values.masked_fill(~real_queries(logits), -1.0)  # (B, Q); padded: below any threshold
    results: List[Dict[str, object]] = []
    for b in range(logits.shape[0]):
        ids = input_ids if input_ids.dim() == 1 else input_ids[b]
        kept = (best[b] > box_threshold).nonzero().flatten()
        kept = kept[torch.sort(best[b][kept], descending=True, stable=True).indices]
        results.append({
            "scores": best[b][kept],
            "boxes": pixel_boxes[b][kept],
            "phrases": phrases_from_token_probs(probs[b][kept], ids, tokenizer, text_threshold),
            "queries": kept,
        })
    return results
