"""Tests for the synthetic coloured-shapes dataset (groundlab.data.synthetic)."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from groundlab.data.synthetic import (
    COLORS,
    SHAPES,
    SyntheticPaths,
    SyntheticSpec,
    ensure_synthetic,
    render_scene,
)

SMALL = SyntheticSpec(seed=3, image_size=(64, 64), num_train=6, num_val=3, max_objects=4)


def _jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _image(paths: SyntheticPaths, split: str, file_name: str) -> np.ndarray:
    return np.asarray(Image.open(os.path.join(getattr(paths, f"{split}_images"), file_name)).convert("RGB"))


_DATA_FILES = ("train_odvg", "train_grounding", "label_map", "val_coco", "train_coco_boxes", "train_coco",
               "referring_train", "referring_val", "referring_infer")


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> SyntheticPaths:
    return ensure_synthetic(SMALL, str(tmp_path_factory.mktemp("cache")))


def test_layout_and_label_map(small):
    assert small.root.endswith(os.path.join("synthetic", SMALL.digest()))
    for name in _DATA_FILES:
        assert os.path.isfile(getattr(small, name)), name
    assert sorted(os.listdir(small.train_images)) == [f"train_{i:06d}.jpg" for i in range(6)]
    assert sorted(os.listdir(small.val_images)) == [f"val_{i:06d}.jpg" for i in range(3)]
    assert _json(small.label_map) == {str(i): n for i, n in enumerate(SMALL.class_names)}
    assert SMALL.class_names[:4] == ["red circle", "red square", "red triangle", "green circle"]
    marker = _json(os.path.join(small.root, "spec.json"))
    assert marker["class_names"] == SMALL.class_names and marker["seed"] == 3
    assert not [d for d in os.listdir(os.path.dirname(small.root)) if d.startswith(".")]  # no temp dirs left


def test_determinism_and_seed(tmp_path, small):
    again = ensure_synthetic(SMALL, str(tmp_path / "other"))
    for name in _DATA_FILES:
        assert _read_bytes(getattr(small, name)) == _read_bytes(getattr(again, name)), name
    for rec in _jsonl(small.train_odvg):
        assert np.array_equal(_image(small, "train", rec["file_name"]), _image(again, "train", rec["file_name"]))
    other = ensure_synthetic(dataclasses.replace(SMALL, seed=4), str(tmp_path / "other"))
    assert other.root != again.root
    assert _read_bytes(other.train_odvg) != _read_bytes(small.train_odvg)
    # Per-image RNGs make a scene independent of how many images come before it.
    a = render_scene(SMALL, np.random.default_rng([3, 0, 5]))
    b = render_scene(SMALL, np.random.default_rng([3, 0, 5]))
    assert np.array_equal(a[0], b[0]) and [o["bbox"] for o in a[1]] == [o["bbox"] for o in b[1]]


def test_reuse_does_not_regenerate(tmp_path):
    first = ensure_synthetic(SMALL, str(tmp_path))
    marker = os.path.join(first.root, "spec.json")
    before = {p: os.stat(p).st_mtime_ns for p in (marker, first.train_odvg, first.val_coco)}
    os.utime(first.train_odvg, ns=(1, 1))  # a regeneration would rewrite this
    second = ensure_synthetic(SMALL, str(tmp_path))
    assert second == first
    assert os.stat(first.train_odvg).st_mtime_ns == 1
    assert os.stat(marker).st_mtime_ns == before[marker]


def test_masks_boxes_and_colours(small):
    h, w = SMALL.image_size
    table = np.array(list(COLORS.values()), dtype=np.float64)
    names = list(COLORS)
    records = _jsonl(small.train_odvg)
    assert len(records) == SMALL.num_train
    for rec in records:
        assert (rec["height"], rec["width"]) == (h, w)
        instances = rec["detection"]["instances"]
        assert SMALL.min_objects <= len(instances) <= SMALL.max_objects
        image = _image(small, "train", rec["file_name"]).astype(np.float64)
        union = np.zeros((h, w), dtype=np.int64)
        for inst in instances:
            assert isinstance(inst["mask"]["counts"], str) and inst["mask"]["size"] == [h, w]
            mask = mask_utils.decode(inst["mask"]).astype(bool)
            assert mask.any()
            union += mask
            rows, cols = np.nonzero(mask)
            x1, y1, x2, y2 = inst["bbox"]
            assert [x1, y1, x2, y2] == [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]
            assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
            assert all(isinstance(v, float) for v in inst["bbox"])
            assert SMALL.class_names[inst["label"]] == inst["category"]
            # Colour must be recoverable from the (JPEG-decoded) visible pixels.
            nearest = names[int(np.argmin(((table - image[mask].mean(0)) ** 2).sum(1)))]
            assert nearest == inst["category"].split()[0], (rec["file_name"], inst["category"])
        assert union.max() <= 1  # visible masks are disjoint


def test_render_scene_occlusion_rule():
    spec = SyntheticSpec(image_size=(48, 48), min_objects=4, max_objects=6, max_size_frac=0.8,
                         colors=tuple(COLORS), shapes=SHAPES)
    seen_shapes = set()
    for i in range(20):
        image, objects = render_scene(spec, np.random.default_rng([0, 9, i]))
        assert image.shape == (48, 48, 3) and image.dtype == np.uint8
        assert 1 <= len(objects) <= 6
        masks = np.stack([o["mask"] for o in objects])
        assert masks.sum(0).max() <= 1
        seen_shapes.update(o["category"].split()[1] for o in objects)
    assert len(seen_shapes) >= 5  # the extended shape table renders


def test_grounding_spans(small):
    det = _jsonl(small.train_odvg)
    for rec, d in zip(_jsonl(small.train_grounding), det):
        assert rec["file_name"] == d["file_name"]
        g = rec["grounding"]
        caption = g["caption"]
        assert caption.startswith("a") and caption.endswith(".")
        assert [r["bbox"] for r in g["regions"]] == [i["bbox"] for i in d["detection"]["instances"]]
        spans = {}
        for region in g["regions"]:
            (start, end), = region["tokens_positive"]
            assert caption[start:end] == region["phrase"]
            assert spans.setdefault(region["phrase"], (start, end)) == (start, end)  # one mention per class
        assert caption.count(" a ") + caption.count(" an ") + 1 == len(spans)


def test_coco_files(small):
    val = COCO(small.val_coco)
    assert len(val.getImgIds()) == SMALL.num_val
    assert [c["name"] for c in val.loadCats(val.getCatIds())] == SMALL.class_names
    assert len(val.getAnnIds()) > 0
    for ann in val.loadAnns(val.getAnnIds()):
        m = val.annToMask(ann)
        assert m.sum() == ann["area"] and ann["iscrowd"] == 0
        x, y, bw, bh = ann["bbox"]
        rows, cols = np.nonzero(m)
        assert (x, y, x + bw, y + bh) == (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)

    full, boxes = _json(small.train_coco), _json(small.train_coco_boxes)
    assert full["images"] == boxes["images"] and [i["id"] for i in full["images"]] == list(range(1, 7))
    ids = [a["id"] for a in full["annotations"]]
    assert ids == list(range(1, len(ids) + 1))
    assert sum(len(r["detection"]["instances"]) for r in _jsonl(small.train_odvg)) == len(ids)
    for a, b in zip(full["annotations"], boxes["annotations"]):
        assert "segmentation" not in b and b["bbox"] == a["bbox"]
        assert b["area"] == a["bbox"][2] * a["bbox"][3] >= a["area"]
    COCO(small.train_coco_boxes)  # loads without segmentation


def test_archive_mode(tmp_path):
    spec = dataclasses.replace(SMALL, archive=True)
    paths = ensure_synthetic(spec, str(tmp_path))
    assert paths.train_images.endswith("train_images.tar.gz") and os.path.isfile(paths.val_images)
    assert not os.path.exists(os.path.join(paths.root, "images"))
    folder = ensure_synthetic(SMALL, str(tmp_path))
    with tarfile.open(paths.train_images, "r:gz") as tar:
        names = tar.getnames()
        assert names == [r["file_name"] for r in _jsonl(paths.train_odvg)]
        first = np.asarray(Image.open(io.BytesIO(tar.extractfile(names[0]).read())))
    assert np.array_equal(first, _image(folder, "train", names[0]))
    with tarfile.open(paths.val_images, "r:gz") as tar:
        assert tar.getnames() == [i["file_name"] for i in _json(paths.val_coco)["images"]]
    # The archive itself is reproducible (fixed gzip/tar mtimes).
    again = ensure_synthetic(spec, str(tmp_path / "again"))
    assert _read_bytes(again.train_images) == _read_bytes(paths.train_images)


def test_lost_race_keeps_existing_dataset(tmp_path, monkeypatch):
    import groundlab.data.synthetic as synthetic

    paths = ensure_synthetic(SMALL, str(tmp_path))
    marker = os.path.join(paths.root, "spec.json")
    original = _read_bytes(marker)
    # Simulate a process that checked before the winner finished: the marker check misses once.
    real_isfile = os.path.isfile
    calls = {"n": 0}

    def flaky_isfile(p):
        calls["n"] += 1
        return False if calls["n"] == 1 else real_isfile(p)

    monkeypatch.setattr(synthetic.os.path, "isfile", flaky_isfile)
    assert ensure_synthetic(SMALL, str(tmp_path)) == paths
    monkeypatch.undo()
    assert _read_bytes(marker) == original
    assert sorted(os.listdir(os.path.dirname(paths.root))) == [SMALL.digest()]  # our temp copy was discarded


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"colors": ("red", "chartreuse")}, "colors"),
        ({"shapes": ("circle", "hexagon")}, "shapes"),
        ({"min_objects": 5, "max_objects": 2}, "min_objects"),
        ({"num_train": 0}, "num_train"),
        ({"num_val": -1}, "num_val"),
        ({"max_objects": 0}, "max_objects"),
        ({"image_size": (0, 64)}, "image_size"),
        ({"min_size_frac": 0.5, "max_size_frac": 0.3}, "min_size_frac"),
        ({"jpeg_quality": 0}, "jpeg_quality"),
    ],
)
def test_bad_spec_raises(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SyntheticSpec(**kwargs)


def test_spec_normalises_lists_and_digest():
    spec = SyntheticSpec(image_size=[64, 64], colors=["red", "blue"], shapes=["star"])
    assert spec.image_size == (64, 64) and spec.colors == ("red", "blue") and hash(spec)
    assert spec.class_names == ["red star", "blue star"]
    assert spec.digest() == SyntheticSpec(image_size=(64, 64), colors=("red", "blue"), shapes=("star",)).digest()
    assert len(spec.digest()) == 12 and spec.digest() != SyntheticSpec().digest()
