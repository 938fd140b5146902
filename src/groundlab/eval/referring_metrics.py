"""Generalized referring-expression segmentation (GRES) metrics: gIoU, cIoU, N-acc, T-acc and Pr@{0.7,0.8,0.9}.

One sample is one (image, expression) pair. Its prediction is the union of the predicted masks and its
ground truth the union of the referred objects' masks; a "no-target" sample refers to nothing (its ground
truth is empty). The definitions are ReLA's (henghuiding/ReLA, gres_model/evaluation/refer_evaluation.py,
the reference implementation of the GRES paper), per sample with I = |pred & gt| and U = |pred | gt|:

    no-target sample, predicted no-target   (ReLA's TP): IoU 1, adds I 0 and U 0 to the cumulative sums
    no-target sample, predicted a target    (FN):        IoU 0, adds I 0 and U (= |pred|)
    target sample,    predicted no-target   (FP):        I taken as 0, IoU 0, adds I 0 and U
    target sample,    predicted a target    (TN):        IoU = I / U (0 when U = 0), adds I and U

    gIoU   = mean IoU over all samples
    cIoU   = sum of I / sum of U over all samples
    N_acc  = TP / (TP + FN)   no-target samples predicted no-target
    T_acc  = TN / (TN + FP)   target samples predicted as having a target
    Pr@X   = target samples with IoU >= X / target samples (no-target samples are left out, as in ReLA)

"Predicted no-target" is, by default, an empty predicted union: the GRES paper's definition ("a prediction
without any foreground pixels"), and what our post-processing produces when its no-target class wins
(models/mask_gdino/referring_postprocess.py). ReLA's code instead reads its no-target head (argmax of
`nt_label`), independent of the mask; pass `pred_no_target` to `update` to score that way. The two differ
only when the flag and the mask disagree (e.g. the no-target class lost but every instance was filtered out).

Deliberate differences from ReLA's report: every value is a fraction in [0, 1] (ReLA prints gIoU, cIoU
and Pr@X in percent but N_acc and T_acc as fractions); a metric without any applicable sample is NaN
(ReLA reports N_acc = T_acc = 0 when there is no no-target sample, and divides by zero for cIoU when
every U is 0); every key is always present, so logs and results.json have a fixed shape (results.json
writes NaN as null). ReLA's per-source split (refcoco / grefcoco) is not kept: one accumulator is one
split.

Distributed evaluation: the accumulator keeps four small per-sample arrays (I, U, gt_empty, pred_no_target,
plus optional sample ids), so `state()` is cheap to all_gather and `merge(states)` folds them into a fresh
accumulator, as eval/coco_eval.CocoEvaluator does. Samples given a `sample_id` are recorded once: a later
record of the same id replaces the earlier one, so the duplicates a DistributedSampler pads with (and
merging an accumulator's own state) count once.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Hashable, Iterable, List, Mapping, Optional

import numpy as np

PR_THRESHOLDS = (0.7, 0.8, 0.9)
STATE_VERSION = 1
METRIC_KEYS = ("gIoU", "cIoU", "N_acc", "T_acc", *(f"Pr@{t:.1f}" for t in PR_THRESHOLDS),
               "num_samples", "num_no_target")


def _as_bool_mask(mask: Any, name: str) -> np.ndarray:
    """A (H, W) numpy / torch / nested-list mask -> (H, W) numpy bool (nonzero = foreground)."""
    if hasattr(mask, "detach"):  # torch tensor, without importing torch here
        mask = mask.detach().cpu().numpy()
    arr = np.asarray(mask)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a (H, W) mask, got shape {arr.shape}")
    return arr.astype(bool, copy=False)


def _ratio(num: float, den: float) -> float:
    """num / den, NaN when nothing was counted (den == 0)."""
    return float(num) / float(den) if den > 0 else math.nan


class ReferringMetrics:
    """Accumulates per-sample intersections and unions; `compute()` turns them into GRES metrics.

    Per recorded sample (parallel lists, in recording order):
        I (int):               |pred & gt|, or 0 when no-target was predicted (ReLA's convention)
        U (int):               |pred | gt|, or 0 for a no-target sample predicted no-target
        gt_empty (bool):       the sample refers to nothing
        pred_no_target (bool): the prediction says "no target"
    """

    def __init__(self) -> None:
        self.inter: List[int] = []
        self.union: List[int] = []
        self.gt_empty: List[bool] = []
        self.pred_no_target: List[bool] = []
        self.sample_ids: List[Optional[Hashable]] = []
        self._row_of_id: Dict[Hashable, int] = {}  # sample id -> its row, for replacing duplicates

    def __len__(self) -> int:
        """Number of samples recorded (a repeated sample id counts once)."""
        return len(self.inter)

    # ---------------------------------------------------------------- recording
    def update(self, pred_union: Any, gt_union: Any, gt_empty: bool, pred_no_target: Optional[bool] = None,
               sample_id: Optional[Hashable] = None) -> None:
        """Record one sample.

        pred_union:     (H, W) bool (numpy or torch): the union of the kept predicted masks
                        (referring_postprocess.prediction_union), at the ground truth's size.
        gt_union:       (H, W) bool: the union of the referred objects' masks; all False when gt_empty.
        gt_empty:       the expression refers to nothing (a no-target sample).
        pred_no_target: the prediction's "no target" decision; None (default) = pred_union is empty.
        sample_id:      optional int or str naming the (image, expression) pair; a repeated id replaces the
                        earlier record (distributed padding duplicates samples).

        Raises ValueError when the shapes differ, or when a no-target sample has ground-truth pixels (the
        caller mixed up two samples: silently scoring it would hide the bug)."""
        pred = _as_bool_mask(pred_union, "pred_union")
        gt = _as_bool_mask(gt_union, "gt_union")
        if pred.shape != gt.shape:
            raise ValueError(f"pred_union {pred.shape} and gt_union {gt.shape} must have the same (H, W)")
        gt_empty = bool(gt_empty)
        if gt_empty and gt.any():
            raise ValueError("gt_empty=True but gt_union has foreground pixels")
        no_target = (not pred.any()) if pred_no_target is None else bool(pred_no_target)
        inter = int(np.count_nonzero(pred & gt))
        union = int(np.count_nonzero(pred | gt))
        if no_target:
            inter = 0  # ReLA: predicting "no target" scores no intersection, whatever the mask shows
            if gt_empty:
                union = 0  # ReLA: a correct "no target" adds nothing to cIoU's sums
        self._record(inter, union, gt_empty, no_target, sample_id)

    def _record(self, inter: int, union: int, gt_empty: bool, no_target: bool,
                sample_id: Optional[Hashable]) -> None:
        row = self._row_of_id.get(sample_id) if sample_id is not None else None
        if row is None:
            if sample_id is not None:
                self._row_of_id[sample_id] = len(self.inter)
            self.inter.append(inter)
            self.union.append(union)
            self.gt_empty.append(gt_empty)
            self.pred_no_target.append(no_target)
            self.sample_ids.append(sample_id)
        else:
            self.inter[row], self.union[row] = inter, union
            self.gt_empty[row], self.pred_no_target[row] = gt_empty, no_target

    # ---------------------------------------------------------------- distributed
    def state(self) -> Dict[str, Any]:
        """Everything update() recorded, as plain lists (picklable, json-able) for all_gather:
        {"version", "inter", "union", "gt_empty", "pred_no_target", "sample_ids"}, each list one entry per
        sample."""
        return {"version": STATE_VERSION, "inter": list(self.inter), "union": list(self.union),
                "gt_empty": list(self.gt_empty), "pred_no_target": list(self.pred_no_target),
                "sample_ids": list(self.sample_ids)}

    def merge(self, states: Iterable[Mapping[str, Any]]) -> "ReferringMetrics":
        """Fold other accumulators' state() into this one; returns self. Samples without an id are appended
        (so merge into a fresh accumulator: merging a state twice counts its id-less samples twice); samples
        with an id replace an earlier record of that id."""
        for st in states:
            if st.get("version") != STATE_VERSION:
                raise ValueError(f"cannot merge a ReferringMetrics state of version {st.get('version')!r}")
            rows = zip(st["inter"], st["union"], st["gt_empty"], st["pred_no_target"], st["sample_ids"])
            for inter, union, gt_empty, no_target, sample_id in rows:
                self._record(int(inter), int(union), bool(gt_empty), bool(no_target), sample_id)
        return self

    # ---------------------------------------------------------------- metrics
    def per_sample_iou(self) -> np.ndarray:
        """(N,) float64 IoU of each sample under ReLA's convention (see the module docstring)."""
        inter = np.asarray(self.inter, dtype=np.float64)
        union = np.asarray(self.union, dtype=np.float64)
        gt_empty = np.asarray(self.gt_empty, dtype=bool)
        no_target = np.asarray(self.pred_no_target, dtype=bool)
        target_iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
        return np.where(gt_empty, no_target.astype(np.float64), target_iou)

    def compute(self) -> Dict[str, float]:
        """{"gIoU", "cIoU", "N_acc", "T_acc", "Pr@0.7", "Pr@0.8", "Pr@0.9": float in [0, 1] or NaN when no
        sample applies; "num_samples", "num_no_target": int}. NaN cases: everything but the counts with no
        sample; cIoU when every U is 0; N_acc without no-target samples; T_acc and Pr@X without target
        samples."""
        iou = self.per_sample_iou()
        gt_empty = np.asarray(self.gt_empty, dtype=bool)
        no_target = np.asarray(self.pred_no_target, dtype=bool)
        n = len(iou)
        n_empty = int(gt_empty.sum())
        n_target = n - n_empty
        out: Dict[str, float] = {
            "gIoU": _ratio(iou.sum(), n),
            # Python ints: the sums cannot overflow however many samples there are
            "cIoU": _ratio(sum(self.inter), sum(self.union)),
            "N_acc": _ratio(int((gt_empty & no_target).sum()), n_empty),
            "T_acc": _ratio(int((~gt_empty & ~no_target).sum()), n_target),
        }
        target_iou = iou[~gt_empty]
        for thr in PR_THRESHOLDS:
            out[f"Pr@{thr:.1f}"] = _ratio(int((target_iou >= thr).sum()), n_target)
        out["num_samples"] = n
        out["num_no_target"] = n_empty
        return out
