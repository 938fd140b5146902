"""CocoEvaluator: AP on hand-built GT with non-contiguous category ids (1, 5, 90), segm, subsets,
class restriction, empty runs, distributed state/merge and results.json."""

from __future__ import annotations

import json
import math
import pickle

import numpy as np
import pytest
from pycocotools import mask as mask_util

from groundlab.eval.coco_eval import STAT_NAMES, CocoEvaluator, write_results_json

H, W = 80, 100
CATEGORY_IDS = [1, 5, 90]  # contiguous index i <-> COCO id CATEGORY_IDS[i], as data.coco.read_coco gives
NAMES = {1: "person", 5: "car", 90: "toothbrush"}
# image id -> [(category id, [x, y, w, h])]; class 90 only appears in image 3.
OBJECTS = {
    1: [(1, [10, 10, 30, 40]), (5, [50, 20, 40, 30])],
    2: [(1, [5, 5, 20, 20]), (5, [40, 30, 50, 45]), (1, [70, 5, 25, 25])],
    3: [(90, [20, 20, 35, 35]), (5, [60, 40, 30, 30])],
}


def _polygon(x, y, w, h):
    """An octagon-ish polygon inside the box, so segm is not just bbox in disguise."""
    c = min(w, h) / 4
    return [[x + c, y, x + w - c, y, x + w, y + c, x + w, y + h - c,
             x + w - c, y + h, x + c, y + h, x, y + h - c, x, y + c]]


def _gt():
    images, anns = [], []
    for img_id, objs in OBJECTS.items():
        images.append({"id": img_id, "file_name": f"{img_id}.jpg", "height": H, "width": W})
        for cat, box in objs:
            poly = _polygon(*box)
            area = float(mask_util.area(mask_util.merge(mask_util.frPyObjects(poly, H, W))))
            anns.append({"id": len(anns) + 1, "image_id": img_id, "category_id": cat, "bbox": box,
                         "area": area, "iscrowd": 0, "segmentation": poly})
    cats = [{"id": c, "name": NAMES[c]} for c in (90, 1, 5)]  # unsorted on purpose
    return {"images": images, "annotations": anns, "categories": cats}


@pytest.fixture
def gt_path(tmp_path):
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(_gt()))
    return str(path)


def _mask(box):
    return mask_util.decode(mask_util.merge(mask_util.frPyObjects(_polygon(*box), H, W))).astype(bool)


def _result(objs, relabel=None, score=0.9, jitter=None, rng=None):
    """A detection result for objects [(cat, box)]; relabel maps a category id to the one predicted."""
    relabel = relabel or {}
    labels, boxes, masks, scores = [], [], [], []
    for cat, (x, y, w, h) in objs:
        if jitter:
            x, y = x + rng.uniform(-jitter, jitter), y + rng.uniform(-jitter, jitter)
        labels.append(CATEGORY_IDS.index(relabel.get(cat, cat)))
        boxes.append([x, y, x + w, y + h])
        masks.append(_mask([int(round(x)), int(round(y)), w, h]))
        scores.append(rng.uniform(0.05, 1.0) if rng is not None else score)
    return {"scores": np.array(scores, dtype=np.float32), "labels": np.array(labels, dtype=np.int64),
            "boxes": np.array(boxes, dtype=np.float32).reshape(-1, 4),
            "masks": np.array(masks, dtype=bool).reshape(-1, H, W)}


def _empty():
    return {"scores": np.zeros(0), "labels": np.zeros(0, dtype=np.int64), "boxes": np.zeros((0, 4))}


def _stats(metrics):
    """Metrics without the free-text report (it holds timings)."""
    return {t: {k: v for k, v in m.items() if k != "report"} for t, m in metrics.items()}


def test_precomputed_rles_score_as_the_masks_they_encode(gt_path):
    from groundlab.ops.masks import encode_masks

    by_masks, by_rles = CocoEvaluator(gt_path, iou_types=("segm",)), CocoEvaluator(gt_path, iou_types=("segm",))
    rng = np.random.default_rng(0)
    for img_id, objs in OBJECTS.items():
        r = _result(objs, jitter=3, rng=rng)
        by_masks.update(img_id, r, CATEGORY_IDS)
        by_rles.update(img_id, {**{k: v for k, v in r.items() if k != "masks"}, "rles": encode_masks(r["masks"])},
                       CATEGORY_IDS)
    assert _stats(by_rles.summarize()) == _stats(by_masks.summarize())


