"""MAL post-processing: crop mask logits -> binary instance masks in full-image coordinates."""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
from torch import nn

from groundlab.ops.area_buckets import area_bucket
from groundlab.ops.paste import paste_mask


class MALPostProcessor(nn.Module):
    """forward(logits (N, 1, h, w), ext (N, 4), box (N, 4), size (N, 2) (H, W), area (N,)) ->
    [(mask (h', w') bool, (x1, y1, x2, y2) its place in the image)], one per box.

    The probabilities are resized to the crop's pixels, cut to the image and to the box, and thresholded
    at `mask_thres` (one value, or one per size bucket small/medium/large by box area, as TAO)."""

    def __init__(self, mask_thres: Sequence[float] = (0.1,)):
        super().__init__()
        thres = [float(t) for t in mask_thres]
        if len(thres) not in (1, 3):
            raise ValueError(f"model.mask_thres needs 1 value or 3 (small/medium/large), got {thres}")
        self.thres = thres * 3 if len(thres) == 1 else thres

    @torch.no_grad()
    def forward(self, logits, ext, box, size, area) -> List[Tuple[torch.Tensor, Tuple[int, int, int, int]]]:
        probs = logits.float().sigmoid()[:, 0].cpu()
        buckets = area_bucket(area.cpu())
        out = []
        for p, e, b, s, k in zip(probs, ext.tolist(), box.tolist(), size.tolist(), buckets.tolist()):
            region, place = paste_mask(p, e, b, int(s[0]), int(s[1]))
            out.append((region > self.thres[k], place))
        return out
