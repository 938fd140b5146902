"""MAL's data: one instance per box with every skip named, box-expanded crops (mirrored past the image
edge), the box mask in the crop, pasting a crop's mask back, the two views, and the mIoU meter."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from groundlab.errors import DataError
from groundlab.data.image_source import open_image_source
from groundlab.ops.paste import paste_mask
from groundlab.data.mal_crops import (box_mask_in_crop, crop_region, crop_resized, expand_box,
                                      random_margins, eval_margins)
from groundlab.data.mal_dataset import MALCropDataset, collate_crops
from groundlab.data.mal_instances import read_mal_instances
from groundlab.ops.masks import encode_mask
from groundlab.eval.mask_miou import MaskIoUMeter, mask_iou


def _write(tmp_path, annotations, images=None, make_images=("a.png",)):
    img_dir = tmp_path / "img"
    img_dir.mkdir(exist_ok=True)
    for name in make_images:
        Image.fromarray(np.full((40, 50, 3), 90, np.uint8)).save(img_dir / name)
    data = {"images": images or [{"id": 7, "file_name": "a.png", "height": 40, "width": 50}],
            "categories": [{"id": 3, "name": "cat"}, {"id": 9, "name": "dog"}], "annotations": annotations}
    path = tmp_path / "boxes.json"
    path.write_text(json.dumps(data))
    return str(path), open_image_source(str(img_dir))


def test_every_box_is_used_or_skipped_with_its_reason(tmp_path):
    anns = [
        {"id": 1, "image_id": 7, "category_id": 9, "bbox": [5, 5, 20, 10]},
        {"id": 2, "image_id": 7, "category_id": 3, "bbox": [5, 5, 0, 10]},  # zero width
        {"id": 3, "image_id": 7, "category_id": 3, "bbox": [60, 5, 10, 10]},  # right of the image
        {"id": 4, "image_id": 7, "category_id": 3, "bbox": [40, 30, 20, 20]},  # partly outside: clamped
        {"id": 5, "image_id": 7, "category_id": 3, "bbox": [1, 1, 3, 3]},  # under min_obj_size
        {"id": 6, "image_id": 7, "category_id": 3, "bbox": [1, 1, 30, 30], "iscrowd": 1},
        {"id": 7, "image_id": 8, "category_id": 3, "bbox": [1, 1, 30, 30]},  # its image file is missing
    ]
    images = [{"id": 7, "file_name": "a.png", "height": 40, "width": 50},
              {"id": 8, "file_name": "gone.png", "height": 40, "width": 50}]
    path, source = _write(tmp_path, anns, images)
    with pytest.raises(DataError, match="gone.png"):
        read_mal_instances(path, source, min_obj_size=16)
    data = read_mal_instances(path, source, min_obj_size=16, skip_missing=True)
    used = [data.instances[i] for i in range(len(data.instances))]
    assert [r["ann_id"] for r in used] == [1, 4]
    assert used[0]["label"] == 1 and used[0]["category_id"] == 9 and used[0]["box"] == [5.0, 5.0, 25.0, 15.0]
    assert used[1]["box"] == [40.0, 30.0, 50.0, 40.0] and data.clamped == 1
    reasons = {s["ann_id"]: s["reason"] for s in data.skipped}
    assert reasons[2] == "zero-area box" and reasons[3] == "box outside the image"
    assert "min_obj_size" in reasons[5] and reasons[6] == "crowd annotation" and reasons[7] == "image missing"
    assert "2 boxes used" in data.summary()


def test_evaluation_needs_masks_and_names_the_file(tmp_path):
    path, source = _write(tmp_path, [{"id": 1, "image_id": 7, "category_id": 3, "bbox": [5, 5, 20, 10]}])
    with pytest.raises(DataError, match=r"boxes\.json.*annotation id 1"):
        read_mal_instances(path, source, need_masks=True)


def test_crop_geometry_and_mirrored_edges():
    assert expand_box([10, 20, 30, 40], [0, 0, 0, 0]) == (10, 20, 30, 40)
    assert expand_box([10, 20, 30, 40], [1, 0.5, 1, 0.5]) == (0, 15, 40, 45)
    assert np.allclose(eval_margins([0.6, 0.6]), 0.3)
    m = random_margins(np.random.default_rng(0), [0.0, 1.2])
    assert m.shape == (4,) and (m >= 0).all() and (m[[0, 2]].sum() <= 1.2) and (m[[1, 3]].sum() <= 1.2)
    image = np.arange(5 * 6).reshape(5, 6)
    crop = crop_region(image, (-2, -1, 4, 3))
    assert crop.shape == (4, 6)
    assert (crop[1:, 2:] == image[:3, :4]).all()
    assert (crop[0, 2:] == image[0, :4]).all()  # the row above the image mirrors the first row
    assert (crop[1:, :2] == image[:3, 1::-1]).all()  # the columns left of it mirror the first two


def test_box_mask_and_paste_back_recover_a_mask():
    h, w = 60, 80
    yy, xx = np.mgrid[:h, :w]
    truth = (yy - 30) ** 2 / 15 ** 2 + (xx - 40) ** 2 / 22 ** 2 <= 1  # an ellipse
    box = [18.0, 15.0, 63.0, 46.0]
    ext = expand_box(box, [0.3] * 4)
    size = 64
    in_crop = box_mask_in_crop(box, ext, size)
    assert in_crop.sum() == pytest.approx(size * size * (45 / (ext[2] - ext[0])) * (31 / (ext[3] - ext[1])), rel=0.1)
    prob = crop_resized(np.repeat(truth[..., None].astype(np.uint8) * 255, 3, 2), ext, size)[..., 0] / 255.0
    region, place = paste_mask(torch.tensor(prob, dtype=torch.float32), ext, box, h, w)
    pasted = np.zeros((h, w), bool)
    pasted[place[1]:place[3], place[0]:place[2]] = region.numpy() > 0.5
    inter, union = (pasted & truth).sum(), (pasted | truth).sum()
    assert inter / union > 0.95


def test_crop_dataset_views_and_determinism(tmp_path):
    seg = np.zeros((40, 50), bool)
    seg[6:14, 8:22] = True
    anns = [{"id": 1, "image_id": 7, "category_id": 3, "bbox": [8, 6, 14, 8], "segmentation": encode_mask(seg)}]
    path, source = _write(tmp_path, anns)
    data = read_mal_instances(path, source, need_masks=True)
    train = MALCropDataset(data, source, 32, True, [0.0, 1.2], [0.6, 0.6], seed=1)
    a, b = train[0], train[0]
    assert torch.equal(a["student"], b["student"]) and torch.equal(a["box_mask"], b["box_mask"])
    train.set_epoch(1)
    assert not torch.equal(train[0]["ext"], a["ext"]) or not torch.equal(train[0]["student"], a["student"])
    assert a["student"].shape == a["teacher"].shape == (3, 32, 32) and a["box_mask"].shape == (1, 32, 32)
    val = MALCropDataset(data, source, 32, False, [0.0, 1.2], [0.6, 0.6], with_gt=True)
    s = val[0]
    assert torch.equal(s["student"], s["teacher"])
    assert s["ext"].tolist() == list(expand_box([8, 6, 22, 14], [0.3] * 4))
    x1, y1, x2, y2 = s["ext"].tolist()
    assert s["gt_crop"].shape == (min(y2, 40) - max(y1, 0), min(x2, 50) - max(x1, 0))
    assert float(s["gt_area"]) == seg.sum() and int(s["gt_crop"].sum()) == seg.sum()
    batch = collate_crops([s, s])
    assert batch["teacher"].shape == (2, 3, 32, 32) and isinstance(batch["gt_crop"], list)


def test_miou_is_the_mean_over_classes_of_per_class_means():
    meter = MaskIoUMeter(3)
    meter.update([0, 0, 1], [1.0, 0.5, 0.2], torch.tensor([100.0, 5000.0, 20000.0]))
    out = meter.compute(["a", "b", "c"])
    assert out["mIoU"] == pytest.approx((0.75 + 0.2) / 2)  # class c has no box: left out
    assert out["mIoU_small"] == pytest.approx(1.0) and out["mIoU_medium"] == pytest.approx(0.5)
    assert out["mIoU_large"] == pytest.approx(0.2) and out["per_class"]["a"]["count"] == 2
    other = MaskIoUMeter(3)
    other.update([2], [0.9], torch.tensor([100.0]))
    meter.merge([meter.state(), other.state()])
    assert meter.compute()["mIoU"] == pytest.approx((0.75 + 0.2 + 0.9) / 3)
    pred = torch.zeros(4, 4, dtype=torch.bool)
    pred[:2] = True
    gt = torch.zeros(4, 4, dtype=torch.uint8)
    gt[:1] = 1
    assert mask_iou(pred, gt, gt_area=4 + 4) == pytest.approx(4 / (8 + 8 - 4))  # 4 true pixels outside the region


def test_paste_back_is_exact_when_the_crop_is_not_resized():
    """A crop box of exactly the crop size: box mask, crop and paste-back are pixel identities (no half-pixel shift)."""
    h, w, size = 40, 50, 32
    image = np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)
    box = [10.0, 4.0, 30.0, 20.0]
    ext = (5, 2, 5 + size, 2 + size)
    assert (crop_resized(image, ext, size) == image[2:34, 5:37]).all()
    in_crop = box_mask_in_crop(box, ext, size)
    expected = np.zeros((size, size), np.float32)
    expected[2:18, 5:25] = 1
    assert (in_crop == expected).all()
    prob = torch.rand(size, size)
    region, place = paste_mask(prob, ext, box, h, w)
    assert place == (5, 2, 37, 34)
    torch.testing.assert_close(region, prob * torch.from_numpy(expected))
