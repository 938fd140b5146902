"""Tokenization for Grounding DINO: input ids, the sub-sentence attention mask, per-phrase position
ids, and positive maps from character spans.

The sub-sentence mask (IDEA-Research's `generate_masks_with_special_tokens_and_transfer_map`):
special tokens ([CLS], [SEP], ".", "?") close a phrase, each phrase attends only within itself and
its position ids restart at 0. A special token at index 0 or L-1 closes nothing; tokens of an
unclosed phrase, padding and [CLS] attend to themselves only, with position id 0. Computed per row.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

from groundlab.text.captions import Prompt
from groundlab.errors import PromptOverflowError

from groundlab.text.tokenizer import special_token_ids


def sub_sentence_masks(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, special_ids: torch.Tensor
) -> Dict[str, torch.Tensor]:
    """Sub-sentence attention mask and position ids, vectorized over rows.

    input_ids, attention_mask: (B, L). special_ids: (S,) token ids that close a phrase.
    Returns {"text_self_attention_mask": (B, L, L) bool, "position_ids": (B, L) long}."""
    B, L = input_ids.shape
    idx = torch.arange(L, device=input_ids.device)
    special = torch.isin(input_ids, special_ids)
    closer = special & (idx != 0) & (idx != L - 1)
    seg = special.long().cumsum(1) - special.long()  # phrase index: specials strictly before
    closed = torch.zeros(B, L + 1, dtype=torch.long, device=input_ids.device)
    closed.scatter_reduce_(1, seg, closer.long(), reduce="amax")
    in_block = closed.gather(1, seg).bool() & attention_mask.bool()
    same = (seg[:, :, None] == seg[:, None, :]) & in_block[:, :, None] & in_block[:, None, :]
    mask = same | torch.eye(L, dtype=torch.bool, device=input_ids.device)[None]
    last_special = torch.where(special, idx, torch.full_like(idx, -1)).cummax(1).values
    prev_special = torch.cat([torch.full_like(last_special[:, :1], -1), last_special[:, :-1]], 1)
    position_ids = torch.where(in_block, idx - prev_special - 1, torch.zeros_like(idx))
    return {"text_self_attention_mask": mask, "position_ids": position_ids}


class PromptEncoder:
    """Tokenizes prompts into Grounding DINO's text inputs and positive maps.

    tokenizer: a transformers fast tokenizer with the bert-base-uncased vocab (or any BERT vocab).
    max_text_len: model.max_text_len; positive maps are (P, max_text_len).
    """

    def __init__(self, tokenizer, max_text_len: int):
        self.tokenizer = tokenizer
        self.max_text_len = max_text_len
        self.special_ids = torch.tensor(special_token_ids(tokenizer))
        self._name_len: Dict[str, int] = {}

    def name_len(self, name: str) -> int:
        """Tokens of `name` inside a prompt (no special tokens); cached per name."""
        n = self._name_len.get(name)
        if n is None:
            n = len(self.tokenizer(name, add_special_tokens=False)["input_ids"])
            self._name_len[name] = n
        return n

    def encode(self, prompts: Sequence[Prompt], where: Optional[Sequence[str]] = None) -> Dict[str, object]:
        """Tokenize a batch of prompts, padded to the longest (at most max_text_len).

        Returns {"input_ids", "attention_mask", "token_type_ids", "position_ids": (B, L) long,
        "text_self_attention_mask": (B, L, L) bool, "positive_maps": list of (P_b, max_text_len) float 0/1}.
        Raises PromptOverflowError (naming where[b]) if a phrase falls beyond max_text_len tokens."""
        enc = self.tokenizer(
            [p.text for p in prompts], padding="longest", truncation=True,
            max_length=self.max_text_len, return_tensors="pt",
        )
        out: Dict[str, object] = {
            "input_ids": enc["input_ids"],
            "attention_mask": enc["attention_mask"],
            "token_type_ids": enc.get("token_type_ids", torch.zeros_like(enc["input_ids"])),
        }
        out.update(sub_sentence_masks(enc["input_ids"], enc["attention_mask"], self.special_ids))
        out["positive_maps"] = [
            self._positive_map(enc, b, p, where[b] if where else None) for b, p in enumerate(prompts)
        ]
        return out

    def _positive_map(self, enc, b: int, prompt: Prompt, where: Optional[str]) -> torch.Tensor:
        pmap = torch.zeros(len(prompt.phrases), self.max_text_len)
        for k, spans in enumerate(prompt.spans):
            for start, end in spans:
                first = _char_to_token(enc, b, [start, start + 1, start + 2])
                last = _char_to_token(enc, b, [end - 1, end - 2, end - 3])
                if first is None or last is None or last < first:
                    raise PromptOverflowError(
                        f"phrase {prompt.phrases[k]!r} falls beyond model.max_text_len={self.max_text_len} "
                        f"tokens of caption {prompt.text[:80]!r}",
                        where,
                    )
                pmap[k, first : last + 1] = 1.0
        return pmap


def _char_to_token(enc, b: int, chars: List[int]) -> Optional[int]:
    """First token found at any of `chars` (a span edge may sit on a space)."""
    for c in chars:
        if c < 0:
            continue
        tok = enc.char_to_token(b, c)
        if tok is not None:
            return tok
    return None
