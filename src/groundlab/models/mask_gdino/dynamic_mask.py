"""CondInst dynamic mask convolutions: each query's controller output is the weights of its own three 1x1
convolutions, run over the shared mask features plus two relative-coordinate channels.

Parameter layout (TAO's Mask Grounding DINO, so its controller weights mean the same here): for mask_dim
feature channels and 8 dynamic channels, a query's vector is [w0 (8 x (2 + mask_dim)), w1 (8 x 8), w2 (1 x 8),
b0 (8), b1 (8), b2 (1)], each weight matrix out-major; the input channels are (x, y) relative coordinates
first, then the mask features. Relative coordinates are in input-image pixels: the query's reference point
(the centre of the box that its decoder layer refines) minus each feature cell's centre, unnormalized as in TAO.
Mask logits come out at the feature stride and are upsampled to stride 4 with CondInst's aligned bilinear.

Everything here is parameter-free plain torch, so training (matched queries), inference (selected queries) and
an exported graph share it.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import torch
from torch import Tensor
from torch.nn import functional as F

DYNAMIC_CHANNELS = 8
MASK_OUT_STRIDE = 4


def param_sizes(mask_dim: int, channels: int = DYNAMIC_CHANNELS) -> Tuple[List[int], List[int]]:
    """(weight sizes, bias sizes) of the three dynamic convolutions."""
    return [(mask_dim + 2) * channels, channels * channels, channels], [channels, channels, 1]


def num_dynamic_params(mask_dim: int, channels: int = DYNAMIC_CHANNELS) -> int:
    """Length of a query's controller output (169 for TAO's mask_dim 8)."""
    weights, biases = param_sizes(mask_dim, channels)
    return sum(weights) + sum(biases)


def split_params(params: Tensor, mask_dim: int, channels: int = DYNAMIC_CHANNELS) -> List[Tuple[Tensor, Tensor]]:
    """(K, P) controller outputs -> per layer (weight (K, out, in), bias (K, out, 1))."""
    weights, biases = param_sizes(mask_dim, channels)
    parts = torch.split(params, weights + biases, dim=1)
    ins = [mask_dim + 2, channels, channels]
    outs = [channels, channels, 1]
    # -1, not K: a traced graph (ONNX export of every query's mask) keeps K = batch x queries dynamic
    return [(parts[i].reshape(-1, outs[i], ins[i]), parts[3 + i].reshape(-1, outs[i], 1)) for i in range(3)]


def cell_centres(h: int, w: int, stride: int, device, dtype) -> Tensor:
    """(2, h * w) pixel (x, y) of each feature cell's centre, row-major."""
    ys = torch.arange(h, device=device, dtype=dtype) * stride + stride // 2
    xs = torch.arange(w, device=device, dtype=dtype) * stride + stride // 2
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x.reshape(-1), grid_y.reshape(-1)])


def aligned_bilinear(x: Tensor, factor: int) -> Tensor:
    """(N, C, H, W) -> (N, C, factor H, factor W), the CondInst upsampling whose output pixel centres stay
    aligned with the input's (replicate-pad one row/column, align-corners resize, shift by factor // 2)."""
    if factor == 1:
        return x
    h, w = x.shape[-2:]
    x = F.pad(x, (0, 1, 0, 1), mode="replicate")
    x = F.interpolate(x, size=(factor * h + 1, factor * w + 1), mode="bilinear", align_corners=True)
    x = F.pad(x, (factor // 2, 0, factor // 2, 0), mode="replicate")
    return x[:, :, : factor * h, : factor * w]


def query_masks(outputs: Dict[str, Tensor], batch_idx: Tensor, query_idx: Tensor) -> Tensor:
    """Stride-4 mask logits (K, H4, W4) of queries `query_idx` of images `batch_idx` (both (K,) long).

    outputs: one decoder layer's {"mask_params": (B, Q, P), "mask_refs": (B, Q, 2) normalized (x, y)} plus the
    shared {"mask_features": (B, mask_dim, H, W) at stride "mask_stride" (int), "image_sizes": (B, 2) float
    (h, w) of each unpadded input image}. H4 = H * mask_stride / 4."""
    features = outputs["mask_features"]
    stride = int(outputs["mask_stride"])
    mask_dim = features.shape[1]
    B, _, H, W = features.shape
    K = int(batch_idx.numel())
    if K == 0:
        factor = stride // MASK_OUT_STRIDE
        # keep the head in the graph (zero gradient) so DDP, which expects every parameter, does not fail
        zero = 0.0 * (outputs["mask_params"].sum() + features.sum())
        return features.new_zeros(0, H * factor, W * factor) + zero
    params = outputs["mask_params"][batch_idx, query_idx].float()
    sizes_wh = outputs["image_sizes"].flip(-1).to(params)  # (B, 2) as (w, h)
    centres = outputs["mask_refs"][batch_idx, query_idx].float() * sizes_wh[batch_idx]
    grid = cell_centres(H, W, stride, features.device, params.dtype)  # (2, HW)
    x = torch.cat([centres[:, :, None] - grid[None], features[batch_idx].flatten(2).to(params)], 1)  # (K, 2+C, HW)
    layers = split_params(params, mask_dim)
    for i, (weight, bias) in enumerate(layers):
        x = torch.baddbmm(bias, weight, x)
        if i < len(layers) - 1:
            x = F.relu(x)
    logits = x.view(-1, 1, H, W)  # K, kept symbolic for traced graphs
    return aligned_bilinear(logits, stride // MASK_OUT_STRIDE)[:, 0]
