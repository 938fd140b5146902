"""Read-time box sanitation shared by the annotation readers: malformed boxes are errors naming
their place; boxes outside the image are clamped and counted; degenerate boxes are dropped and counted."""

from __future__ import annotations

import math
from typing import Any, List, Optional

from groundlab.errors import DataError
from groundlab.data.read_stats import ReadStats


def parse_box(value: Any, where: str) -> List[float]:
    """Four finite numbers, or a DataError naming `where`."""
    if not isinstance(value, (list, tuple)) or len(value) != 4:
        raise DataError(f"bbox must be 4 numbers, got {value!r}", where)
    try:
        box = [float(v) for v in value]
    except (TypeError, ValueError):
        raise DataError(f"bbox must be 4 numbers, got {value!r}", where) from None
    if not all(math.isfinite(v) for v in box):
        raise DataError(f"bbox has a non-finite value: {value!r}", where)
    return box


def clean_box(
    box: List[float], height: Optional[int], width: Optional[int], where: str, stats: ReadStats
) -> Optional[List[float]]:
    """Clamp an xyxy box into a (height, width) image (when known); None if it is degenerate."""
    x1, y1, x2, y2 = box
    if width is not None and height is not None:
        cx1, cy1 = min(max(x1, 0.0), width), min(max(y1, 0.0), height)
        cx2, cy2 = min(max(x2, 0.0), width), min(max(y2, 0.0), height)
        if (cx1, cy1, cx2, cy2) != (x1, y1, x2, y2):
            stats.add("boxes clamped to the image", where)
        x1, y1, x2, y2 = cx1, cy1, cx2, cy2
    if x2 <= x1 or y2 <= y1:
        stats.add("degenerate boxes dropped", where)
        return None
    return [x1, y1, x2, y2]
