"""The contrastive classification head: query features scored against text token features."""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import nn


class ContrastiveEmbed(nn.Module):
    """logits[b, q, t] = <query_q, token_t>, scaled and shifted as MM-Grounding-DINO allows, -inf on padding
    tokens, padded with -inf up to max_text_len.

    log_scale: None (IDEA: raw dot product), "auto" (divide by sqrt(C), as attention does) or a number
    (learnable log-scale initialised to it: logits * exp(log_scale)). bias: a learnable bias initialised to
    the focal-loss prior 0.01, so untrained logits start near "nothing here" instead of at +-100.
    query: (B, Q, C); text: (B, L, C); text_token_mask: (B, L) True on real tokens -> (B, Q, max_text_len)."""

    def __init__(self, max_text_len: int = 256, log_scale: Optional[Union[float, str]] = None, bias: bool = False):
        super().__init__()
        self.max_text_len = max_text_len
        if log_scale is not None and log_scale != "auto" and not isinstance(log_scale, (int, float)):
            raise ValueError(f"model.log_scale={log_scale!r}: use null, auto or a number")
        self.auto_scale = log_scale == "auto"
        self.log_scale = (nn.Parameter(torch.tensor([float(log_scale)]))
                          if log_scale is not None and not self.auto_scale else None)
        # prior probability 0.01 for every token at the start of training (focal-loss init)
        self.bias = nn.Parameter(torch.tensor([-math.log((1 - 0.01) / 0.01)])) if bias else None

    def forward(self, query: torch.Tensor, text: torch.Tensor, text_token_mask: torch.Tensor) -> torch.Tensor:
        res = query @ text.transpose(-1, -2)
        if self.auto_scale:
            res = res / math.sqrt(query.shape[-1])
        if self.log_scale is not None:
            res = res * self.log_scale.exp()
        if self.bias is not None:
            res = res + self.bias
        res = res.masked_fill(~text_token_mask[:, None, :], float("-inf"))
        pad = self.max_text_len - res.shape[-1]
        if pad > 0:
            res = torch.cat([res, res.new_full((*res.shape[:-1], pad), float("-inf"))], -1)
        return res