@pytest.mark.parametrize("segmentation, fragment", [(None, "has none"), ({"counts": "x"}, "RLE dict")])
def test_segm_gt_is_checked_when_the_evaluator_is_built(tmp_path, segmentation, fragment):
    from groundlab.errors import DataError

    gt = _gt()
    gt["annotations"][2]["segmentation"] = segmentation
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    with pytest.raises(DataError, match=f"gt.json: annotation id 3: .*{fragment}"):
        CocoEvaluator(str(path), iou_types=("bbox", "segm"))
    CocoEvaluator(str(path), iou_types=("bbox",))  # boxes alone do not need it


def test_perfect_detections_give_ap_one_for_bbox_and_segm(gt_path):
    ev = CocoEvaluator(gt_path, iou_types=("bbox", "segm"))
    for img_id, objs in OBJECTS.items():
        ev.update(img_id, _result(objs), CATEGORY_IDS)
    metrics = ev.summarize()
    for t in ("bbox", "segm"):
        m = metrics[t]
        assert set(STAT_NAMES) <= set(m)
        assert m["AP"] == pytest.approx(1.0) and m["AP50"] == pytest.approx(1.0)
        assert m["AR100"] == pytest.approx(1.0)
        assert m["per_class_AP_by_id"] == pytest.approx({1: 1.0, 5: 1.0, 90: 1.0})
        assert m["per_class_AP"] == pytest.approx({"person": 1.0, "car": 1.0, "toothbrush": 1.0})
        assert m["empty"] is False and m["num_images"] == 3 and m["num_detections"] == 7
        assert "Average Precision" in m["report"]


def test_gt_as_dict_and_torch_tensors(gt_path):
    torch = pytest.importorskip("torch")
    ev = CocoEvaluator(_gt())
    for img_id, objs in OBJECTS.items():
        r = _result(objs)
        ev.update(img_id, {k: torch.from_numpy(v) for k, v in r.items()}, CATEGORY_IDS)
    assert ev.summarize()["bbox"]["AP"] == pytest.approx(1.0)


def test_labels_as_ids_when_no_category_ids(gt_path):
    ev = CocoEvaluator(gt_path)
    for img_id, objs in OBJECTS.items():
        r = _result(objs)
        r["labels"] = np.array([CATEGORY_IDS[i] for i in r["labels"]])
        ev.update(img_id, r, None)
    assert ev.summarize()["bbox"]["AP"] == pytest.approx(1.0)


def test_wrong_class_scores_zero_for_that_class(gt_path):
    ev = CocoEvaluator(gt_path, iou_types=("bbox", "segm"))
    for img_id, objs in OBJECTS.items():
        right = [o for o in objs if o[0] != 5]
        wrong = [o for o in objs if o[0] == 5]
        r1, r2 = _result(right, score=0.9), _result(wrong, relabel={5: 90}, score=0.3)
        ev.update(img_id, {k: np.concatenate([r1[k], r2[k]]) for k in r1}, CATEGORY_IDS)
    for t, m in ev.summarize().items():
        # The wrong boxes score below every right one, so classes 1 and 90 keep AP 1.
        assert m["per_class_AP_by_id"] == pytest.approx({1: 1.0, 5: 0.0, 90: 1.0}), t
        assert m["per_class_AP"]["car"] == 0.0
        assert m["AP"] == pytest.approx(2 / 3)


def test_class_ids_restricts_evaluation(gt_path):
    ev = CocoEvaluator(gt_path, class_ids=[5])
    for img_id, objs in OBJECTS.items():
        # Everything but class 5 is wrong; with only class 5 evaluated AP is still perfect.
        ev.update(img_id, _result(objs, relabel={1: 90, 90: 1}), CATEGORY_IDS)
    m = ev.summarize()["bbox"]
    assert m["per_class_AP_by_id"] == pytest.approx({5: 1.0})
    assert m["per_class_AP"] == pytest.approx({"car": 1.0})
    assert m["AP"] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        CocoEvaluator(gt_path, class_ids=[7])
    with pytest.raises(ValueError):
        CocoEvaluator(gt_path, class_ids=[])


