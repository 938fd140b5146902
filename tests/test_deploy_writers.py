"""Inference writers: KITTI lines, COCO results (loadable by pycocotools), annotated images."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import ImageColor

from groundlab.deploy.writers import (
    PALETTE, CocoResultsWriter, coco_results, draw_detections, kitti_lines, write_kitti,
)

RESULT = {
    "scores": torch.tensor([0.91234, 0.5, 0.05]),
    "labels": torch.tensor([0, 2, 1]),
    "boxes": torch.tensor([[10.0, 20.0, 50.5, 60.25], [0.0, 0.0, 30.0, 10.0], [5.0, 5.0, 6.0, 6.0]]),
}
NAMES = ["car", "person", "traffic light"]


def test_kitti_lines_parse_back_to_the_numbers():
    lines = kitti_lines(RESULT, NAMES)
    assert len(lines) == 3
    assert lines[0] == ("car 0.00 0 0.00 10.00 20.00 50.50 60.25 "
                        "0.00 0.00 0.00 0.00 0.00 0.00 0.00 0.912")
    for line, box, score in zip(lines, RESULT["boxes"].tolist(), RESULT["scores"].tolist()):
        fields = line.split(" ")
        assert len(fields) == 16  # multi-word class names stay one field
        assert [float(v) for v in fields[4:8]] == pytest.approx(box, abs=0.005)
        assert float(fields[15]) == pytest.approx(score, abs=5e-4)
        assert [float(v) for v in fields[8:15]] == [0.0] * 7
    assert lines[1].split(" ")[0] == "traffic_light"


def test_kitti_threshold_and_file(tmp_path):
    path = tmp_path / "labels" / "img_001.txt"
    write_kitti(str(path), RESULT, NAMES, conf_threshold=0.1)
    text = path.read_text()
    assert text.endswith("\n") and len(text.splitlines()) == 2
    assert [line.split()[0] for line in text.splitlines()] == ["car", "traffic_light"]
    empty = {"scores": np.zeros(0), "labels": np.zeros(0, int), "boxes": np.zeros((0, 4))}
    write_kitti(str(path), empty, NAMES)
    assert path.read_text() == ""
    assert os.listdir(path.parent) == ["img_001.txt"]  # no temp file left behind


def test_kitti_rejects_unknown_label():
    bad = dict(RESULT, labels=torch.tensor([0, 7, 1]))
    with pytest.raises(ValueError, match="label 7"):
        kitti_lines(bad, NAMES)


def test_coco_results_map_category_ids_and_use_xywh():
    res = coco_results(42, RESULT, category_ids=[1, 5, 90])
    assert [r["category_id"] for r in res] == [1, 90, 5]
    assert res[0] == {"image_id": 42, "category_id": 1, "bbox": [10.0, 20.0, 40.5, 40.25], "score": 0.91234}
    assert [r["category_id"] for r in coco_results(42, RESULT, None)] == [0, 2, 1]
    assert all(isinstance(v, float) for r in res for v in r["bbox"] + [r["score"]])


def test_coco_results_writer_is_atomic_and_loadable_by_pycocotools(tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = {
        "images": [{"id": 7, "width": 100, "height": 80, "file_name": "a.jpg"},
                   {"id": 9, "width": 100, "height": 80, "file_name": "b.jpg"}],
        "categories": [{"id": 1, "name": "car"}, {"id": 5, "name": "person"}, {"id": 90, "name": "traffic light"}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 1, "bbox": [10, 20, 40.5, 40.25], "area": 1630.125, "iscrowd": 0},
            {"id": 2, "image_id": 9, "category_id": 90, "bbox": [0, 0, 30, 10], "area": 300.0, "iscrowd": 0},
        ],
    }
    gt_path = tmp_path / "gt.json"
    gt_path.write_text(json.dumps(gt))
    out = tmp_path / "results" / "detections.json"
    out.parent.mkdir()
    out.write_text("previous run")  # replaced in one step, never appended to

    writer = CocoResultsWriter(str(out), category_ids=[1, 5, 90])
    writer.add(7, {k: v[:1] for k, v in RESULT.items()})
    writer.add(9, {k: v[1:2] for k, v in RESULT.items()})
    assert len(writer) == 2
    assert writer.write() == str(out)
    assert os.listdir(out.parent) == ["detections.json"]

    coco_gt = COCO(str(gt_path))
    coco_dt = coco_gt.loadRes(str(out))
    assert sorted(coco_dt.getImgIds()) == [7, 9]
    assert coco_dt.loadAnns(coco_dt.getAnnIds(imgIds=9))[0]["category_id"] == 90
    ev = COCOeval(coco_gt, coco_dt, "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    assert ev.stats[1] == pytest.approx(1.0)  # both detections match their GT exactly: AP50 = 1


def test_draw_detections_outlines_in_mapped_colour():
    image = np.zeros((100, 120, 3), np.uint8)
    result = {"scores": np.array([0.9, 0.2]), "labels": np.array([0, 1]),
              "boxes": np.array([[20.0, 40.0, 80.0, 90.0], [60.0, 5.0, 110.0, 30.0]])}
    out = np.asarray(draw_detections(image, result, NAMES, color_map={"car": "red"}, outline_width=2))
    assert out.shape == image.shape and not image.any()  # input untouched
    assert tuple(out[65, 20]) == (255, 0, 0)  # left edge of the car box
    assert tuple(out[90, 50]) == (255, 0, 0)  # bottom edge
    assert tuple(out[65, 50]) == (0, 0, 0)  # inside stays clear
    assert (out[30:40, 20:40] != 0).any()  # the label pad above the box
    person = ImageColor.getrgb(PALETTE[1])  # not in the color map: palette by label
    assert tuple(out[25, 60]) == person  # left edge, below its label (drawn inside: the box touches the top)
    thresholded = np.asarray(draw_detections(image, result, NAMES, {"car": "red"}, 2, conf_threshold=0.5))
    assert not thresholded[25, 60].any() and tuple(thresholded[65, 20]) == (255, 0, 0)
