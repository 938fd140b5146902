"""MAL's mask quality metric: IoU of each predicted instance mask with its true mask; mIoU = mean over
classes of the per-class mean IoU (classes without boxes left out), overall and for small (box area
<= 32^2), medium (<= 96^2) and large boxes, as MAL/TAO report it."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from groundlab.ops.area_buckets import BUCKET_NAMES, area_bucket

BUCKETS = BUCKET_NAMES


def mask_iou(pred: torch.Tensor, gt_crop: torch.Tensor, gt_area: float) -> float:
    """pred and gt_crop: the same image region (bool/0-1); gt_area: the true mask's whole-image area
    (true pixels outside the region count as missed)."""
    inter = float((pred.bool() & gt_crop.bool()).sum())
    union = float(pred.bool().sum()) + float(gt_area) - inter
    return inter / union if union > 0 else 0.0


class MaskIoUMeter:
    """Running per-class IoU sums and counts: `total`/`count` (num_classes,), and per size bucket."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.total = torch.zeros(4, num_classes, dtype=torch.float64)  # row 0 all, rows 1..3 buckets
        self.count = torch.zeros(4, num_classes, dtype=torch.float64)

    def update(self, labels: Sequence[int], ious: Sequence[float], areas: torch.Tensor) -> None:
        buckets = area_bucket(torch.as_tensor(areas, dtype=torch.float32)).tolist()
        for label, iou, b in zip(labels, ious, buckets):
            for row in (0, 1 + b):
                self.total[row, int(label)] += float(iou)
                self.count[row, int(label)] += 1

    def state(self) -> torch.Tensor:
        return torch.stack([self.total, self.count])

    def merge(self, states: List[torch.Tensor]) -> None:
        """Replace the sums by the sum of several meters' `state()` (e.g. gathered from every rank)."""
        s = torch.stack([t.cpu() for t in states]).sum(0)
        self.total, self.count = s[0], s[1]

    @staticmethod
    def _miou(total: torch.Tensor, count: torch.Tensor) -> Optional[float]:
        present = count > 0
        return float((total[present] / count[present]).mean()) if present.any() else None

    def compute(self, class_names: Optional[Sequence[str]] = None) -> Dict[str, object]:
        """{"mIoU", "mIoU_small", "mIoU_medium", "mIoU_large" (None when no box of that size),
        "num_instances", "per_class": {name: {"mIoU", "count"}}}."""
        out: Dict[str, object] = {"mIoU": self._miou(self.total[0], self.count[0])}
        for i, name in enumerate(BUCKETS):
            out[f"mIoU_{name}"] = self._miou(self.total[i + 1], self.count[i + 1])
        out["num_instances"] = int(self.count[0].sum())
        names = list(class_names) if class_names else [str(i) for i in range(self.num_classes)]
        out["per_class"] = {names[c]: {"mIoU": float(self.total[0, c] / self.count[0, c]), "count": int(self.count[0, c])}
                            for c in range(self.num_classes) if self.count[0, c] > 0}
        return out


def score_batch(masks: List[Tuple[torch.Tensor, Any]], batch: Dict[str, Any], meter: MaskIoUMeter) -> List[float]:
    """IoU of each pasted mask (MAL post-processor output: (region, place)) with the batch's gt_crop; adds them to `meter`."""
    ious = [mask_iou(m, gt.cpu(), float(a)) for (m, _), gt, a in zip(masks, batch["gt_crop"], batch["gt_area"])]
    meter.update(batch["label"].tolist(), ious, batch["area"])
    return ious
