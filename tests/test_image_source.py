"""Tests for groundlab.data.image_source: folders, .tar and .tar.gz read in place."""

from __future__ import annotations

import io
import os
import pickle
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from groundlab.data.image_source import (
    FolderSource,
    ImageSourceError,
    TarSource,
    open_image_source,
)

# name -> RGB colour of a tiny image; one nested name and one upper-case suffix.
IMAGES = {"a.png": (255, 0, 0), "b.jpg": (0, 255, 0), "sub/c.PNG": (0, 0, 255)}


def _encode(colour, fmt) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (6, 4), colour).save(buf, format=fmt)
    return buf.getvalue()


def _add_bytes(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


@pytest.fixture()
def dataset(tmp_path):
    """A folder of images plus the same files as .tar, .tar.gz and a .tar with a top dir."""
    folder = tmp_path / "images"
    blobs = {}
    for name, colour in IMAGES.items():
        fmt = "JPEG" if name.endswith(".jpg") else "PNG"
        blobs[name] = _encode(colour, fmt)
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(blobs[name])
    (folder / "notes.txt").write_text("not an image")

    def make(path, mode, prefix=""):
        with tarfile.open(path, mode) as tf:
            for name, data in blobs.items():
                _add_bytes(tf, prefix + name, data)
            _add_bytes(tf, prefix + "notes.txt", b"not an image")
        return str(path)

    return {
        "folder": str(folder),
        "blobs": blobs,
        "tar": make(tmp_path / "flat.tar", "w"),
        "tgz": make(tmp_path / "flat.tar.gz", "w:gz"),
        "top": make(tmp_path / "top.tar", "w", prefix="images/"),
        "cache": str(tmp_path / "cache"),
    }


def test_folder_tar_and_targz_agree(dataset):
    sources = [
        open_image_source(dataset["folder"]),
        open_image_source(dataset["tar"]),
        open_image_source(dataset["tgz"], cache_dir=dataset["cache"]),
    ]
    assert isinstance(sources[0], FolderSource)
    assert isinstance(sources[1], TarSource) and isinstance(sources[2], TarSource)
    expected_names = sorted(IMAGES)
    for src in sources:
        assert src.names() == expected_names, src
        for name, data in dataset["blobs"].items():
            assert src.exists(name)
            assert src.read(name) == data
        assert src.exists("notes.txt") and not src.exists("missing.png")


def test_read_head_reads_only_the_first_bytes(dataset):
    for src in (open_image_source(dataset["folder"]), open_image_source(dataset["tar"]),
                open_image_source(dataset["tgz"], cache_dir=dataset["cache"]), open_image_source(dataset["top"])):
        for name, data in dataset["blobs"].items():
            assert src.read_head(name, 10) == data[:10]
            assert src.read_head(name, 10**6) == data
        with pytest.raises(ImageSourceError, match="nope.jpg"):
            src.read_head("nope.jpg", 10)


def test_folder_accepts_absolute_names(dataset):
    src = FolderSource(dataset["folder"])
    absolute = os.path.join(dataset["folder"], "a.png")
    assert src.read(absolute) == dataset["blobs"]["a.png"]


def test_top_level_dir_is_stripped(dataset):
    src = TarSource(dataset["top"])
    assert src.names() == sorted(IMAGES)
    for name, data in dataset["blobs"].items():
        assert src.read(name) == data
        assert src.read("images/" + name) == data  # the full member name still works
        assert src.read("./" + name) == data


def test_top_level_dir_not_stripped_when_ambiguous(tmp_path):
    path = tmp_path / "amb.tar"
    with tarfile.open(path, "w") as tf:
        _add_bytes(tf, "images/a.png", b"outer")
        _add_bytes(tf, "images/images/a.png", b"inner")
    src = TarSource(str(path))
    assert src.read("images/a.png") == b"outer"
    assert src.read("images/images/a.png") == b"inner"
    assert not src.exists("a.png")


def test_malicious_tar_members_are_never_served(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    path = work / "evil.tar"
    with tarfile.open(path, "w") as tf:
        _add_bytes(tf, "ok.png", b"fine")
        _add_bytes(tf, "../evil.png", b"escape")
        _add_bytes(tf, "/abs.png", b"absolute")
        _add_bytes(tf, "sub/../../evil2.png", b"escape2")
        link = tarfile.TarInfo("passwd.png")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        tf.addfile(link)
        hard = tarfile.TarInfo("hard.png")
        hard.type = tarfile.LNKTYPE
        hard.linkname = "ok.png"
        tf.addfile(hard)
    before = sorted(os.listdir(tmp_path)), sorted(os.listdir(work))

    src = open_image_source(str(path))
    assert src.skipped_members == 5
    assert src.names() == ["ok.png"]
    assert src.read("ok.png") == b"fine"
    for bad in ["../evil.png", "/abs.png", "abs.png", "evil.png", "../../evil2.png",
                "passwd.png", "hard.png", "../../etc/passwd", "/etc/passwd"]:
        assert not src.exists(bad)
        with pytest.raises(ImageSourceError):
            src.read(bad)
    # Nothing was extracted anywhere.
    assert (sorted(os.listdir(tmp_path)), sorted(os.listdir(work))) == before


def test_missing_name_error_names_archive_and_image(dataset):
    src = TarSource(dataset["tar"])
    with pytest.raises(ImageSourceError) as e:
        src.read("nope/zzz.png")
    assert dataset["tar"] in str(e.value) and "nope/zzz.png" in str(e.value)
    assert e.value.source == dataset["tar"] and e.value.name == "nope/zzz.png"
    with pytest.raises(ImageSourceError) as e:
        FolderSource(dataset["folder"]).read("zzz.png")
    assert dataset["folder"] in str(e.value) and "zzz.png" in str(e.value)


def test_open_image_source_errors(tmp_path):
    missing = str(tmp_path / "nowhere.tar")
    with pytest.raises(ImageSourceError, match="nowhere.tar"):
        open_image_source(missing)
    other = tmp_path / "file.zip"
    other.write_bytes(b"PK")
    with pytest.raises(ImageSourceError, match="file.zip"):
        open_image_source(str(other))


def test_targz_cache_created_once_and_reused(dataset):
    cache = dataset["cache"]
    first = TarSource(dataset["tgz"], cache_dir=cache)
    files = os.listdir(os.path.join(cache, "tar"))
    assert len(files) == 1 and files[0].endswith(".tar")  # no temp files left behind
    cached = os.path.join(cache, "tar", files[0])
    assert first.data_path == cached
    mtime = os.stat(cached).st_mtime_ns

    second = TarSource(dataset["tgz"], cache_dir=cache)
    assert second.data_path == cached
    assert os.stat(cached).st_mtime_ns == mtime
    assert os.listdir(os.path.join(cache, "tar")) == files
    assert second.read("b.jpg") == dataset["blobs"]["b.jpg"]


def test_default_cache_dir_from_env(dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("GROUNDLAB_CACHE", str(tmp_path / "envcache"))
    src = TarSource(dataset["tgz"])
    assert src.data_path.startswith(str(tmp_path / "envcache" / "tar"))


def test_corrupt_archives_raise(dataset, tmp_path):
    cache = str(tmp_path / "cache2")
    raw = Path(dataset["tgz"]).read_bytes()
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ImageSourceError, match="truncated.tar.gz"):
        open_image_source(str(truncated), cache_dir=cache)
    assert not os.listdir(os.path.join(cache, "tar"))  # the partial file was removed

    garbage = tmp_path / "garbage.tgz"
    garbage.write_bytes(b"\x1f\x8b" + os.urandom(200))
    with pytest.raises(ImageSourceError, match="garbage.tgz"):
        open_image_source(str(garbage), cache_dir=cache)

    not_tar = tmp_path / "junk.tar"
    not_tar.write_bytes(b"this is not a tar archive at all" * 40)
    with pytest.raises(ImageSourceError, match="junk.tar"):
        open_image_source(str(not_tar))

    # A plain tar cut inside a later member's header, and inside its data.
    raw_tar = Path(dataset["tar"]).read_bytes()
    with tarfile.open(dataset["tar"]) as tf:
        last = tf.getmembers()[-2]  # the last image (the very last member is notes.txt)
    for i, end in enumerate([last.offset + 100, last.offset_data + last.size // 2]):
        cut = tmp_path / f"cut{i}.tar"
        cut.write_bytes(raw_tar[:end])
        with pytest.raises(ImageSourceError, match=f"cut{i}.tar"):
            open_image_source(str(cut))


def test_pickle_drops_handle_and_reopens(dataset):
    src = TarSource(dataset["tar"])
    assert src.read("a.png") == dataset["blobs"]["a.png"]  # opens the handle
    clone = pickle.loads(pickle.dumps(src))
    assert clone._fh is None
    assert clone.read("sub/c.PNG") == dataset["blobs"]["sub/c.PNG"]
    assert clone.index == src.index


class _TarDataset(torch.utils.data.Dataset):
    """Module level so that spawn workers can unpickle it."""

    def __init__(self, source: TarSource, names: list[str]):
        self.source = source
        self.names = names

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i):
        return self.names[i], self.source.read(self.names[i]), os.getpid()


@pytest.mark.parametrize("context", [None, "spawn"])
def test_dataloader_workers(dataset, context):
    src = TarSource(dataset["tgz"], cache_dir=dataset["cache"])
    src.read("a.png")  # a parent-side handle must not leak into forked workers
    names = sorted(IMAGES) * 4
    loader = torch.utils.data.DataLoader(
        _TarDataset(src, names), batch_size=None, num_workers=2,
        multiprocessing_context=context,
    )
    seen, pids = [], set()
    for name, data, pid in loader:
        assert data == dataset["blobs"][name]
        seen.append(name)
        pids.add(pid)
    assert seen == names
    assert os.getpid() not in pids and len(pids) == 2
    assert src.read("b.jpg") == dataset["blobs"]["b.jpg"]  # parent handle still fine
