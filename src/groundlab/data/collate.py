"""Batches of GroundingDataset items: images padded with a padding mask, prompts tokenized together."""

from __future__ import annotations

from typing import Any, Dict, List

import torch

from groundlab.data.bad_images import split_bad
from groundlab.text.tokens import PromptEncoder


def pad_images(images: List[torch.Tensor], size_divisibility: int = 0):
    """(B, 3, H, W) zero-padded at bottom/right and (B, H, W) bool padding mask (True on padding)."""
    H = max(im.shape[1] for im in images)
    W = max(im.shape[2] for im in images)
    if size_divisibility > 1:
        d = size_divisibility
        H, W = (H + d - 1) // d * d, (W + d - 1) // d * d
    batch = images[0].new_zeros(len(images), 3, H, W)
    padding_mask = torch.ones(len(images), H, W, dtype=torch.bool)
    for b, im in enumerate(images):
        h, w = im.shape[1:]
        batch[b, :, :h, :w] = im
        padding_mask[b, :h, :w] = False
    return batch, padding_mask


def unpadded_sizes(padding_mask: torch.Tensor) -> torch.Tensor:
    """(B, H, W) padding mask of pad_images -> (B, 2) long (h, w) of each image without its padding."""
    return torch.stack([(~padding_mask[:, :, 0]).sum(1), (~padding_mask[:, 0, :]).sum(1)], 1)


class GroundingCollator:
    """Collate for DataLoader (runs in the workers, so tokenization is off the training loop).

    Returns {"images": (B, 3, H, W) float, zero-padded at bottom/right; "padding_mask": (B, H, W) bool,
    True on padding; "targets": list of target dicts, each with "positive_map" (N, max_text_len) added
    when the batch has prompts; the text inputs of PromptEncoder.encode ("input_ids", "attention_mask",
    "token_type_ids", "position_ids" (B, L), "text_self_attention_mask" (B, L, L), "positive_maps")
    when every item has a prompt; "prompts", "prompt_class_ids", "file_names", "sources"}.
    size_divisibility pads H and W up to a multiple (e.g. 32 for the backbone's strides). tokenize=False
    leaves the prompts untokenized (evaluation: the predictor prompts every class itself).

    Items that are `BadImage` markers (evaluation datasets: images that could not be decoded) are left out of
    the batch and listed under "skipped"; a batch of bad images only is {"images": None, "skipped": [...],
    "targets": []}."""

    def __init__(self, encoder: PromptEncoder, size_divisibility: int = 0, tokenize: bool = True):
        self.encoder = encoder
        self.size_divisibility = size_divisibility
        self.tokenize = tokenize

    def __call__(self, items: List[Dict[str, Any]]) -> Dict[str, Any]:
        items, bad = split_bad(items)
        if not items:
            return {"images": None, "skipped": bad, "targets": []}
        images, padding_mask = pad_images([it["image"] for it in items], self.size_divisibility)
        batch: Dict[str, Any] = {
            "images": images,
            "padding_mask": padding_mask,
            "targets": [dict(it["target"]) for it in items],
            "prompts": [it["prompt"] for it in items],
            "prompt_class_ids": [it["prompt_class_ids"] for it in items],
            "file_names": [it["file_name"] for it in items],
            "sources": [it["source"] for it in items],
            "skipped": bad,
        }
        if self.tokenize and all(it["prompt"] is not None for it in items):
            text = self.encoder.encode([it["prompt"] for it in items], where=[it["where"] for it in items])
            batch.update(text)
            for target, pmap, it in zip(batch["targets"], text["positive_maps"], items):
                target["positive_map"] = pmap[target["phrase_ids"]]
                target["num_phrases"] = len(it["prompt"].phrases)
        return batch
