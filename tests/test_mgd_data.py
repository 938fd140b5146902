"""Mask Grounding DINO's data: masks checked on every record before training (file and record named), RLE sizes
checked against their image, images without objects as samples with (0, H, W) masks, and every transform plus
the collate keeping each mask on its box."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
import torch

from conftest import SMALL_SYNTHETIC
from groundlab.data.build import build_grounding_dataset
from groundlab.data.collate import GroundingCollator
from groundlab.data.sources import synthetic_paths
from groundlab.data.transforms import (
    FixedResize, Normalize, RandomHorizontalFlip, RandomResize, RandomSizeCrop, build_train_transforms,
)
from groundlab.errors import DataError
from groundlab.ops.boxes import box_cxcywh_to_xyxy

MGD = SMALL_SYNTHETIC + ["model=mask_gdino"]


@pytest.fixture(scope="module")
def paths(compose):
    cfg = compose(MGD)
    return synthetic_paths(cfg.dataset, cfg.cache_dir)


def _train_cfg(compose, paths, json_file):
    label_map = f", label_map: {paths.label_map}" if json_file.endswith(".jsonl") else ""
    return compose(MGD + ["dataset.type=odvg", "dataset.train_data_sources="
                          f"[{{image_dir: {paths.train_images}, json_file: {json_file}{label_map}}}]"])


def _rewrite_jsonl(src, dst, edit):
    """Copy an ODVG file, `edit(line_number, record)` changing records in place."""
    with open(src) as f, open(dst, "w") as out:
        for lineno, line in enumerate(f, 1):
            rec = json.loads(line)
            edit(lineno, rec)
            out.write(json.dumps(rec) + "\n")
    return str(dst)


def _instances(rec):
    return rec["detection"]["instances"]


def _lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


# ------------------------------------------------------------------------------------------- checked up front


def test_records_lacking_masks_fail_before_training_naming_file_and_record(compose, paths, tmp_path):
    lines = _lines(paths.train_odvg)
    partial = next(i for i, r in enumerate(lines, 1) if len(_instances(r)) >= 2)  # some masks, not all
    bare = next(i for i, r in enumerate(lines, 1) if i > partial)  # no mask at all

    def edit(lineno, rec):
        if lineno == partial:
            del _instances(rec)[0]["mask"]
        if lineno == bare:
            for inst in _instances(rec):
                del inst["mask"]

    path = _rewrite_jsonl(paths.train_odvg, tmp_path / "train.jsonl", edit)
    n = len(_instances(lines[partial - 1]))
    with pytest.raises(DataError) as err:
        build_grounding_dataset(_train_cfg(compose, paths, path), "train", augment=True)
    assert str(err.value) == (
        f"{path}:{partial}: model=mask_gdino needs a mask on every box, but this record has masks on only "
        f"{n - 1} of its {n} boxes, and 1 other record of dataset.train_data_sources lacks masks too (1 in {path})")
    assert err.value.where == f"{path}:{partial}"

    # only the bare record: named as having none
    path = _rewrite_jsonl(paths.train_odvg, tmp_path / "bare.jsonl", lambda i, r: edit(i, r) if i == bare else None)
    with pytest.raises(DataError, match=re.escape(f"{path}:{bare}: model=mask_gdino needs a mask on every box, "
                                                  "but this record has no mask on")):
        build_grounding_dataset(_train_cfg(compose, paths, path), "train", augment=True)


def test_coco_record_with_a_box_without_segmentation_is_named(compose, paths, tmp_path):
    with open(paths.train_coco) as f:
        data = json.load(f)
    ann = data["annotations"][3]
    del ann["segmentation"]
    path = str(tmp_path / "train.json")
    with open(path, "w") as f:
        json.dump(data, f)
    image = next(img for img in data["images"] if img["id"] == ann["image_id"])
    with pytest.raises(DataError, match=re.escape(f"{path}: image id {image['id']} ({image['file_name']}): "
                                                  "model=mask_gdino needs a mask on every box, but this record has")):
        build_grounding_dataset(_train_cfg(compose, paths, path), "train", augment=True)


def test_source_without_any_mask_is_named(compose, paths):
    cfg = _train_cfg(compose, paths, paths.train_coco_boxes)
    with pytest.raises(DataError, match=re.escape(f"['{paths.train_coco_boxes}'] carry no instance masks")):
        build_grounding_dataset(cfg, "train", augment=True)


def test_mask_size_mismatch_is_named(compose, paths, tmp_path):
    def edit(lineno, rec):
        if lineno == 2:
            _instances(rec)[0]["mask"]["size"] = [80, 64]  # (width, height): a transposed export

    path = _rewrite_jsonl(paths.train_odvg, tmp_path / "train.jsonl", edit)
    with pytest.raises(DataError) as err:
        build_grounding_dataset(_train_cfg(compose, paths, path), "train", augment=True)
    assert str(err.value) == (f"{path}:2 (instance 0): mask RLE size [80, 64] (height, width) differs from the "
                              "image's height/width [64, 80]")

    with open(paths.train_coco) as f:
        data = json.load(f)
    ann = data["annotations"][0]
    ann["segmentation"]["size"] = [32, 40]
    path = str(tmp_path / "train.json")
    with open(path, "w") as f:
        json.dump(data, f)
    image = next(img for img in data["images"] if img["id"] == ann["image_id"])
    with pytest.raises(DataError) as err:
        build_grounding_dataset(_train_cfg(compose, paths, path), "train", augment=True)
    assert str(err.value) == (f"{path}: image id {image['id']} ({image['file_name']}), annotation id {ann['id']}: "
                              "mask RLE size [32, 40] (height, width) differs from the image's height/width [64, 80]")


def test_validation_file_needs_segmentations_for_segm_evaluation(compose, paths, tmp_path):
    with open(paths.val_coco) as f:
        data = json.load(f)
    for ann in data["annotations"][2:5]:
        ann["segmentation"] = []
    path = str(tmp_path / "val.json")
    with open(path, "w") as f:
        json.dump(data, f)
    cfg = compose(MGD + [f"dataset.val_data_sources.image_dir={paths.val_images}",
                         f"dataset.val_data_sources.json_file={path}", "dataset.type=coco"])
    first = data["annotations"][2]
    with pytest.raises(DataError) as err:
        build_grounding_dataset(cfg, "val", augment=False)
    assert str(err.value) == (
        f"{path}: model=mask_gdino validates masks (COCO segm evaluation), which needs a segmentation on every "
        f"annotation, but annotation id {first['id']} (image id {first['image_id']}) has none (2 other annotations too)")

    del data["images"][1]["height"]
    with open(path, "w") as f:
        json.dump(data, f)
    with pytest.raises(DataError, match=re.escape(f"{path}: model=mask_gdino validates masks (COCO segm evaluation), "
                                                  f"which needs height and width on every image, but image id "
                                                  f"{data['images'][1]['id']}")):
        build_grounding_dataset(cfg, "val", augment=False)


def test_image_without_objects_is_a_sample_with_no_masks(compose, paths, tmp_path):
    def edit(lineno, rec):
        if lineno in (1, 3):
            rec["detection"]["instances"] = []

    path = _rewrite_jsonl(paths.train_odvg, tmp_path / "train.jsonl", edit)
    ds, collate = build_grounding_dataset(_train_cfg(compose, paths, path), "train", augment=True)
    for epoch in range(4):  # both branches of the training transform (resize, or resize-crop-resize)
        ds.set_epoch(epoch)
        items = [ds[i] for i in range(4)]
        batch = collate(items)
        for b, (item, target) in enumerate(zip(items, batch["targets"])):
            h, w = item["image"].shape[1:]
            assert target["masks"].shape == (len(target["boxes"]), h, w)
            assert target["masks"].dtype == torch.bool
            if b in (0, 2):
                assert target["masks"].shape == (0, h, w) and target["positive_map"].shape[0] == 0
        assert batch["images"].shape[0] == 4


# ------------------------------------------------------------------------------------- masks stay on boxes


def _tight_box(mask):
    """[x1, y1, x2, y2] around a (H, W) bool mask's pixels, x2/y2 exclusive (the readers' convention)."""
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)


def _pixel_boxes(target, hw):
    """Boxes as xyxy pixels of an image of size hw, before or after Normalize."""
    if "size" not in target:
        return target["boxes"]
    h, w = hw
    return box_cxcywh_to_xyxy(target["boxes"]) * torch.tensor([w, h, w, h])


def _assert_masks_fit_boxes(image, target, tol, rectangles=()):
    """Each mask has its image's (H, W), pixels, and a tight box equal to its box within `tol` pixels. A box that
    touches the image border may have been clipped by a crop, and a shape cut by a crop keeps its clipped (looser)
    box: there the mask's box only has to lie inside it, except for rectangles, whose cut stays tight.
    Returns the (tight box - box) differences that were compared for equality, (K, 4)."""
    H, W = image.shape[-2:]
    masks, boxes = target["masks"], _pixel_boxes(target, (H, W))
    assert masks.dtype == torch.bool and masks.shape == (len(boxes), H, W)
    compared = []
    for mask, box, kind in zip(masks, boxes, target["labels"].tolist()):
        assert mask.any()
        tight = _tight_box(mask)
        on_border = bool((box[:2] <= 1).any() or box[2] >= W - 1 or box[3] >= H - 1)
        if kind in rectangles or not on_border:
            assert (tight - box).abs().max() <= tol, (tight, box)
            compared.append(tight - box)
        else:
            assert (tight[:2] >= box[:2] - tol).all() and (tight[2:] <= box[2:] + tol).all(), (tight, box)
    return torch.stack(compared) if compared else torch.zeros(0, 4)


RECT, ELLIPSE = 0, 1


def _scene(seed=0, hw=(90, 120), n=5):
    """An image with n filled rectangles and ellipses: target with masks and their tight boxes (xyxy pixels),
    labels = RECT | ELLIPSE."""
    rng = np.random.default_rng(seed)
    H, W = hw
    yy, xx = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    masks, labels = [], []
    for i in range(n):
        rh, rw = int(rng.integers(8, 20)), int(rng.integers(8, 24))
        cy, cx = int(rng.integers(rh + 1, H - rh - 1)), int(rng.integers(rw + 1, W - rw - 1))
        if i % 2 == 0:
            m = ((yy - cy).abs() < rh) & ((xx - cx).abs() < rw)
        else:
            m = ((yy - cy) / rh) ** 2 + ((xx - cx) / rw) ** 2 <= 1.0
        masks.append(m)
        labels.append(i % 2)
    masks = torch.stack(masks)
    target = {"boxes": torch.stack([_tight_box(m) for m in masks]), "masks": masks,
              "labels": torch.tensor(labels), "iscrowd": torch.zeros(n, dtype=torch.long), "num_dropped": 0}
    image = torch.rand(3, H, W, generator=torch.Generator().manual_seed(seed)) * 255
    return image, target


MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
EXACT = 1e-3  # float rounding only
NEAREST = 2  # nearest-neighbour resampling: a thin tip of a shape may fall between the sampled pixels
TRANSFORMS = {
    "flip": (RandomHorizontalFlip(1.0), EXACT),
    "resize_down": (RandomResize([45, 60], max_size=200), NEAREST),
    "resize_up": (RandomResize([150, 200], max_size=300), NEAREST),
    "crop": (RandomSizeCrop(40, 80), EXACT),
    "fixed_resize": (FixedResize(64, 160), NEAREST),  # aspect changed
    "normalize": (Normalize(MEAN, STD), EXACT),
}


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_each_transform_keeps_masks_on_boxes(name):
    transform, tol = TRANSFORMS[name]
    for seed in range(6):
        image, target = _scene(seed)
        _assert_masks_fit_boxes(image, target, 0, rectangles=(RECT, ELLIPSE))  # the scene itself is tight
        out_image, out = transform(image, target, np.random.default_rng(seed))
        if name == "crop":  # shapes cut by the crop: only rectangles stay tight (see _assert_masks_fit_boxes)
            _assert_masks_fit_boxes(out_image, out, tol, rectangles=(RECT,))
        else:
            _assert_masks_fit_boxes(out_image, out, tol, rectangles=(RECT, ELLIPSE))
            assert len(out["boxes"]) == len(target["boxes"])
        if name == "flip":
            assert torch.equal(out["masks"], target["masks"].flip(-1))


def test_training_transform_and_collate_keep_masks_on_boxes(compose):
    aug = compose(MGD).dataset.augmentation
    transform = build_train_transforms(aug)
    items, differences = [], []
    for seed in range(24):  # both branches of RandomSelect, flips and crops of every size
        image, target = _scene(seed)
        out_image, out = transform(image, target, np.random.default_rng(seed))
        differences.append(_assert_masks_fit_boxes(out_image, out, NEAREST, rectangles=(RECT,)))
        items.append({"image": out_image, "target": out, "prompt": None, "prompt_class_ids": [],
                      "source": 0, "file_name": f"{seed}.jpg", "where": f"scene {seed}"})
    # no drift either: resized masks are not shifted against their boxes on average (legacy "nearest"
    # interpolation moved them ~0.5 px right/down)
    assert torch.cat(differences).mean(0).abs().max() < 0.2
    items = items[:12]
    batch = GroundingCollator(None, size_divisibility=32, tokenize=False)(items)
    B, _, H, W = batch["images"].shape
    assert B == 12 and H % 32 == 0 and W % 32 == 0
    assert len({tuple(it["image"].shape) for it in items}) > 1  # padding really happened
    for b, (item, target) in enumerate(zip(items, batch["targets"])):
        h, w = target["size"].tolist()
        assert (h, w) == tuple(item["image"].shape[1:])
        assert target["masks"].shape[1:] == (h, w)  # masks keep their image's size, not the padded one
        assert not batch["padding_mask"][b, :h, :w].any() and batch["padding_mask"][b, h:].all()
        assert torch.equal(batch["images"][b, :, :h, :w], item["image"])
        _assert_masks_fit_boxes(batch["images"][b, :, :h, :w], target, NEAREST, rectangles=(RECT,))


def test_synthetic_training_samples_keep_masks_on_boxes(compose, paths):
    """The real pipeline: synthetic ODVG records (RLE masks, boxes tight around them) through the dataset."""
    ds, collate = build_grounding_dataset(compose(MGD), "train", augment=True)
    for epoch in range(3):
        ds.set_epoch(epoch)
        batch = collate([ds[i] for i in range(len(ds))])
        for b, target in enumerate(batch["targets"]):
            h, w = target["size"].tolist()
            _assert_masks_fit_boxes(batch["images"][b, :, :h, :w], target, NEAREST)
    assert os.path.basename(ds.sources[0].name) == "train_odvg.jsonl"
