"""Batches of GroundingDataset items: images padded with a padding mask, prompts tokenized together."""

from __future__ import annotations

from typing import Any, Dict, List

import torch

from groundlab.data.tokens import PromptEncoder


class GroundingCollator:
    """Collate for DataLoader (runs in the workers, so tokenization is off the training loop).

    Returns {"images": (B, 3, H, W) float, zero-padded at bottom/right; "padding_mask": (B, H, W) bool,
    True on padding; "targets": list of target dicts, each with "positive_map" (N, max_text_len) added
    when the batch has prompts; the text inputs of PromptEncoder.encode ("input_ids", "attention_mask",
    "token_type_ids", "position_ids" (B, L), "text_self_attention_mask" (B, L, L), "positive_maps")
    when every item has a prompt; "prompts", "prompt_class_ids", "file_names", "sources"}.
    size_divisibility pads H and W up to a multiple (e.g. 32 for the backbone's strides)."""

    def __init__(self, encoder: PromptEncoder, size_divisibility: int = 0):
        self.encoder = encoder
        self.size_divisibility = size_divisibility

    def __call__(self, items: List[Dict[str, Any]]) -> Dict[str, Any]:
        H = max(it["image"].shape[1] for it in items)
        W = max(it["image"].shape[2] for it in items)
        if self.size_divisibility > 1:
            d = self.size_divisibility
            H, W = (H + d - 1) // d * d, (W + d - 1) // d * d
        images = items[0]["image"].new_zeros(len(items), 3, H, W)
        padding_mask = torch.ones(len(items), H, W, dtype=torch.bool)
        for b, it in enumerate(items):
            h, w = it["image"].shape[1:]
            images[b, :, :h, :w] = it["image"]
            padding_mask[b, :h, :w] = False
        batch: Dict[str, Any] = {
            "images": images,
            "padding_mask": padding_mask,
            "targets": [dict(it["target"]) for it in items],
            "prompts": [it["prompt"] for it in items],
            "prompt_class_ids": [it["prompt_class_ids"] for it in items],
            "file_names": [it["file_name"] for it in items],
            "sources": [it["source"] for it in items],
        }
        if all(it["prompt"] is not None for it in items):
            text = self.encoder.encode([it["prompt"] for it in items], where=[it["where"] for it in items])
            batch.update(text)
            for target, pmap in zip(batch["targets"], text["positive_maps"]):
                target["positive_map"] = pmap[target["phrase_ids"]]
        return batch