def test_empty_results_do_not_crash(gt_path):
    ev = CocoEvaluator(gt_path, iou_types=("bbox", "segm"))
    for img_id in OBJECTS:
        ev.update(img_id, _empty(), CATEGORY_IDS)
    for m in ev.summarize().values():
        assert m["empty"] is True and m["num_detections"] == 0 and m["num_images"] == 3
        assert m["AP"] == 0.0 and m["AR100"] == 0.0  # GT exists and nothing was found
        assert m["per_class_AP_by_id"] == {1: 0.0, 5: 0.0, 90: 0.0}

    untouched = CocoEvaluator(gt_path).summarize()["bbox"]  # no update() at all
    assert untouched["empty"] is True and untouched["num_images"] == 0
    assert [untouched[k] for k in STAT_NAMES] == [-1.0] * 12
    assert untouched["per_class_AP"] == {"person": None, "car": None, "toothbrush": None}


def test_only_updated_images_are_evaluated(gt_path):
    ev = CocoEvaluator(gt_path)
    for img_id in (1, 2):
        ev.update(img_id, _result(OBJECTS[img_id]), CATEGORY_IDS)
    m = ev.summarize()["bbox"]
    assert m["AP"] == pytest.approx(1.0) and m["num_images"] == 2
    assert m["per_class_AP_by_id"][90] is None  # no class-90 GT in images 1 and 2
    assert m["per_class_AP"]["toothbrush"] is None

    # An image seen without detections still counts: its GT is missed.
    ev.update(3, _empty(), CATEGORY_IDS)
    m = ev.summarize()["bbox"]
    assert m["num_images"] == 3
    assert m["AR100"] < 1.0 and m["per_class_AP_by_id"][90] == 0.0
    with pytest.raises(ValueError, match="not in the GT"):
        ev.update(99, _empty(), CATEGORY_IDS)


def test_state_merge_equals_single_evaluator(gt_path):
    rng = np.random.default_rng(0)
    results = {i: _result(objs, jitter=4.0, rng=rng) for i, objs in OBJECTS.items()}
    extra = _result([(5, [0, 0, 20, 20]), (1, [30, 50, 30, 20])], rng=rng)  # false positives
    results[2] = {k: np.concatenate([results[2][k], extra[k]]) for k in extra}

    single = CocoEvaluator(gt_path, iou_types=("bbox", "segm"))
    for i, r in results.items():
        single.update(i, r, CATEGORY_IDS)

    rank0 = CocoEvaluator(gt_path, iou_types=("bbox", "segm"))
    rank1 = CocoEvaluator(gt_path, iou_types=("bbox", "segm"))
    rank0.update(1, results[1], CATEGORY_IDS)
    rank0.update(3, results[3], CATEGORY_IDS)
    rank1.update(2, results[2], CATEGORY_IDS)
    rank1.update(1, results[1], CATEGORY_IDS)  # DistributedSampler padding repeats an image
    states = [pickle.loads(pickle.dumps(s)) for s in (rank0.state(), rank1.state())]
    json.dumps(states)  # plain data
    rank0.merge(states)  # all_gather includes rank 0's own state
    assert len(rank0) == 3

    expected = _stats(single.summarize())
    assert 0.0 < expected["bbox"]["AP"] < 1.0
    assert _stats(rank0.summarize()) == expected
    fresh = CocoEvaluator(gt_path, iou_types=("bbox", "segm")).merge(states)
    assert _stats(fresh.summarize()) == expected
    with pytest.raises(ValueError):
        CocoEvaluator(gt_path).merge(states)  # iou_types differ


def test_results_json_round_trip(gt_path, tmp_path):
    ev = CocoEvaluator(gt_path)
    for img_id in (1, 2):
        ev.update(img_id, _result(OBJECTS[img_id]), CATEGORY_IDS)
    metrics = ev.summarize()
    metrics["bbox"]["odd"] = np.float32("nan")
    path = write_results_json(str(tmp_path / "out" / "results.json"), metrics, extra={"epoch": 3})
    loaded = json.loads(open(path).read())
    assert loaded["epoch"] == 3
    m = loaded["metrics"]["bbox"]
    assert m["AP"] == pytest.approx(1.0) and m["odd"] is None
    assert m["per_class_AP"] == {"person": 1.0, "car": 1.0, "toothbrush": None}
    assert m["per_class_AP_by_id"] == {"1": 1.0, "5": 1.0, "90": None}
    assert all(isinstance(m[k], float) for k in STAT_NAMES if not math.isnan(metrics["bbox"][k]))
    # A folder gets results.json inside; no temp files are left behind.
    assert write_results_json(str(tmp_path / "out"), metrics).endswith("results.json")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["results.json"]
