"""Tests for groundlab.data.record_index.RecordIndex."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from groundlab.data.record_index import RecordIndex

RECORDS = [
    {"id": 1, "file_name": "a.jpg", "height": 480, "width": 640},
    {"id": 2, "caption": "a cat on a mat", "boxes": [[0.0, 1.5, 10.0, 20.0], [3, 4, 5, 6]], "mask": None},
    {"id": 3, "nested": {"tokens": ["a", "cat"], "spans": [(0, 1), (2, 5)]}, "empty": []},
    {},
    {"id": 5, "unicode": "caf\u00e9 \u732b", "flag": True, "score": float("inf"), "blob": b"\x00\x01"},
]


def test_round_trip_equality():
    idx = RecordIndex.build(RECORDS)
    assert len(idx) == len(RECORDS)
    for i, rec in enumerate(RECORDS):
        assert idx[i] == rec
    assert list(idx) == RECORDS
    assert idx[1:4] == RECORDS[1:4]


def test_storage_is_two_numpy_arrays():
    idx = RecordIndex.build(RECORDS)
    assert idx.data.dtype == np.uint8 and idx.data.ndim == 1
    assert idx.offsets.dtype == np.int64 and idx.offsets.shape == (len(RECORDS) + 1,)
    assert idx.offsets[0] == 0 and idx.offsets[-1] == len(idx.data)
    assert idx.nbytes == idx.data.nbytes + idx.offsets.nbytes
    assert not idx.data.flags.writeable and not idx.offsets.flags.writeable
    assert not hasattr(idx, "__dict__")  # nothing else is stored


def test_returns_fresh_dicts():
    idx = RecordIndex.build(RECORDS)
    rec = idx[1]
    rec["boxes"].append("mutated")
    rec["id"] = 99
    assert idx[1] == RECORDS[1]
    assert idx[1] is not idx[1]


def test_negative_index_and_out_of_range():
    idx = RecordIndex.build(RECORDS)
    assert idx[-1] == RECORDS[-1]
    assert idx[-len(RECORDS)] == RECORDS[0]
    for bad in (len(RECORDS), -len(RECORDS) - 1, 10**9):
        with pytest.raises(IndexError):
            idx[bad]
    with pytest.raises(TypeError):
        idx["0"]
    assert idx[np.int64(2)] == RECORDS[2]


def test_pickle_round_trip_is_compact():
    records = ({"id": i, "name": f"img_{i:06d}.jpg", "box": [i, i, 2 * i, 3 * i]} for i in range(2000))
    idx = RecordIndex.build(records)
    blob = pickle.dumps(idx, protocol=5)
    # Just the two arrays plus a small constant, not one object per record.
    assert len(blob) < idx.nbytes + 1024
    back = pickle.loads(blob)
    assert isinstance(back, RecordIndex) and len(back) == 2000
    assert back[1234] == {"id": 1234, "name": "img_001234.jpg", "box": [1234, 1234, 2468, 3702]}
    assert np.array_equal(back.data, idx.data) and np.array_equal(back.offsets, idx.offsets)


def test_build_from_generator_consumes_lazily():
    pulled = []

    def gen():
        for i in range(100):
            pulled.append(i)
            yield {"i": i, "sq": i * i}

    idx = RecordIndex.build(gen())
    assert pulled == list(range(100))
    assert len(idx) == 100 and idx[7] == {"i": 7, "sq": 49} and idx[-1]["sq"] == 99 * 99


def test_empty_and_invalid_records():
    empty = RecordIndex.build([])
    assert len(empty) == 0 and list(empty) == []
    with pytest.raises(IndexError):
        empty[0]
    with pytest.raises(TypeError, match="record 1"):
        RecordIndex.build([{"ok": 1}, ["not", "a", "dict"]])


def test_constructor_validates_arrays():
    idx = RecordIndex.build(RECORDS)
    with pytest.raises(ValueError):
        RecordIndex(idx.data.astype(np.int16), idx.offsets)
    with pytest.raises(ValueError):
        RecordIndex(idx.data, idx.offsets[:-1])
