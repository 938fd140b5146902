"""Counts of what a reader fixed or skipped, so nothing is lost silently: every clamp, drop and
skip is counted and the first few places are kept for the log."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Dict, List

log = logging.getLogger(__name__)

MAX_EXAMPLES = 5


@dataclass
class ReadStats:
    """Per-file tallies: records, boxes, boxes clamped into the image, degenerate boxes dropped,
    crowd boxes, images missing (skipped when the user asked)."""

    source: str
    records: int = 0
    boxes: int = 0
    counts: Dict[str, int] = field(default_factory=dict)
    examples: Dict[str, List[str]] = field(default_factory=dict)

    def add(self, what: str, where: str, n: int = 1) -> None:
        self.counts[what] = self.counts.get(what, 0) + n
        ex = self.examples.setdefault(what, [])
        if len(ex) < MAX_EXAMPLES:
            ex.append(where)

    def get(self, what: str) -> int:
        return self.counts.get(what, 0)

    def summary(self) -> str:
        parts = [f"{self.source}: {self.records} images, {self.boxes} boxes"]
        for what, n in sorted(self.counts.items()):
            parts.append(f"{n} {what} (e.g. {', '.join(self.examples[what])})")
        return "; ".join(parts)

    def log(self) -> None:
        (log.warning if self.counts else log.info)(self.summary())
