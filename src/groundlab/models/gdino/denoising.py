"""Contrastive denoising queries (DINO's CDN), for training only: noised copies of the ground-truth boxes and
labels are fed to the decoder next to the matching queries; positives (small box noise) must reconstruct their
box and phrase, negatives (larger noise) must predict "no object". Their loss needs no matching.

For grounding, a "label" is the phrase index of the box in its image's prompt; label noise draws another phrase
of the same prompt. Crowded images are capped: at most `dn_number // 2` boxes per image are noised, so the
number of denoising queries (2 * boxes * groups <= dn_number, plus one group minimum) stays bounded.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from groundlab.ops.boxes import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh
from groundlab.models.common.position_encoding import inverse_sigmoid


def prepare_denoising(
    targets: Sequence[Dict[str, Tensor]], dn_number: int, label_noise_ratio: float, box_noise_scale: float,
    num_queries: int, label_enc: nn.Embedding, generator: Optional[torch.Generator] = None,
) -> Optional[Tuple[Tensor, Tensor, Tensor, Dict[str, Any]]]:
    """Denoising queries for a batch, or None when there is nothing to denoise.

    targets: per image {"boxes": (N, 4) normalized cxcywh, "phrase_ids": (N,), "num_phrases": int (optional)}.
    Returns (label queries (B, P, C), box queries in logit space (B, P, 4), self-attention mask
    (P + num_queries, P + num_queries) bool True where blocked, meta {"pad_size": P, "num_groups": G,
    "single_pad": S, "indices": per image (query_idx, target_idx) of the positive queries}).
    Matching queries never see denoising ones, and denoising groups never see each other."""
    device = label_enc.weight.device
    cap = max(1, dn_number // 2)
    chosen = []
    for t in targets:  # cap crowded images: a random subset of their boxes is denoised
        n = int(t["boxes"].shape[0])
        keep = torch.randperm(n, generator=generator)[:cap] if n > cap else torch.arange(n)
        chosen.append(keep)
    known = [len(k) for k in chosen]
    single_pad = max(known) if known else 0
    if dn_number <= 0 or single_pad == 0:
        return None
    groups = max(1, dn_number // (2 * single_pad))
    boxes = torch.cat([t["boxes"][k.to(t["boxes"].device)] for t, k in zip(targets, chosen)]).to(device).float()
    labels = torch.cat([t["phrase_ids"][k.to(t["phrase_ids"].device)] for t, k in zip(targets, chosen)]).to(device).long()
    num_phrases = torch.cat([torch.full((n,), int(t.get("num_phrases", int(t["phrase_ids"].max()) + 1 if n else 1)))
                             for t, n in zip(targets, known)]).to(device)
    batch_idx = torch.cat([torch.full((n,), b, dtype=torch.long) for b, n in enumerate(known)]).to(device)
    total = len(boxes)

    rep = 2 * groups
    labels_n = labels.repeat(rep)
    boxes_n = boxes.repeat(rep, 1)
    phrases_n = num_phrases.repeat(rep)
    if label_noise_ratio > 0:
        flip = torch.rand(labels_n.shape, generator=generator).to(device) < label_noise_ratio * 0.5
        random_labels = (torch.rand(labels_n.shape, generator=generator).to(device) * phrases_n).long()
        labels_n = torch.where(flip, random_labels, labels_n)
    if box_noise_scale > 0:
        xyxy = box_cxcywh_to_xyxy(boxes_n)
        half = torch.cat([boxes_n[:, 2:] / 2, boxes_n[:, 2:] / 2], 1)
        sign = torch.randint(0, 2, boxes_n.shape, generator=generator).to(device).float() * 2 - 1
        part = torch.rand(boxes_n.shape, generator=generator).to(device)
        negative = torch.zeros(len(boxes_n), dtype=torch.bool, device=device)
        for g in range(groups):  # second half of each group: negatives, pushed out by at least one half-extent
            negative[(2 * g + 1) * total : (2 * g + 2) * total] = True
        part = part + negative[:, None].float()
        xyxy = (xyxy + sign * part * half * box_noise_scale).clamp(0.0, 1.0)
        boxes_n = box_xyxy_to_cxcywh(xyxy)

    pad_size = single_pad * 2 * groups
    B = len(targets)
    d = label_enc.embedding_dim
    label_query = torch.zeros(B, pad_size, d, device=device)
    box_query = torch.zeros(B, pad_size, 4, device=device)
    slot = torch.cat([torch.arange(n) for n in known]).to(device)  # position of a box within its image
    slots = torch.cat([slot + single_pad * i for i in range(rep)])
    rows = batch_idx.repeat(rep)
    label_query[rows, slots] = label_enc(labels_n.clamp(max=label_enc.num_embeddings - 1))
    box_query[rows, slots] = inverse_sigmoid(boxes_n.clamp(1e-4, 1 - 1e-4))

    size = pad_size + num_queries
    mask = torch.zeros(size, size, dtype=torch.bool, device=device)
    mask[pad_size:, :pad_size] = True
    for g in range(rep // 2):
        start, end = single_pad * 2 * g, single_pad * 2 * (g + 1)
        mask[start:end, :start] = True
        mask[start:end, end:pad_size] = True

    indices: List[Tuple[Tensor, Tensor]] = []
    for b, (t, keep) in enumerate(zip(targets, chosen)):
        n = len(keep)
        if n == 0:
            indices.append((torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long)))
            continue
        q = torch.cat([torch.arange(n) + single_pad * 2 * g for g in range(groups)])
        indices.append((q, keep.repeat(groups)))
    meta = {"pad_size": pad_size, "num_groups": groups, "single_pad": single_pad, "indices": indices}
    return label_query, box_query, mask, meta
