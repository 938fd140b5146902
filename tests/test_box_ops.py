"""Box conversions, IoU, GIoU and class-wise NMS against brute-force Python references."""

from __future__ import annotations

import itertools

import pytest
import torch

from groundlab.ops.boxes import (
    batched_nms, box_area, box_cxcywh_to_xyxy, box_iou, box_xyxy_to_cxcywh, generalized_box_iou, nms,
)


def random_boxes(n: int, gen: torch.Generator, scale: float = 100.0) -> torch.Tensor:
    """(n, 4) well-formed xyxy boxes, some of them overlapping heavily."""
    xy = torch.rand(n, 2, generator=gen) * scale
    wh = torch.rand(n, 2, generator=gen) * scale / 2
    return torch.cat([xy, xy + wh], 1)


def ref_iou(a, b) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def ref_giou(a, b) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return inter / union - (hull - union) / hull


def ref_batched_nms(boxes, scores, idxs, thr) -> list:
    """Textbook greedy NMS, one class at a time, then merged by score."""
    boxes, scores, idxs = boxes.tolist(), scores.tolist(), idxs.tolist()
    keep = []
    for cls in set(idxs):
        members = sorted((i for i in range(len(boxes)) if idxs[i] == cls), key=lambda i: -scores[i])
        kept = []
        for i in members:
            if all(ref_iou(boxes[i], boxes[j]) <= thr for j in kept):
                kept.append(i)
        keep += kept
    return sorted(keep, key=lambda i: -scores[i])


def test_conversions_round_trip():
    cxcywh = torch.tensor([[0.5, 0.5, 0.2, 0.4], [10.0, 20.0, 4.0, 6.0]])
    xyxy = box_cxcywh_to_xyxy(cxcywh)
    assert torch.allclose(xyxy, torch.tensor([[0.4, 0.3, 0.6, 0.7], [8.0, 17.0, 12.0, 23.0]]))
    assert torch.allclose(box_xyxy_to_cxcywh(xyxy), cxcywh)
    assert torch.allclose(box_area(xyxy), torch.tensor([0.08, 24.0]))
    # Works on any leading shape, e.g. (B, Q, 4) model outputs.
    assert box_cxcywh_to_xyxy(torch.rand(2, 3, 4)).shape == (2, 3, 4)


def test_box_iou_matches_brute_force():
    gen = torch.Generator().manual_seed(0)
    a = torch.cat([random_boxes(7, gen), torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 5.0, 5.0]])])
    b = torch.cat([random_boxes(5, gen), torch.tensor([[0.0, 0.0, 10.0, 10.0], [2.0, 2.0, 4.0, 4.0]])])
    iou, union = box_iou(a, b)
    assert iou.shape == union.shape == (9, 7)
    for i, j in itertools.product(range(9), range(7)):
        assert iou[i, j].item() == pytest.approx(ref_iou(a[i].tolist(), b[j].tolist()), abs=1e-6)
    assert iou[7, 5].item() == pytest.approx(1.0)  # identical boxes
    assert iou[7, 6].item() == pytest.approx(0.04)  # contained 2x2 in 10x10
    assert union[7, 6].item() == pytest.approx(100.0)
    assert not torch.isnan(box_iou(a[8:], a[8:])[0]).any()  # zero-area box against itself: 0, not NaN


def test_generalized_box_iou_matches_brute_force():
    gen = torch.Generator().manual_seed(1)
    a, b = random_boxes(6, gen), random_boxes(4, gen)
    giou = generalized_box_iou(a, b)
    for i, j in itertools.product(range(6), range(4)):
        assert giou[i, j].item() == pytest.approx(ref_giou(a[i].tolist(), b[j].tolist()), abs=1e-6)
    far = generalized_box_iou(torch.tensor([[0.0, 0, 1, 1]]), torch.tensor([[99.0, 99, 100, 100]]))
    assert -1.0 < far.item() < -0.99
    assert (giou <= 1).all() and (giou >= -1).all()


def test_generalized_box_iou_rejects_malformed_boxes():
    good = torch.tensor([[0.0, 0, 1, 1]])
    with pytest.raises(ValueError, match="malformed"):
        generalized_box_iou(torch.tensor([[2.0, 0, 1, 1]]), good)
    with pytest.raises(ValueError, match="malformed"):
        generalized_box_iou(good, torch.tensor([[0.0, 3, 1, 1]]))


@pytest.mark.parametrize("thr", [0.1, 0.3, 0.5, 0.7])
def test_batched_nms_matches_greedy_reference(thr):
    gen = torch.Generator().manual_seed(int(thr * 10))
    boxes = random_boxes(60, gen, scale=50.0)
    scores = torch.rand(60, generator=gen)
    idxs = torch.randint(0, 3, (60,), generator=gen)
    keep = batched_nms(boxes, scores, idxs, thr)
    assert keep.dtype == torch.long
    assert keep.tolist() == ref_batched_nms(boxes, scores, idxs, thr)
    assert (scores[keep][1:] <= scores[keep][:-1]).all()


def test_nms_chain_keeps_box_whose_suppressor_was_suppressed():
    # A overlaps B, B overlaps C, A and C disjoint: greedy keeps A and C (B is gone before it can
    # suppress C). A single "Fast NMS" pass would wrongly drop C.
    boxes = torch.tensor([[0.0, 0, 10, 10], [6.0, 0, 16, 10], [12.0, 0, 22, 10]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    assert nms(boxes, scores, 0.2).tolist() == [0, 2]


def test_batched_nms_is_class_wise_and_handles_empty_input():
    boxes = torch.tensor([[0.0, 0, 10, 10], [1.0, 1, 10, 10], [0.0, 0, 10, 10]])
    scores = torch.tensor([0.5, 0.9, 0.7])
    assert batched_nms(boxes, scores, torch.tensor([0, 0, 1]), 0.5).tolist() == [1, 2]
    assert batched_nms(boxes, scores, torch.tensor([0, 0, 0]), 0.5).tolist() == [1]
    empty = batched_nms(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long), 0.5)
    assert empty.shape == (0,) and empty.dtype == torch.long


def test_batched_nms_many_classes_large_coordinates_stay_exact():
    # 10000 classes x ~1000 px: float32 offsets (~1e7) would round coordinates by pixels and move
    # the IoU by ~1e-3; the float64 shift keeps it exact, so thresholds just either side decide.
    boxes = torch.tensor([[1000.0, 1000.0, 1100.0, 1100.0], [1000.0, 1000.0, 1100.0, 1110.3]])
    iou = 100.0 * 100.0 / (100.0 * 110.3)
    scores = torch.tensor([0.9, 0.8])
    idxs = torch.tensor([9999, 9999])
    assert batched_nms(boxes, scores, idxs, iou - 1e-5).tolist() == [0]
    assert batched_nms(boxes, scores, idxs, iou + 1e-5).tolist() == [0, 1]
