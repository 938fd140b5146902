"""Grounding DINO and MAL read the same inputs the same way: one archive cache for a .tar.gz, one COCO reader
(same duplicate-category, missing-image and box checks, same error sentences), one EXIF-orientation rule."""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from groundlab.data.image_source import archive_cache_root
from groundlab.data.mal_sources import read_split
from groundlab.data.sources import load_source
from groundlab.errors import DataError

MAL = ["model=mal", "dataset=mal_coco", "dataset.train_ann_path=x", "dataset.train_img_dir=x",
       "dataset.val_ann_path=x", "dataset.val_img_dir=x"]


def _png(h: int = 40, w: int = 50) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((h, w, 3), 90, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _coco(path, annotations, images=None, categories=None) -> str:
    data = {"images": images or [{"id": 7, "file_name": "a.png", "height": 40, "width": 50}],
            "categories": categories or [{"id": 3, "name": "cat"}, {"id": 9, "name": "dog"}],
            "annotations": annotations}
    path.write_text(json.dumps(data))
    return str(path)


def test_one_targz_is_decompressed_once_for_both_models(compose, tmp_path):
    archive = tmp_path / "images.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        data = _png()
        info = tarfile.TarInfo("a.png")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    ann = _coco(tmp_path / "boxes.json", [{"id": 1, "image_id": 7, "category_id": 3, "bbox": [5, 5, 20, 10]}])
    cache = str(tmp_path / "cache")

    gdino = load_source({"image_dir": str(archive), "json_file": ann}, "dataset.val_data_sources", cache)
    cfg = compose(MAL + [f"cache_dir={cache}", "dataset.min_obj_size=0"])
    _, mal = read_split(cfg, ann, str(archive), "train", train=True)

    cached = os.listdir(archive_cache_root(cache))
    assert len(cached) == 1 and cached[0].endswith(".tar")
    assert gdino.images.data_path == mal.data_path == os.path.join(archive_cache_root(cache), cached[0])
    assert sorted(os.listdir(cache)) == ["tar"]  # no second, per-model cache folder
    assert mal.read("a.png") == gdino.images.read("a.png")


def _both(compose, tmp_path, annotations, images=None, categories=None, skip_missing=False, make=("a.png",)):
    """(Grounding DINO's AnnotatedSource, MAL's MALInstances) of one json, each read the way its model reads it,
    or the DataError each raised."""
    img_dir = tmp_path / "img"
    img_dir.mkdir(exist_ok=True)
    for name in make:
        (img_dir / name).write_bytes(_png())
    ann = _coco(tmp_path / "boxes.json", annotations, images, categories)
    out = []
    cfg = compose(MAL + [f"cache_dir={tmp_path / 'cache'}", "dataset.min_obj_size=0",
                         f"dataset.skip_missing_images={str(skip_missing).lower()}"])
    for read in (lambda: load_source({"image_dir": str(img_dir), "json_file": ann}, "dataset.val_data_sources",
                                     str(tmp_path / "cache"), skip_missing),
                 lambda: read_split(cfg, ann, str(img_dir), "train", train=True)[0]):
        try:
            out.append(read())
        except DataError as err:
            out.append(err)
    return out


BOX = {"id": 1, "image_id": 7, "category_id": 3, "bbox": [5, 5, 20, 10]}


def test_two_categories_of_one_name_fail_the_same_way(compose, tmp_path):
    cats = [{"id": 3, "name": "cat"}, {"id": 9, "name": "Cat "}]
    gdino, mal = _both(compose, tmp_path, [BOX], categories=cats)
    assert isinstance(gdino, DataError) and isinstance(mal, DataError)
    assert str(gdino) == str(mal)
    assert "boxes.json" in str(mal) and "categories 3 ('cat') and 9 ('Cat ') have the same name" in str(mal)


def test_a_missing_image_fails_or_is_skipped_the_same_way(compose, tmp_path):
    images = [{"id": 7, "file_name": "a.png", "height": 40, "width": 50},
              {"id": 8, "file_name": "gone.png", "height": 40, "width": 50}]
    anns = [BOX, {"id": 2, "image_id": 8, "category_id": 9, "bbox": [1, 1, 30, 30]},
            {"id": 3, "image_id": 8, "category_id": 3, "bbox": [2, 2, 10, 10]}]
    gdino, mal = _both(compose, tmp_path, anns, images)
    assert isinstance(gdino, DataError) and str(gdino) == str(mal)
    assert "image id 8 (gone.png)" in str(mal) and "skip_missing_images=true" in str(mal)

    gdino, mal = _both(compose, tmp_path, anns, images, skip_missing=True)
    assert [r["file_name"] for r in gdino.records] == ["a.png"]
    assert [r["ann_id"] for r in mal.instances] == [1]
    assert [(s["ann_id"], s["reason"]) for s in mal.skipped] == [(2, "image missing"), (3, "image missing")]


@pytest.mark.parametrize("bbox", [[5, 5, 20], [5, "x", 20, 10], None, [5, 5, float("inf"), 10]])
def test_a_malformed_bbox_fails_the_same_way(compose, tmp_path, bbox):
    # a crowd box too: MAL used to skip crowd annotations before looking at their bbox
    for crowd in (0, 1):
        bad = {"id": 4, "image_id": 7, "category_id": 9, "bbox": bbox, "iscrowd": crowd}
        gdino, mal = _both(compose, tmp_path, [BOX, bad])
        assert isinstance(gdino, DataError) and isinstance(mal, DataError), (bbox, crowd)
        assert str(gdino) == str(mal)
        assert "boxes.json: annotation id 4" in str(mal) and "bbox" in str(mal)


def test_boxes_clamped_dropped_and_box_only_exports_read_the_same_way(compose, tmp_path):
    anns = [dict(BOX, segmentation=[]),  # box-only exporters write an empty list: no mask, not an error
            {"id": 2, "image_id": 7, "category_id": 3, "bbox": [5, 5, 0, 10]},
            {"id": 3, "image_id": 7, "category_id": 3, "bbox": [60, 5, 10, 10]},
            {"id": 4, "image_id": 7, "category_id": 9, "bbox": [40, 30, 20, 20]}]
    gdino, mal = _both(compose, tmp_path, anns)
    rec = gdino.records[0]
    assert rec["ann_ids"] == [r["ann_id"] for r in mal.instances] == [1, 4]
    assert rec["boxes"] == [r["box"] for r in mal.instances] == [[5.0, 5.0, 25.0, 15.0], [40.0, 30.0, 50.0, 40.0]]
    assert rec["masks"] is None and mal.instances[0]["segmentation"] is None and mal.clamped == 1
    assert {s["ann_id"]: s["reason"] for s in mal.skipped} == {2: "zero-area box", 3: "box outside the image"}
