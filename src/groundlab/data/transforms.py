"""Image + target transforms that keep boxes and masks aligned (DETR / Grounding DINO recipe).

A transform maps (image, target, rng) -> (image, target):
  image:  (3, H, W) float32 tensor, 0..255 until Normalize, then mean/std normalized.
  target: dict with "boxes" (N, 4) float xyxy pixels (normalized cxcywh after Normalize), optional
          "masks" (N, H, W) bool, and per-box tensors under PER_BOX_KEYS filtered together with boxes.
          Boxes that a crop makes degenerate are dropped and counted in target["num_dropped"]. Every other
          key passes through untouched: "orig_size", "image_id", and a referring expression's "empty" and
          "vg_union" ((H0, W0) bool at the original image size, what VG metrics compare against).
  rng:    np.random.Generator of the sample, so augmentation is reproducible in any worker.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from groundlab.ops.boxes import box_xyxy_to_cxcywh

Target = Dict[str, torch.Tensor]
PER_BOX_KEYS = ("boxes", "masks", "labels", "phrase_ids", "iscrowd", "areas")


def resized_hw(h: int, w: int, size: int, max_size: Optional[int]) -> Tuple[int, int]:
    """(h, w) with the shorter side at `size`, shrunk so the longer side stays <= max_size."""
    if max_size is not None:
        short, long = min(h, w), max(h, w)
        if long / short * size > max_size:
            size = int(round(max_size * short / long))
    if h <= w:
        return size, max(1, int(round(size * w / h)))
    return max(1, int(round(size * h / w))), size


def resize(image: torch.Tensor, target: Target, hw: Tuple[int, int]) -> Tuple[torch.Tensor, Target]:
    """Resize to exactly hw=(h, w): bilinear (antialiased) image, nearest(-exact) masks, scaled boxes."""
    h0, w0 = image.shape[-2:]
    h, w = hw
    if (h, w) == (h0, w0):
        return image, target
    image = F.interpolate(image[None], size=(h, w), mode="bilinear", antialias=True, align_corners=False)[0]
    target = dict(target)
    if "boxes" in target:
        scale = torch.tensor([w / w0, h / h0, w / w0, h / h0], dtype=target["boxes"].dtype)
        target["boxes"] = target["boxes"] * scale
    if "masks" in target and target["masks"].numel():
        # "nearest-exact" samples at pixel centres, as the image's resize and the box scaling do; legacy "nearest"
        # (floor(i * in / out)) shifts masks right/down by up to half an output pixel per resize (about 0.5 px on
        # average, up to ~3 px after the training transform's two resizes; tests/test_mgd_data.py)
        target["masks"] = F.interpolate(target["masks"][None].float(), size=(h, w), mode="nearest-exact")[0] > 0.5
    elif "masks" in target:
        target["masks"] = target["masks"].new_zeros((0, h, w))
    return image, target


def _keep(target: Target, keep: torch.Tensor) -> Target:
    n = int(keep.numel())
    out = {k: (v[keep] if k in PER_BOX_KEYS and torch.is_tensor(v) and len(v) == n else v) for k, v in target.items()}
    out["num_dropped"] = target.get("num_dropped", 0) + int((~keep).sum())
    return out


def crop(image: torch.Tensor, target: Target, top: int, left: int, h: int, w: int) -> Tuple[torch.Tensor, Target]:
    """Crop region (top, left, h, w); boxes clipped; boxes left without area (or mask) dropped."""
    image = image[:, top : top + h, left : left + w]
    target = dict(target)
    boxes = target["boxes"] - torch.tensor([left, top, left, top], dtype=target["boxes"].dtype)
    boxes = torch.minimum(boxes.clamp(min=0), torch.tensor([w, h, w, h], dtype=boxes.dtype))
    target["boxes"] = boxes
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    if "masks" in target:
        target["masks"] = target["masks"][:, top : top + h, left : left + w]
        keep &= target["masks"].flatten(1).any(1) if len(keep) else keep
    return image, _keep(target, keep)


class Compose:
    def __init__(self, transforms: Sequence):
        self.transforms = list(transforms)

    def __call__(self, image, target, rng):
        for t in self.transforms:
            image, target = t(image, target, rng)
        return image, target


class RandomResize:
    """Shorter side drawn from `sizes`, longer side capped at `max_size`."""

    def __init__(self, sizes: Sequence[int], max_size: Optional[int] = None):
        self.sizes, self.max_size = list(sizes), max_size

    def __call__(self, image, target, rng):
        size = self.sizes[int(rng.integers(len(self.sizes)))]
        return resize(image, target, resized_hw(*image.shape[-2:], size, self.max_size))


class FixedResize:
    """Exactly (height, width), aspect not kept: the static input shape of exported engines."""

    def __init__(self, height: int, width: int):
        self.hw = (height, width)

    def __call__(self, image, target, rng):
        return resize(image, target, self.hw)


class RandomSizeCrop:
    """Crop of random size in [min_size, max_size] per side (capped by the image), random place."""

    def __init__(self, min_size: int, max_size: int):
        self.min_size, self.max_size = min_size, max_size

    def __call__(self, image, target, rng):
        H, W = image.shape[-2:]
        w = int(rng.integers(min(self.min_size, W), min(W, self.max_size) + 1))
        h = int(rng.integers(min(self.min_size, H), min(H, self.max_size) + 1))
        top, left = int(rng.integers(0, H - h + 1)), int(rng.integers(0, W - w + 1))
        return crop(image, target, top, left, h, w)


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, image, target, rng):
        if rng.random() >= self.p:
            return image, target
        W = image.shape[-1]
        target = dict(target)
        b = target["boxes"]
        target["boxes"] = torch.stack([W - b[:, 2], b[:, 1], W - b[:, 0], b[:, 3]], 1)
        if "masks" in target:
            target["masks"] = target["masks"].flip(-1)
        return image.flip(-1), target


class RandomSelect:
    """`first` with probability p, else `second` (DETR's resize vs resize-crop-resize branch)."""

    def __init__(self, first, second, p: float = 0.5):
        self.first, self.second, self.p = first, second, p

    def __call__(self, image, target, rng):
        return (self.first if rng.random() < self.p else self.second)(image, target, rng)


class Normalize:
    """Image to (x/255 - mean)/std; boxes to normalized cxcywh; records target["size"] = (h, w)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean = torch.tensor(mean, dtype=torch.float32)[:, None, None] * 255.0
        self.std = torch.tensor(std, dtype=torch.float32)[:, None, None] * 255.0

    def __call__(self, image, target, rng):
        h, w = image.shape[-2:]
        image = (image - self.mean) / self.std
        target = dict(target)
        target["boxes"] = box_xyxy_to_cxcywh(target["boxes"]) / torch.tensor([w, h, w, h], dtype=torch.float32)
        target["size"] = torch.tensor([h, w])
        return image, target


def build_train_transforms(aug) -> Compose:
    """Multi-scale resize, or resize -> random crop -> multi-scale resize; flip; normalize (TAO keys)."""
    scales: List[int] = list(aug.scales)
    return Compose([
        RandomHorizontalFlip(aug.horizontal_flip_prob),
        RandomSelect(
            RandomResize(scales, aug.random_resize_max_size),
            Compose([
                RandomResize(list(aug.train_random_resize)),
                RandomSizeCrop(aug.train_random_crop_min, aug.train_random_crop_max),
                RandomResize(scales, aug.random_resize_max_size),
            ]),
        ),
        Normalize(aug.input_mean, aug.input_std),
    ])


def build_eval_transforms(aug) -> Compose:
    """Shorter side at test_random_resize (longer capped), or exactly fixed_input_size when set."""
    if aug.fixed_input_size:
        first = FixedResize(*aug.fixed_input_size)
    else:
        first = RandomResize([aug.test_random_resize], aug.random_resize_max_size)
    return Compose([first, Normalize(aug.input_mean, aug.input_std)])
