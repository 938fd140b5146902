"""Transforms keep boxes and masks aligned: after every transform, each box is the tight box of its mask."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from groundlab.config.schema_dataset import AugmentationConfig
from groundlab.data.transforms import (
    Compose, FixedResize, Normalize, RandomHorizontalFlip, RandomResize, RandomSizeCrop, build_eval_transforms,
    build_train_transforms, crop, resized_hw,
)


def scene(h=120, w=160, n=4, seed=0):
    """Image, and target whose boxes are the exact (x2/y2 exclusive) bounds of rectangular masks."""
    rng = np.random.default_rng(seed)
    masks = torch.zeros(n, h, w, dtype=torch.bool)
    boxes = []
    for k in range(n):
        x1, y1 = int(rng.integers(0, w - 30)), int(rng.integers(0, h - 30))
        x2, y2 = x1 + int(rng.integers(10, 30)), y1 + int(rng.integers(10, 30))
        masks[k, y1:y2, x1:x2] = True
        boxes.append([x1, y1, x2, y2])
    image = torch.rand(3, h, w) * 255
    return image, {"boxes": torch.tensor(boxes, dtype=torch.float32), "masks": masks,
                   "labels": torch.arange(n), "phrase_ids": torch.arange(n)}


def mask_boxes(masks):
    out = []
    for m in masks:
        ys, xs = torch.nonzero(m, as_tuple=True)
        out.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    return torch.tensor(out, dtype=torch.float32).reshape(-1, 4)


@pytest.mark.parametrize("transform, tol", [
    (RandomHorizontalFlip(1.0), 0.0),
    (RandomResize([60, 200], max_size=400), 1.0),
    (FixedResize(96, 64), 1.0),
    (RandomSizeCrop(50, 100), 0.0),
])
def test_boxes_follow_masks(transform, tol):
    for seed in range(10):
        image, target = scene(seed=seed)
        out_img, out = transform(image, target, np.random.default_rng(seed))
        assert out["masks"].shape[1:] == out_img.shape[1:]
        assert len(out["boxes"]) == len(out["masks"]) == len(out["labels"])
        assert torch.allclose(out["boxes"], mask_boxes(out["masks"]), atol=tol)


def test_flip_moves_pixels_with_boxes():
    image, target = scene()
    out_img, out = RandomHorizontalFlip(1.0)(image, target, np.random.default_rng(0))
    assert torch.equal(out_img, image.flip(-1))
    assert torch.equal(out["boxes"][:, [0, 2]], 160 - target["boxes"][:, [2, 0]])


def test_resized_hw_caps_long_side():
    assert resized_hw(480, 640, 800, 1333) == (800, 1067)
    assert resized_hw(100, 1000, 800, 1333) == (133, 1330)  # DETR: short side rounded first
    assert resized_hw(640, 480, 600, None) == (800, 600)


def test_crop_drops_and_counts_boxes_outside():
    image, target = scene()
    target["boxes"][0] = torch.tensor([0, 0, 10, 10.0])
    target["masks"][0] = False
    target["masks"][0, :10, :10] = True
    _, out = crop(image, target, 50, 50, 60, 60)
    assert out["num_dropped"] >= 1
    assert len(out["boxes"]) == 4 - out["num_dropped"]
    assert (out["boxes"] >= 0).all() and (out["boxes"][:, 2:] <= 60).all()


def test_normalize_gives_cxcywh_normalized():
    image, target = scene()
    out_img, out = Normalize([0.5] * 3, [0.25] * 3)(image, target, None)
    b, t = target["boxes"], out["boxes"]
    assert torch.allclose(t[:, 0] * 160, (b[:, 0] + b[:, 2]) / 2)
    assert torch.allclose(t[:, 3] * 120, b[:, 3] - b[:, 1])
    assert torch.allclose(out_img, (image / 255 - 0.5) / 0.25, atol=1e-5)
    assert out["size"].tolist() == [120, 160]


def test_train_pipeline_is_seeded_and_respects_scales():
    aug = OmegaConf.structured(AugmentationConfig(scales=[64, 80], train_random_resize=[70], train_random_crop_min=40,
                                                  train_random_crop_max=60, random_resize_max_size=200))
    t = build_train_transforms(aug)
    image, target = scene()
    sizes = set()
    for seed in range(12):
        a_img, a = t(image, target, np.random.default_rng(seed))
        b_img, b = t(image, target, np.random.default_rng(seed))
        assert torch.equal(a_img, b_img) and torch.equal(a["boxes"], b["boxes"])
        assert min(a_img.shape[1:]) in (64, 80)
        sizes.add(tuple(a_img.shape[1:]))
        assert ((a["boxes"] >= 0) & (a["boxes"] <= 1)).all()
    assert len(sizes) > 1


def test_eval_pipeline_fixed_input_size():
    aug = OmegaConf.structured(AugmentationConfig(fixed_input_size=[64, 96]))
    img, out = build_eval_transforms(aug)(*scene(), np.random.default_rng(0))
    assert img.shape == (3, 64, 96) and out["masks"].shape[1:] == (64, 96)
    aug = OmegaConf.structured(AugmentationConfig(test_random_resize=60))
    img, _ = build_eval_transforms(aug)(*scene(), np.random.default_rng(0))
    assert img.shape == (3, 60, 80)


def test_compose_order():
    image, target = scene()
    img, out = Compose([FixedResize(60, 80), RandomHorizontalFlip(1.0)])(image, target, np.random.default_rng(0))
    assert img.shape == (3, 60, 80) and torch.allclose(out["boxes"], mask_boxes(out["masks"]), atol=1.0)
