"""GroupNorm that accepts a group of a single value."""

from __future__ import annotations

import torch
from torch import nn


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm (same parameters, keys and numbers) that also normalizes a group holding one value.

    A small input gives 1x1 maps on the coarsest levels; with one channel per group (hidden_dim 32 and 32 groups)
    and a batch of 1, every group is a single value. torch.nn.functional.group_norm refuses that with BatchNorm's
    "Expected more than 1 value per channel when training" check, although the result is well defined: the value
    minus its mean is 0, so the output is the bias. This calls the same kernel without the check.
    x: (B, C, *) -> (B, C, *)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.group_norm(x, self.num_groups, self.weight, self.bias, self.eps,
                                torch.backends.cudnn.enabled)
