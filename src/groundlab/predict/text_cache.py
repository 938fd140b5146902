"""Encoded prompts by their text, so each distinct prompt runs through the text encoder once per run (once per
validation in training, where the encoder's weights change between validations)."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Dict

import torch

from groundlab.text.captions import Prompt
from groundlab.text.tokens import PromptEncoder


@dataclass
class EncodedPrompt:
    """text: the backend's encoded text (batch 1); positive_map: (P, max_text_len) 0/1 per phrase;
    input_ids: (L,) the prompt's token ids."""

    text: Any
    positive_map: torch.Tensor
    input_ids: torch.Tensor


class TextCache:
    """get(prompt) -> EncodedPrompt; least recently used prompts leave beyond `capacity`. `misses` counts
    encoder runs (tests and benchmarks read it)."""

    def __init__(self, encode: Callable[[Dict[str, torch.Tensor]], Any], encoder: PromptEncoder,
                 device: torch.device, capacity: int = 4096):
        self.encode, self.encoder, self.device, self.capacity = encode, encoder, device, capacity
        self._cache: "OrderedDict[str, EncodedPrompt]" = OrderedDict()
        self.misses = 0

    def get(self, prompt: Prompt) -> EncodedPrompt:
        hit = self._cache.get(prompt.text)
        if hit is not None:
            self._cache.move_to_end(prompt.text)
            return hit
        tok = self.encoder.encode([prompt])
        tensors = {k: v.to(self.device) for k, v in tok.items() if torch.is_tensor(v)}
        entry = EncodedPrompt(self.encode(tensors), tok["positive_maps"][0].to(self.device),
                              tok["input_ids"][0].to(self.device))
        self.misses += 1
        self._cache[prompt.text] = entry
        if len(self._cache) > self.capacity:
            self._cache.popitem(last=False)
        return entry

    def clear(self) -> None:
        self._cache.clear()
