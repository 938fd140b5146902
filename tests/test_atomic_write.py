"""Atomic writes (groundlab.ops.atomic_write, used for checkpoints, results json and label files): a write that
fails midway leaves the previous file exactly as it was and no temporary file; a successful one replaces it
whole, with the permissions a plain open() would have given."""

from __future__ import annotations

import os
import pickle
import stat

import pytest
import torch

from groundlab.models.checkpoint import load_checkpoint, save_checkpoint
from groundlab.ops.atomic_write import atomic_write, atomic_write_text


class WriteFailed(RuntimeError):
    pass


def _half_then_fail(seen):
    def write(tmp: str) -> None:
        seen.append(tmp)
        with open(tmp, "w") as f:
            f.write("NEW CONTENT, FIRST HALF")
            f.flush()
        assert os.path.getsize(tmp) > 0  # something really was written before the failure
        raise WriteFailed("disk full")

    return write


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_failed_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "results.json"
    atomic_write_text(str(path), '{"old": true}')
    seen = []
    with pytest.raises(WriteFailed, match="disk full"):
        atomic_write(str(path), _half_then_fail(seen))
    assert path.read_text() == '{"old": true}'
    assert len(seen) == 1 and os.path.dirname(seen[0]) == str(tmp_path)  # the temp file sat next to it
    assert sorted(os.listdir(tmp_path)) == ["results.json"]


def test_failed_first_write_leaves_nothing(tmp_path):
    path = tmp_path / "sub" / "labels.txt"
    with pytest.raises(WriteFailed):
        atomic_write(str(path), _half_then_fail([]))
    assert not path.exists() and os.listdir(tmp_path / "sub") == []


def test_interrupt_midway_is_cleaned_up_too(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("old")

    def interrupted(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write("partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(str(path), interrupted)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["a.txt"]


def test_successful_write_replaces_the_whole_file(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("a much longer previous content\n" * 10)
    assert atomic_write_text(str(path), "short") == str(path)
    assert path.read_text() == "short" and os.listdir(tmp_path) == ["a.txt"]


def test_written_files_get_the_permissions_open_gives(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")  # the process umask applied to 0o666
    new = tmp_path / "new.txt"
    atomic_write_text(str(new), "y")
    assert _mode(new) == _mode(plain)
    save_checkpoint(str(tmp_path / "m.pth"), torch.nn.Linear(2, 2), {"name": "test"})
    assert _mode(tmp_path / "m.pth") == _mode(plain)  # readable by whoever reads the run's outputs
    os.chmod(plain, 0o640)  # an existing file keeps its mode, as it would when opened with "w"
    atomic_write_text(str(plain), "z")
    assert _mode(plain) == 0o640 and plain.read_text() == "z"


def test_checkpoint_save_that_fails_midway_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "gdino_model_latest.pth"
    torch.manual_seed(0)
    first, second = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    save_checkpoint(str(path), first, {"name": "gdino", "hidden_dim": 4}, meta={"epoch": 1})
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):  # torch.save fails in the middle
        save_checkpoint(str(path), second, {"name": "gdino", "hidden_dim": 4}, meta={"epoch": 2},
                        extra={"not_picklable": lambda: None})
    assert os.listdir(tmp_path) == ["gdino_model_latest.pth"]
    ckpt = load_checkpoint(str(path))
    assert ckpt["meta"] == {"epoch": 1}
    for key, value in first.state_dict().items():
        assert torch.equal(ckpt["state_dict"][key], value), key
    assert not torch.equal(ckpt["state_dict"]["weight"], second.weight)
