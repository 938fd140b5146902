"""Images that cannot be decoded (truncated files, garbage bytes, anything `image_decode.decode_rgb` refuses):
one bad image does not end a run over thousands.

* Evaluation and inference: a dataset returns a :class:`BadImage` in place of the sample; the collate keeps
  the good items and passes the bad ones on (:func:`split_bad`), and the action skips them, names each in the
  log (:func:`log_skipped`) and lists them in its outputs.
* Training: a dataset counts the image in its :class:`BadImageBudget` (which names it in the log, once) and
  returns another sample instead; the budget stops the run with a DataError when more than
  `dataset.max_bad_image_fraction` of the training images failed. The count is per process: each DataLoader
  worker holds its own copy of the dataset (workers are made again every epoch), so the bound holds per
  loader process, not summed over the workers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Dict, Hashable, List, Optional, Sequence, Tuple

from groundlab.errors import DataError

log = logging.getLogger(__name__)

FRACTION_KEY = "dataset.max_bad_image_fraction"


@dataclass
class BadImage:
    """A dataset item whose image could not be decoded. source: the image folder or archive; reason: the
    decoder's sentence; image_id: the annotation file's id (annotated datasets); index: the dataset index.
    Not frozen: Lightning moves batches to the device field by field, and refuses frozen dataclasses."""

    file_name: str
    source: str
    reason: str
    image_id: Optional[int] = None
    index: Optional[int] = None

    def as_dict(self) -> Dict[str, Any]:
        """{"file_name", "source", "reason"} (+ "image_id" when known), as outputs list it."""
        out: Dict[str, Any] = {"file_name": self.file_name, "source": self.source, "reason": self.reason}
        if self.image_id is not None:
            out["image_id"] = self.image_id
        return out


def split_bad(items: Sequence[Any]) -> Tuple[List[Any], List[BadImage]]:
    """(good items, BadImage markers) of a batch's items, each in order."""
    good = [it for it in items if not isinstance(it, BadImage)]
    return good, [it for it in items if isinstance(it, BadImage)]


def log_skipped(bad: BadImage, what: str = "") -> None:
    """One warning line: `skipped undecodable image <source>/<name>: <reason>` (+ `what`, e.g. how it counts)."""
    log.warning("skipped undecodable image %s/%s: %s%s", bad.source.rstrip("/"), bad.file_name, bad.reason,
                f" ({what})" if what else "")


class BadImageBudget:
    """The undecodable training images one process met, each named in the log once.

    num_images: how many images the dataset holds (the fraction's denominator); max_fraction: the config's
    `dataset.max_bad_image_fraction`. :meth:`record` raises DataError, naming the count, the fraction and the
    key, when the distinct bad images exceed ``max_fraction * num_images``."""

    def __init__(self, max_fraction: float, num_images: int, what: str = "training images"):
        self.max_fraction, self.num_images, self.what = float(max_fraction), int(num_images), what
        self.bad: Dict[Hashable, BadImage] = {}

    def __len__(self) -> int:
        return len(self.bad)

    def __contains__(self, key: Hashable) -> bool:
        return key in self.bad

    def record(self, key: Hashable, bad: BadImage) -> None:
        """Count image `key` (e.g. (source index, file name)) as undecodable; a known one counts once."""
        if key in self.bad:
            return
        self.bad[key] = bad
        n, total = len(self.bad), max(self.num_images, 1)
        if n > self.max_fraction * total:
            raise DataError(
                f"{n} of the {total} {self.what} could not be decoded in this data-loader process ({n / total:.2%}), "
                f"more than {FRACTION_KEY}={self.max_fraction:g} allows (the last: {bad.source.rstrip('/')}/"
                f"{bad.file_name}: {bad.reason}); fix or remove them, or raise {FRACTION_KEY}")
        log.warning("undecodable training image %s/%s replaced by another sample (%d of the %d %s so far in this "
                    "process, %s=%g): %s", bad.source.rstrip("/"), bad.file_name, n, total, self.what, FRACTION_KEY,
                    self.max_fraction, bad.reason)
