"""Annotation formats (ODVG detection/grounding, COCO, raw, coco_raw) from a folder and from a
.tar.gz, with the bad inputs each must report by file and line."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from groundlab.data.coco import read_coco
from groundlab.errors import DataError
from groundlab.data.image_source import open_image_source
from groundlab.ops.masks import decode_segmentation, encode_mask
from groundlab.data.odvg import read_odvg
from groundlab.data.raw import list_raw, open_sources, read_coco_raw
from groundlab.data.sources import load_source

NAMES = ["a.jpg", "b.png", "sub/c.jpg"]


def _image_bytes(name: str, h: int = 40, w: int = 60) -> bytes:
    buf = io.BytesIO()
    arr = np.full((h, w, 3), 100, np.uint8)
    Image.fromarray(arr).save(buf, format="PNG" if name.endswith("png") else "JPEG")
    return buf.getvalue()


@pytest.fixture(params=["folder", "tar.gz"])
def images(request, tmp_path):
    """An image source holding NAMES, as a folder or as a .tar.gz archive."""
    if request.param == "folder":
        root = tmp_path / "images"
        for n in NAMES:
            (root / n).parent.mkdir(parents=True, exist_ok=True)
            (root / n).write_bytes(_image_bytes(n))
        return str(root)
    path = tmp_path / "images.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for n in NAMES:
            data = _image_bytes(n)
            info = tarfile.TarInfo(n)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def _write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def _label_map(tmp_path):
    path = tmp_path / "labels.json"
    path.write_text(json.dumps({"0": "car", "1": "race car", "5": "person"}))
    return str(path)


def test_odvg_detection_both_image_keys_and_masks(tmp_path, images):
    mask = np.zeros((40, 60), bool)
    mask[5:15, 10:30] = True
    rows = [
        {"file_name": "a.jpg", "height": 40, "width": 60, "detection": {"instances": [
            {"bbox": [10, 5, 30, 15], "label": 1, "category": "race car", "mask": encode_mask(mask)},
            {"bbox": [0, 0, 5, 5], "label": 5, "mask": [[0, 0, 5, 0, 5, 5, 0, 5]]}]}},
        {"filename": "sub/c.jpg", "height": 40, "width": 60, "detection": {"instances": [
            {"bbox": [1, 2, 3, 4], "label": 0}]}},
    ]
    src = load_source({"image_dir": images, "json_file": _write_jsonl(tmp_path / "t.jsonl", rows),
                       "label_map": _label_map(tmp_path)}, "dataset.train_data_sources[0]", str(tmp_path / "c"))
    assert src.class_names == ["car", "race car", "person"]
    r0, r1 = src.records[0], src.records[1]
    assert r0["labels"] == [1, 2] and r1["labels"] == [0]
    assert r1["file_name"] == "sub/c.jpg" and r1["masks"] is None
    assert np.array_equal(decode_segmentation(r0["masks"][0], 40, 60), mask)
    poly = decode_segmentation(r0["masks"][1], 40, 60)
    assert poly[1:4, 1:4].all() and not poly[10:, 10:].any()
    assert src.images.read("sub/c.jpg")[:2] == b"\xff\xd8"


def test_odvg_grounding_records(tmp_path, images):
    rows = [{"file_name": "b.png", "grounding": {"caption": "a red car next to a red car door", "regions": [
        {"bbox": [1, 1, 10, 10], "phrase": "a red car", "tokens_positive": [[0, 9]]},
        {"bbox": [20, 1, 30, 10], "phrase": "a red car door"}]}}]
    records, names, _ = read_odvg(_write_jsonl(tmp_path / "g.jsonl", rows), None, open_image_source(images))
    rec = records[0]
    assert rec["kind"] == "grounding" and names == []
    assert rec["phrases"] == ["a red car", "a red car door"] and rec["labels"] == [0, 1]
    assert rec["spans"] == [[[0, 9]], None]


def test_odvg_errors_name_file_and_line(tmp_path):
    lm = _label_map(tmp_path)
    good = {"file_name": "a.jpg", "detection": {"instances": []}}
    cases = [
        ('{"file_name": "a.jpg", "detection": ', "bad.jsonl:2", "not valid JSON"),
        ({"file_name": "a.jpg", "detection": {"instances": [{"bbox": [0, 0, 1, 1], "label": 7}]}}, "bad.jsonl:2",
         "label 7 is not in the label map"),
        ({"image": "a.jpg", "detection": {}}, "bad.jsonl:2", "neither 'file_name' nor 'filename'"),
        ({"file_name": "a.jpg", "detection": {"instances": [{"bbox": [0, 0, 1], "label": 0}]}}, "bad.jsonl:2",
         "bbox must be 4 numbers"),
        ({"file_name": "a.jpg", "other": {}}, "bad.jsonl:2", "neither 'detection' nor 'grounding'"),
    ]
    for row, where, message in cases:
        path = _write_jsonl(tmp_path / "bad.jsonl", [good, row])
        with pytest.raises(DataError) as info:
            read_odvg(path, lm)
        assert where in str(info.value) and message in str(info.value)


def test_missing_image_error_or_skip_and_count(tmp_path, images):
    rows = [{"file_name": "a.jpg", "detection": {"instances": []}},
            {"file_name": "gone.jpg", "detection": {"instances": []}}]
    path = _write_jsonl(tmp_path / "m.jsonl", rows)
    src = open_image_source(images, cache_dir=str(tmp_path / "c"))
    with pytest.raises(DataError, match=r"m.jsonl:2.*gone.jpg"):
        read_odvg(path, _label_map(tmp_path), src)
    records, _, stats = read_odvg(path, _label_map(tmp_path), src, skip_missing=True)
    assert len(records) == 1 and stats.get("missing images skipped") == 1
    assert "m.jsonl:2" in stats.summary()


def test_boxes_clamped_and_degenerate_counted(tmp_path):
    rows = [{"file_name": "a.jpg", "height": 40, "width": 60, "detection": {"instances": [
        {"bbox": [-5, 10, 70, 20], "label": 0}, {"bbox": [10, 10, 10, 20], "label": 0},
        {"bbox": [70, 10, 80, 20], "label": 0}, {"bbox": [1, 1, 2, 2], "label": 0}]}}]
    records, _, stats = read_odvg(_write_jsonl(tmp_path / "c.jsonl", rows), _label_map(tmp_path))
    assert records[0]["boxes"] == [[0.0, 10.0, 60.0, 20.0], [1.0, 1.0, 2.0, 2.0]]
    assert stats.get("boxes clamped to the image") == 2
    assert stats.get("degenerate boxes dropped") == 2


def _coco(tmp_path, with_masks=True):
    mask = np.zeros((40, 60), bool)
    mask[10:20, 5:25] = True
    anns = [
        {"id": 11, "image_id": 7, "category_id": 90, "bbox": [5, 10, 20, 10], "area": 200, "iscrowd": 0},
        {"id": 12, "image_id": 7, "category_id": 1, "bbox": [30, 5, 10, 10], "area": 100, "iscrowd": 1},
        {"id": 13, "image_id": 9, "category_id": 5, "bbox": [0, 0, 10, 10], "area": 100, "iscrowd": 0},
    ]
    if with_masks:
        anns[0]["segmentation"] = encode_mask(mask)
        anns[1]["segmentation"] = {"size": [40, 60], "counts": [0, 2400]}
        anns[2]["segmentation"] = [[0, 0, 10, 0, 10, 10, 0, 10]]
    data = {"images": [{"id": 7, "file_name": "a.jpg", "height": 40, "width": 60},
                       {"id": 9, "file_name": "sub/c.jpg", "height": 40, "width": 60}],
            "categories": [{"id": 90, "name": "toothbrush"}, {"id": 1, "name": "person"}, {"id": 5, "name": "airplane"}],
            "annotations": anns}
    path = tmp_path / "val.json"
    path.write_text(json.dumps(data))
    return str(path), mask


def test_coco_any_category_ids_remapped_and_back(tmp_path, images):
    path, mask = _coco(tmp_path)
    src = load_source({"image_dir": images, "json_file": path}, "dataset.val_data_sources", str(tmp_path / "c"))
    assert src.category_ids == [1, 5, 90] and src.class_names == ["person", "airplane", "toothbrush"]
    rec = src.records[0]
    assert rec["image_id"] == 7 and rec["labels"] == [2, 0] and rec["iscrowd"] == [0, 1]
    assert [src.category_ids[i] for i in rec["labels"]] == [90, 1]
    assert rec["boxes"][0] == [5.0, 10.0, 25.0, 20.0]
    assert np.array_equal(decode_segmentation(rec["masks"][0], 40, 60), mask)
    assert decode_segmentation(rec["masks"][1], 40, 60).all()  # uncompressed RLE


def test_coco_box_only_has_no_masks(tmp_path):
    path, _ = _coco(tmp_path, with_masks=False)
    records, _, _, _ = read_coco(path)
    assert all(records[i]["masks"] is None for i in range(len(records)))


def test_coco_errors_name_annotation(tmp_path):
    path, _ = _coco(tmp_path)
    data = json.loads(open(path).read())
    data["annotations"][1]["category_id"] = 3
    open(path, "w").write(json.dumps(data))
    with pytest.raises(DataError, match="annotation id 12.*category_id 3"):
        read_coco(path)
    open(path, "w").write("{not json")
    with pytest.raises(DataError, match="val.json: not valid JSON"):
        read_coco(path)


def test_raw_and_coco_raw(tmp_path, images):
    sources = open_sources([images], str(tmp_path / "c"))
    assert [it.name for it in list_raw(sources)] == sorted(NAMES)
    path = _write_jsonl(tmp_path / "caps.jsonl", [{"image_path": "b.png", "caption": "a dog ."},
                                                  {"image_path": "nope.jpg", "caption": "x"}])
    with pytest.raises(DataError, match="caps.jsonl:2.*nope.jpg"):
        read_coco_raw(path, sources)
    items = read_coco_raw(path, sources, skip_missing=True)
    assert [(it.name, it.caption) for it in items] == [("b.png", "a dog .")]
    with pytest.raises(DataError, match=r"image_dir\[0\]"):
        open_sources([str(tmp_path / "missing_dir")], None)
