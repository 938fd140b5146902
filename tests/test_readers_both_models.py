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
