"""A compact, read-only store of annotation records (dicts) that stays flat in
DataLoader workers.

Why not a ``list[dict]``? Every Python object carries a reference count, and
merely *reading* a record from a list increments it. After ``fork`` the
workers share the parent's memory copy-on-write, so those refcount writes
dirty the pages holding the dicts, and each worker slowly ends up with its own
copy of the whole annotation set (the "DataLoader memory leak"). With a
million records that is gigabytes per worker.

:class:`RecordIndex` instead keeps each record pickled inside one uint8 numpy
buffer, with an int64 offsets array saying where each record starts. Two
numpy buffers have two object headers between them; their data pages are never
written, so they stay shared. Indexing unpickles a fresh dict on demand
(microseconds for a typical COCO image record).

Storage layout::

    data:    uint8[total_bytes]   pickled records back to back (protocol 5)
    offsets: int64[n + 1]         record i is data[offsets[i]:offsets[i + 1]]
"""

from __future__ import annotations

import array
import operator
import pickle
from collections.abc import Iterable, Sequence

import numpy as np

__all__ = ["RecordIndex"]

_PROTOCOL = 5


class RecordIndex(Sequence[dict]):
    """Immutable sequence of dicts, stored as two numpy arrays.

    Build with :meth:`build`; ``index[i]`` returns a new dict each time (mutating
    it does not change the index). Pickling pickles just the two arrays, so
    sending the index to ``spawn`` workers is one bulk copy.

    Args:
        data: ``uint8[total_bytes]`` pickled records.
        offsets: ``int64[n + 1]``, starting at 0, non-decreasing, ending at
            ``len(data)``.
    """

    __slots__ = ("_data", "_offsets")

    def __init__(self, data: np.ndarray, offsets: np.ndarray):
        # Views, so marking them read-only below never touches a caller's array.
        data = np.asarray(data).view()
        offsets = np.asarray(offsets).view()
        if data.dtype != np.uint8 or data.ndim != 1:
            raise ValueError(f"RecordIndex data must be 1-D uint8, got {data.dtype} with shape {data.shape}")
        if offsets.dtype != np.int64 or offsets.ndim != 1 or len(offsets) == 0:
            raise ValueError(
                f"RecordIndex offsets must be non-empty 1-D int64, got {offsets.dtype} {offsets.shape}"
            )
        if offsets[0] != 0 or offsets[-1] != len(data) or (len(offsets) > 1 and np.any(np.diff(offsets) < 0)):
            raise ValueError(
                "RecordIndex offsets must start at 0, never decrease and end at len(data) "
                f"({len(data)}); got first={int(offsets[0])}, last={int(offsets[-1])}"
            )
        # Read-only: the buffers are shared between processes and between
        # copies of the index, and nothing should ever write into them.
        data.flags.writeable = False
        offsets.flags.writeable = False
        self._data = data
        self._offsets = offsets

    @classmethod
    def build(cls, records: Iterable[dict]) -> RecordIndex:
        """Serialize ``records`` one at a time (a generator is never materialised).

        Args:
            records: iterable of dicts (anything picklable inside them).

        Returns:
            A new :class:`RecordIndex` with ``len == number of records``.

        Raises:
            TypeError: a record is not a dict (the message gives its position).
        """
        buf = bytearray()
        # array('q') grows in place at 8 bytes per entry, unlike a list of ints.
        offsets = array.array("q", [0])
        for i, rec in enumerate(records):
            if not isinstance(rec, dict):
                raise TypeError(f"RecordIndex.build: record {i} is a {type(rec).__name__}, expected dict")
            buf += pickle.dumps(rec, protocol=_PROTOCOL)
            offsets.append(len(buf))
        # frombuffer shares the bytearray's memory instead of copying it, so the
        # peak is one serialized copy, not two.
        data = np.frombuffer(buf, dtype=np.uint8) if buf else np.zeros(0, dtype=np.uint8)
        return cls(data, np.frombuffer(offsets, dtype=np.int64).copy())

    # ------------------------------------------------------------- sequence

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, i):
        """``index[i]`` -> a fresh dict; ``index[a:b:c]`` -> a list of dicts.

        Raises:
            IndexError: ``i`` out of range (negative indices count from the end).
        """
        if isinstance(i, slice):
            return [self._record(j) for j in range(*i.indices(len(self)))]
        try:
            j = operator.index(i)
        except TypeError:
            raise TypeError(f"RecordIndex indices must be ints or slices, not {type(i).__name__}") from None
        n = len(self)
        if j < 0:
            j += n
        if not 0 <= j < n:
            raise IndexError(f"RecordIndex index {i} out of range for {n} records")
        return self._record(j)

    def _record(self, j: int) -> dict:
        start, stop = int(self._offsets[j]), int(self._offsets[j + 1])
        # pickle.loads takes any bytes-like object: no intermediate bytes copy.
        return pickle.loads(memoryview(self._data[start:stop]))

    def __iter__(self):
        for j in range(len(self)):
            yield self._record(j)

    # ------------------------------------------------------------- storage

    @property
    def nbytes(self) -> int:
        """Bytes held by the two arrays (pickled data + offsets)."""
        return int(self._data.nbytes + self._offsets.nbytes)

    @property
    def data(self) -> np.ndarray:
        """``uint8[total_bytes]``, read-only."""
        return self._data

    @property
    def offsets(self) -> np.ndarray:
        """``int64[n + 1]``, read-only."""
        return self._offsets

    def __reduce__(self):
        # Rebuild from the two arrays: numpy pickles each as one contiguous
        # buffer (out-of-band under protocol 5), nothing per record.
        return (type(self), (self._data, self._offsets))

    def __repr__(self) -> str:
        return f"RecordIndex({len(self)} records, {self.nbytes} bytes)"
