"""The mask branch's pixel decoder: encoder memory at three strides (s, 2s, 4s; s = 8 for the usual
return_interm_indices [1, 2, 3]) fused top-down into `mask_dim`-channel mask features at stride s.

Facts from TAO's Mask Grounding DINO (`MaskHeadConv` without its unused FPN/RAFT options): 3x3 convolutions
`lay3` on the coarsest level, nearest upsample + add, `lay4`, upsample + add, `jia_dcn`, then `lay1`
(d -> d/4) and `lay2` (d/4 -> mask_dim), ReLU after each; kaiming-uniform (a=1) weights, zero biases. The names
are TAO's, so its checkpoints load as they are.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F


class MaskPixelDecoder(nn.Module):
    """forward([(B, d, H, W), (B, d, H/2, W/2), (B, d, H/4, W/4)]) -> (B, mask_dim, H, W), values >= 0;
    fuse(levels) -> the (B, d, H, W) map before the last two convolutions (the region head's pixel features),
    project(fused) -> forward's output."""

    def __init__(self, d: int, mask_dim: int = 8):
        super().__init__()
        if d % 4:
            raise ValueError(f"the mask pixel decoder needs model.hidden_dim divisible by 4, got {d}")
        self.lay3 = nn.Conv2d(d, d, 3, padding=1)
        self.lay4 = nn.Conv2d(d, d, 3, padding=1)
        self.jia_dcn = nn.Conv2d(d, d, 3, padding=1)
        self.lay1 = nn.Conv2d(d, d // 4, 3, padding=1)
        self.lay2 = nn.Conv2d(d // 4, mask_dim, 3, padding=1)
        for conv in (self.lay1, self.lay2, self.lay3, self.lay4, self.jia_dcn):
            nn.init.kaiming_uniform_(conv.weight, a=1)
            nn.init.zeros_(conv.bias)

    def fuse(self, levels: Sequence[torch.Tensor]) -> torch.Tensor:
        fine, middle, coarse = levels
        x = F.relu(self.lay3(coarse))
        x = F.relu(self.lay4(middle + F.interpolate(x, size=middle.shape[-2:], mode="nearest")))
        return F.relu(self.jia_dcn(fine + F.interpolate(x, size=fine.shape[-2:], mode="nearest")))

    def project(self, fused: torch.Tensor) -> torch.Tensor:
        return F.relu(self.lay2(F.relu(self.lay1(fused))))

    def forward(self, levels: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.project(self.fuse(levels))
