"""GroupNorm that accepts a group of a single value."""

from __future__ import annotations

import math

import torch
from torch import nn


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm (same parameters, keys and numbers) that also normalizes a group holding one value.

    A small input gives 1x1 maps on the coarsest levels; with one channel per group (hidden_dim 32 and 32 groups)
    every group is a single value. torch.nn.functional.group_norm refuses that for a batch of 1 with BatchNorm's
    "Expected more than 1 value per channel when training" check, although the result is well defined: the value
    minus its mean is 0, so the output is the bias. It is returned as such: computing it divides a rounding error
    by sqrt(eps), which onnxruntime's kernel does not round as torch's does (outputs 1e-5 apart, amplified
    downstream). The branch depends on shapes only, fixed in an exported graph. x: (B, C, *) -> (B, C, *)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.shape[1] // self.num_groups) * math.prod(x.shape[2:]) == 1:
            bias = self.bias if self.affine else torch.zeros(x.shape[1], dtype=x.dtype, device=x.device)
            return bias.view(1, -1, *([1] * (x.dim() - 2))).expand_as(x)
        return super().forward(x)
