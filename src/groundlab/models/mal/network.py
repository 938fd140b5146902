"""MAL's student/teacher network: ViT features of a box crop -> one instance kernel (pooled features ->
MLP) and per-pixel mask features (4 convs, upsampled before the last); mask logits = kernel . features.

Scale-adaptive features (TAO `not_adjust_scale: false`): the ViT map is resized by 1/2, 1 or 2 for boxes
whose area in the original image is small (<= 32^2), medium (<= 96^2) or large, so a small object is
not segmented from more feature cells than it has pixels; all logits come out at 4x the ViT grid
(crop_size / 4 for patch 16)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from groundlab.models.mal.vit_backbone import ViTBackbone
from groundlab.ops.area_buckets import BUCKET_NAMES, area_bucket

class KernelHead(nn.Module):
    """(N, C, h, w) features -> (N, D) instance kernel: global mean pool, Linear-ReLU-Linear."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.mlp1 = nn.Linear(in_channels, out_channels)
        self.mlp2 = nn.Linear(out_channels, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp2(F.relu(self.mlp1(x.mean((2, 3)))))


class MaskFeatureHead(nn.Module):
    """(N, C, h, w) -> (N, D, h*r, w*r): `num_convs` 3x3 conv+ReLU; bilinear x`scale_ratio` before the last."""

    def __init__(self, in_channels: int, hidden: int, out_channels: int, num_convs: int = 4, scale_ratio: float = 2.0):
        super().__init__()
        if num_convs < 1:
            raise ValueError(f"model.mask_head_num_convs must be >= 1, got {num_convs}")
        self.scale_ratio = scale_ratio
        chans = [in_channels] + [hidden] * (num_convs - 1) + [out_channels]
        self.convs = nn.ModuleList(nn.Conv2d(chans[i], chans[i + 1], 3, padding=1) for i in range(num_convs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, conv in enumerate(self.convs):
            if i == len(self.convs) - 1 and self.scale_ratio != 1:
                h, w = x.shape[-2:]
                x = F.interpolate(x, (int(h * self.scale_ratio), int(w * self.scale_ratio)), mode="bilinear",
                                  align_corners=False)
            x = F.relu(conv(x))
        return x


class MALNetwork(nn.Module):
    """forward(images (N, 3, S, S) box crops, box_areas (N,) in original pixels) -> mask logits (N, 1, 4S/p, 4S/p)
    for patch size p (S/4 with patch 16)."""

    def __init__(self, arch: str, crop_size: int, hidden: int = 256, out_channels: int = 256, num_convs: int = 4,
                 mask_scale_ratio: float = 2.0, mask_scale_ratio_pre: float = 1.0, adjust_scale: bool = True,
                 drop_path_rate: float = 0.0, vit_overrides=None):
        super().__init__()
        self.backbone = ViTBackbone(arch, crop_size, drop_path_rate, vit_overrides)
        c = self.backbone.channels
        self.roi_head = KernelHead(c, out_channels)
        self.mask_head = MaskFeatureHead(c, hidden, out_channels, num_convs, mask_scale_ratio)
        self.adjust_scale, self.scale_pre = adjust_scale, float(mask_scale_ratio_pre)

    def _logits(self, feat: torch.Tensor, kernel: torch.Tensor, scale: float, out_size: Sequence[int]) -> torch.Tensor:
        h, w = feat.shape[-2:]
        size = (max(1, int(h * scale)), max(1, int(w * scale)))
        if size != (h, w):
            feat = F.interpolate(feat, size=size, mode="bilinear", align_corners=False)
        pixels = self.mask_head(feat)  # (n, D, h', w')
        logits = torch.einsum("nd,ndhw->nhw", kernel, pixels)[:, None]
        return F.interpolate(logits, size=tuple(out_size), mode="bilinear", align_corners=False)

    def forward(self, images: torch.Tensor, box_areas: torch.Tensor) -> torch.Tensor:
        feat = self.backbone(images)
        kernel = self.roi_head(feat)
        out_size = (feat.shape[-2] * 4, feat.shape[-1] * 4)
        if not self.adjust_scale:
            return self._logits(feat, kernel, self.scale_pre, out_size)
        buckets = area_bucket(box_areas)
        out = feat.new_zeros((feat.shape[0], 1) + out_size)
        for b in range(len(BUCKET_NAMES)):
            sel = (buckets == b).nonzero().flatten()
            if len(sel):
                logits = self._logits(feat[sel], kernel[sel], self.scale_pre * 2.0 ** (b - 1), out_size)
                out = out.index_put((sel,), logits.to(out.dtype))  # autocast: fp32 features, half-precision logits
        return out
