"""GRES metrics (eval/referring_metrics.py) on hand-made masks, with expected values worked out by hand from
ReLA's definitions (gres_model/evaluation/refer_evaluation.py)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from groundlab.eval.referring_metrics import METRIC_KEYS, ReferringMetrics


def row_mask(cols, width=10, height=2):
    """(height, width) bool mask with the given columns of row 0 set."""
    m = np.zeros((height, width), dtype=bool)
    m[0, list(cols)] = True
    return m


EMPTY = row_mask([])


def only(pred, gt, gt_empty=False, **kw):
    acc = ReferringMetrics()
    acc.update(pred, gt, gt_empty, **kw)
    return acc.compute()


def test_perfect_target_sample():
    m = only(row_mask(range(4)), row_mask(range(4)))
    assert m["gIoU"] == 1.0 and m["cIoU"] == 1.0 and m["T_acc"] == 1.0
    assert m["Pr@0.7"] == m["Pr@0.8"] == m["Pr@0.9"] == 1.0
    assert math.isnan(m["N_acc"])  # no no-target sample
    assert m["num_samples"] == 1 and m["num_no_target"] == 0


def test_disjoint_prediction_scores_zero_but_counts_as_a_target():
    m = only(row_mask([0, 1]), row_mask([5, 6]))
    assert m["gIoU"] == 0.0 and m["cIoU"] == 0.0
    assert m["T_acc"] == 1.0  # non-empty prediction on a target sample: target found, however misplaced
    assert m["Pr@0.7"] == 0.0


def test_half_overlap():
    # gt columns 0-3, pred columns 2-5: I = 2, U = 6
    m = only(row_mask(range(2, 6)), row_mask(range(4)))
    assert m["gIoU"] == pytest.approx(1 / 3) and m["cIoU"] == pytest.approx(1 / 3)
    # pred is half of gt: I = 2, U = 4
    m = only(row_mask([0, 1]), row_mask(range(4)))
    assert m["gIoU"] == 0.5 and m["cIoU"] == 0.5


def test_no_target_sample_predicted_empty_scores_one_and_adds_nothing_to_ciou():
    m = only(EMPTY, EMPTY, gt_empty=True)
    assert m["gIoU"] == 1.0 and m["N_acc"] == 1.0
    assert math.isnan(m["cIoU"])  # 0 / 0: no pixel was counted
    assert math.isnan(m["T_acc"]) and math.isnan(m["Pr@0.7"])  # no target sample
    assert m["num_no_target"] == 1


def test_no_target_sample_predicted_non_empty_scores_zero_and_adds_its_union():
    acc = ReferringMetrics()
    acc.update(row_mask(range(3)), EMPTY, True)   # FN: U = 3
    acc.update(row_mask(range(3)), row_mask(range(3)), False)  # perfect target: I = U = 3
    m = acc.compute()
    assert m["N_acc"] == 0.0
    assert m["gIoU"] == 0.5            # (0 + 1) / 2
    assert m["cIoU"] == 0.5            # (0 + 3) / (3 + 3)
    assert m["Pr@0.9"] == 1.0          # only the target sample is in Pr's denominator


def test_target_sample_predicted_empty():
    m = only(EMPTY, row_mask(range(4)))
    assert m["T_acc"] == 0.0 and m["gIoU"] == 0.0 and m["cIoU"] == 0.0  # I = 0, U = 4


def test_ciou_differs_from_giou_on_unequal_sizes():
    acc = ReferringMetrics()
    acc.update(row_mask([0, 1]), row_mask([0, 1]), False)  # small object, perfect: I = U = 2, IoU 1
    big = np.zeros((2, 10), dtype=bool)
    big[0, :8] = True                                      # gt 8 px
    acc.update(row_mask(range(4)), big, False)             # pred half of it: I = 4, U = 8, IoU 0.5
    m = acc.compute()
    assert m["gIoU"] == 0.75                 # (1 + 0.5) / 2
    assert m["cIoU"] == pytest.approx(0.6)   # (2 + 4) / (2 + 8)


def test_precision_thresholds_count_iou_equal_to_the_threshold():
    acc = ReferringMetrics()
    gt = row_mask(range(10))
    for k in (6, 7, 8, 9):  # pred inside gt: IoU exactly k / 10
        acc.update(row_mask(range(k)), gt, False)
    acc.update(row_mask([3]), EMPTY, True)  # a no-target sample never enters Pr@X
    m = acc.compute()
    assert m["Pr@0.7"] == 0.75  # 0.7, 0.8, 0.9 of 4 target samples
    assert m["Pr@0.8"] == 0.5
    assert m["Pr@0.9"] == 0.25
    assert m["gIoU"] == pytest.approx((0.6 + 0.7 + 0.8 + 0.9 + 0.0) / 5)


def test_mixed_split_all_metrics():
    acc = ReferringMetrics()
    acc.update(row_mask(range(4)), row_mask(range(4)), False)  # TN, IoU 1, I 4 U 4
    acc.update(row_mask([0, 1]), row_mask(range(4)), False)    # TN, IoU .5, I 2 U 4
    acc.update(EMPTY, EMPTY, True)                              # TP, IoU 1, I 0 U 0
    acc.update(row_mask(range(3)), EMPTY, True)                 # FN, IoU 0, I 0 U 3
    acc.update(EMPTY, row_mask([7, 8]), False)                  # FP, IoU 0, I 0 U 2
    m = acc.compute()
    assert m["gIoU"] == pytest.approx(2.5 / 5)
    assert m["cIoU"] == pytest.approx(6 / 13)
    assert m["N_acc"] == 0.5
    assert m["T_acc"] == pytest.approx(2 / 3)
    assert m["Pr@0.7"] == pytest.approx(1 / 3)
    assert m["num_samples"] == 5 and m["num_no_target"] == 2
    assert list(acc.per_sample_iou()) == [1.0, 0.5, 1.0, 0.0, 0.0]


def test_explicit_no_target_flag_follows_relas_head_convention():
    gt = row_mask(range(4))
    # target sample, flag "no target" although the mask is perfect: I taken as 0, U = 4 -> IoU 0, a miss
    m = only(gt, gt, pred_no_target=True)
    assert m["gIoU"] == 0.0 and m["cIoU"] == 0.0 and m["T_acc"] == 0.0
    # no-target sample, flag "no target" although the mask shows pixels: IoU 1, nothing added to cIoU
    acc = ReferringMetrics()
    acc.update(row_mask([1, 2]), EMPTY, True, pred_no_target=True)
    acc.update(gt, gt, False)
    m = acc.compute()
    assert m["gIoU"] == 1.0 and m["N_acc"] == 1.0 and m["cIoU"] == 1.0  # 4 / 4
    # no-target sample, flag "target" with an empty mask: IoU 0, a miss, U 0
    m = only(EMPTY, EMPTY, gt_empty=True, pred_no_target=False)
    assert m["gIoU"] == 0.0 and m["N_acc"] == 0.0 and math.isnan(m["cIoU"])


def test_torch_masks_and_empty_accumulator():
    m = only(torch.tensor(row_mask([0, 1])), torch.tensor(row_mask([1, 2])))
    assert m["gIoU"] == pytest.approx(1 / 3)
    empty = ReferringMetrics().compute()
    assert set(empty) == set(METRIC_KEYS)
    assert empty["num_samples"] == 0 and empty["num_no_target"] == 0
    assert all(math.isnan(empty[k]) for k in METRIC_KEYS if not k.startswith("num_"))


def test_bad_inputs_fail():
    acc = ReferringMetrics()
    with pytest.raises(ValueError, match="same"):
        acc.update(np.zeros((2, 3), bool), np.zeros((3, 2), bool), False)
    with pytest.raises(ValueError, match="gt_empty"):
        acc.update(EMPTY, row_mask([1]), True)
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        acc.update(np.zeros((1, 2, 3), bool), np.zeros((1, 2, 3), bool), False)
    assert len(acc) == 0


def _samples():
    gt = row_mask(range(4))
    return [(gt, gt, False), (row_mask([0, 1]), gt, False), (EMPTY, EMPTY, True), (row_mask([5]), EMPTY, True)]


def test_merged_states_equal_one_accumulator():
    whole, rank0, rank1 = ReferringMetrics(), ReferringMetrics(), ReferringMetrics()
    for i, s in enumerate(_samples()):
        whole.update(*s)
        (rank0 if i % 2 == 0 else rank1).update(*s)
    states = [rank0.state(), rank1.state()]
    json.dumps(states)  # plain values: all_gather_object and json both take them
    merged = ReferringMetrics().merge(states)
    assert len(merged) == 4
    for key, value in whole.compute().items():
        assert merged.compute()[key] == pytest.approx(value)


def test_sample_ids_count_once_and_the_last_record_wins():
    gt = row_mask(range(4))
    acc = ReferringMetrics()
    acc.update(EMPTY, gt, False, sample_id=7)
    acc.update(gt, gt, False, sample_id=7)      # replaces the miss
    acc.update(gt, gt, False)                   # no id: always appended
    assert len(acc) == 2 and acc.compute()["gIoU"] == 1.0
    # DistributedSampler padding: rank 1 repeats sample 7; the gathered states hold it twice
    other = ReferringMetrics()
    other.update(gt, gt, False, sample_id=7)
    merged = ReferringMetrics().merge([acc.state(), other.state()])
    assert len(merged) == 2
    with pytest.raises(ValueError, match="version"):
        ReferringMetrics().merge([{**acc.state(), "version": 99}])


def rela_reference(samples):
    """ReLA's ReferEvaluator.evaluate loop for one source (transcribed), with its percentages as fractions.
    samples: (pred_mask, gt_mask, gt_nt, pred_nt)."""
    accum_i = accum_u = accum_iou = 0.0
    pr = {0.7: 0, 0.8: 0, 0.9: 0}
    total = not_empty = 0
    nt = {"TP": 0, "TN": 0, "FP": 0, "FN": 0}
    for pred, gt, gt_nt, pred_nt in samples:
        i, u = np.sum(np.logical_and(pred, gt)), np.sum(np.logical_or(pred, gt))
        if gt_nt:
            if pred_nt:
                nt["TP"] += 1
                accum_iou += 1
            else:
                nt["FN"] += 1
                accum_u += int(u)
        else:
            if pred_nt:
                nt["FP"] += 1
                i = 0
            else:
                nt["TN"] += 1
            this_iou = 0.0 if u == 0 else float(i) / float(u)
            accum_iou += this_iou
            accum_i += i
            accum_u += u
            not_empty += 1
            for thr in pr:
                pr[thr] += this_iou >= thr
        total += 1
    return {"gIoU": accum_iou / total, "cIoU": accum_i / accum_u,
            "T_acc": nt["TN"] / (nt["TN"] + nt["FP"]), "N_acc": nt["TP"] / (nt["TP"] + nt["FN"]),
            **{f"Pr@{t:.1f}": pr[t] / not_empty for t in pr}}


def test_matches_relas_loop_on_random_samples():
    rng = np.random.default_rng(0)
    for _ in range(20):
        samples = []
        for k in range(12):
            gt_nt = k % 3 == 0  # both kinds in every split, so ReLA's ratios are defined
            gt = np.zeros((6, 7), bool) if gt_nt else rng.random((6, 7)) < 0.4
            pred = gt ^ (rng.random((6, 7)) < rng.choice([0.0, 0.05, 0.3]))  # exact, slightly or badly off
            if rng.random() < 0.2:
                pred[:] = False
            samples.append((pred, gt, gt_nt, bool(rng.random() < 0.3)))
        acc = ReferringMetrics()
        for pred, gt, gt_nt, pred_nt in samples:
            acc.update(pred, gt, gt_nt, pred_no_target=pred_nt)
        ours, ref = acc.compute(), rela_reference(samples)
        for key, value in ref.items():
            assert ours[key] == pytest.approx(value), key
