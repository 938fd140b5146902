"""Mean-field CRF that turns a soft mask into MAL's pseudo-label: colour affinities between each pixel
and its k x k neighbours, iterated label updates confined to the box, thresholded at 0.5."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class MeanFieldCRF(nn.Module):
    """forward(image (B, C, H, W) normalised, prob (B, H, W) in [0, 1], box (B, H, W) in [0, 1])
    -> (B, H, W) float 0/1 pseudo mask.

    Affinity w_k = exp(-|I_k - I_0|^2 / (2 zeta^2)) over the k x k window (centre included). Each
    iteration sets q_fg ∝ box * exp(-sum_k w_k (-log q_fg,k)), q_bg ∝ exp(-sum_k w_k (-log q_bg,k)): a
    pixel leans to the label its similar-coloured neighbours hold confidently. q is clamped to
    [low, high] so one confident pixel cannot freeze its neighbourhood. Runs without gradients."""

    def __init__(self, kernel_size: int = 3, zeta: float = 0.1, num_iter: int = 100, low: float = 0.1,
                 high: float = 0.9):
        super().__init__()
        if kernel_size % 2 != 1 or kernel_size < 1:
            raise ValueError(f"train.crf_kernel_size must be odd and positive, got {kernel_size}")
        if not 0.0 < low < high < 1.0:
            raise ValueError(f"train.crf_value_low_thres/high_thres must satisfy 0 < low < high < 1, got {low}/{high}")
        self.k, self.zeta, self.num_iter, self.low, self.high = int(kernel_size), zeta, num_iter, low, high

    def affinity(self, image: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, k*k, H*W) colour affinities of every pixel to its window (replicated edges)."""
        b, c, h, w = image.shape
        pad = self.k // 2
        padded = F.pad(image, (pad,) * 4, mode="replicate")
        windows = F.unfold(padded, self.k).view(b, c, self.k * self.k, h * w)
        dist = (windows - image.reshape(b, c, 1, h * w)).pow(2).sum(1)
        return torch.exp(-dist / (2 * self.zeta ** 2))

    @torch.no_grad()
    def forward(self, image: torch.Tensor, prob: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
        b, h, w = prob.shape
        kernel = self.affinity(image.float())
        log_box = torch.log(box.float().clamp_min(1e-6)).reshape(b, h * w)
        q = (prob.float() * box.float()).clamp(self.low, self.high)
        pad = self.k // 2
        for _ in range(self.num_iter):
            nll = torch.stack([-torch.log1p(-q), -torch.log(q)], 1)  # (B, 2, H, W): background, foreground
            windows = F.unfold(F.pad(nll, (pad,) * 4, mode="replicate"), self.k).view(b, 2, self.k * self.k, h * w)
            energy = (windows * kernel[:, None]).sum(2)  # (B, 2, H*W)
            # q_fg = e^-E_fg * box / (e^-E_fg * box + e^-E_bg), computed stably as a sigmoid
            q = torch.sigmoid(energy[:, 0] - energy[:, 1] + log_box).reshape(b, h, w).clamp(self.low, self.high)
        return (q > 0.5).float()
