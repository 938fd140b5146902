"""Where a dataset's image bytes come from: a folder, or a tar archive read in place.

Datasets name images by an annotation's ``file_name``; an :class:`ImageSource`
turns that name into the file's raw bytes (decoding lives in
:mod:`groundlab.data.image_decode`). :class:`FolderSource` reads a directory;
:class:`TarSource` reads a ``.tar`` / ``.tar.gz`` / ``.tgz`` archive without ever
extracting it, and serves only the archive's own regular-file members. Both are
safe in ``torch.utils.data.DataLoader`` workers (``fork`` and ``spawn``).
:func:`open_image_source` picks the class for a path.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import posixpath
import shutil
import tarfile
import tempfile
import threading
import zlib
from abc import ABC, abstractmethod
from contextlib import suppress

from groundlab.errors import UserError

__all__ = ["IMAGE_EXTENSIONS", "ImageSourceError", "ImageSource", "FolderSource", "TarSource",
           "open_image_source", "default_cache_dir", "archive_cache_root"]

#: Lower-case suffixes that :meth:`ImageSource.names` treats as images.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})

_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
_GZIP_MAGIC = b"\x1f\x8b"
_BZ2_MAGIC = b"BZh"
_XZ_MAGIC = b"\xfd7zXZ\x00"
_CHUNK = 1 << 20  # 1 MiB: the copy buffer when decompressing a .tar.gz


class ImageSourceError(UserError):
    """An image (or the whole source) can not be read.

    Attributes:
        source: path of the folder/archive involved (``str`` or ``None``).
        name: the requested image name, when the error is about one image.
    """

    def __init__(self, message: str, *, source: str | None = None, name: str | None = None):
        super().__init__(message)
        self.source = source
        self.name = name


def default_cache_dir() -> str:
    """``$GROUNDLAB_CACHE`` if set, else ``~/.cache/groundlab``."""
    return os.environ.get("GROUNDLAB_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "groundlab"
    )


def archive_cache_root(cache_dir: str | None = None) -> str:
    """The one folder where every model keeps decompressed ``.tar.gz`` archives: ``{cache_dir}/tar``.

    ``cache_dir`` is groundlab's cache (the config's ``cache_dir``; ``~`` is expanded), or
    :func:`default_cache_dir` when ``None``. Every caller passes that root, never a sub-folder of its own,
    so the same archive opened for two models (or two actions) is decompressed once.
    """
    root = os.path.expanduser(cache_dir) if cache_dir else default_cache_dir()
    return os.path.join(root, "tar")


def _is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _is_os_metadata(name: str) -> bool:
    """macOS AppleDouble files (``._x.jpg``, ``__MACOSX/...``) carry an image suffix
    but are not images; they are kept out of listings."""
    parts = name.split("/")
    return "__MACOSX" in parts or parts[-1].startswith("._")


class ImageSource(ABC):
    """Read-only mapping from image names to raw file bytes.

    Attributes:
        path: the folder or archive this source reads from (``str``).
    """

    path: str

    @abstractmethod
    def read(self, name: str) -> bytes:
        """Return the bytes of image ``name``; :class:`ImageSourceError` if absent."""

    def read_head(self, name: str, size: int) -> bytes:
        """The first ``size`` bytes of image ``name`` (all of it when shorter), for header checks
        that must not read whole photos; :class:`ImageSourceError` if absent."""
        return self.read(name)[:size]

    @abstractmethod
    def exists(self, name: str) -> bool:
        """Whether ``read(name)`` would find an image."""

    @abstractmethod
    def names(self) -> list[str]:
        """Every image-like file (by suffix, case-insensitive), as sorted relative
        ``/``-separated names that :meth:`read` accepts."""

    def close(self) -> None:
        """Release any open handle (a later read reopens it)."""

    def __enter__(self) -> ImageSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r})"


class FolderSource(ImageSource):
    """Images stored as files under a directory.

    Args:
        path: an existing directory.
    """

    def __init__(self, path: str):
        if not os.path.isdir(path):
            raise ImageSourceError(f"image folder {path!r} does not exist or is not a directory", source=path)
        self.path = str(path)

    def _full(self, name: str) -> str:
        # os.path.join semantics on purpose: an absolute name wins over the folder.
        return os.path.join(self.path, name)

    def read(self, name: str) -> bytes:
        full = self._full(name)
        try:
            with open(full, "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise ImageSourceError(
                f"image {name!r} not found in folder {self.path!r} (looked for {full!r})",
                source=self.path, name=name,
            ) from None
        except OSError as e:
            raise ImageSourceError(
                f"cannot read image {name!r} from folder {self.path!r}: {e}", source=self.path, name=name
            ) from e

    def read_head(self, name: str, size: int) -> bytes:
        try:
            with open(self._full(name), "rb") as f:
                return f.read(size)
        except OSError:
            return self.read(name)  # raises the same error read() gives

    def exists(self, name: str) -> bool:
        return os.path.isfile(self._full(name))

    def names(self) -> list[str]:
        out = []
        for root, _dirs, files in os.walk(self.path):
            rel_root = os.path.relpath(root, self.path)
            prefix = "" if rel_root == "." else rel_root.replace(os.sep, "/") + "/"
            rels = (prefix + fn for fn in files)
            out += [r for r in rels if _is_image_name(r) and not _is_os_metadata(r)]
        return sorted(out)


def _safe_member_name(name: str) -> str | None:
    """Normalised member name, or ``None`` when it must never be served
    (absolute, has a ``..`` component, or is empty)."""
    if not name or name.startswith("/") or "\x00" in name or ".." in name.split("/"):
        return None
    norm = posixpath.normpath(name)
    while norm.startswith("./"):  # normpath keeps nothing else that matters here
        norm = norm[2:]
    if norm in (".", "") or norm.startswith("/"):
        return None
    return norm


class TarSource(ImageSource):
    """Images read in place from a ``.tar`` / ``.tar.gz`` / ``.tgz`` archive.

    The archive is scanned once (in the constructing process) to build
    ``index: dict[str, tuple[int, int]]`` mapping normalised member names to
    ``(data offset, size)``. Only regular files are indexed; members with an
    absolute name, a ``..`` component, links, devices and sparse files are
    skipped and counted in ``skipped_members``. If every indexed member lives
    under one top-level directory (``images/a.jpg``, ``images/b.jpg``), the names
    without that directory (``a.jpg``) answer too, and :meth:`names` lists them.

    **Compressed archives.** gzip has no random access, so a ``.tar.gz`` is
    stream-decompressed *once* into ``{cache_dir}/tar/{key}.tar`` (:func:`archive_cache_root`), where ``key``
    is the sha1 of (absolute path, size, mtime_ns). The file is written under a
    temporary name in the same directory and moved into place with
    :func:`os.replace`, so concurrent processes never see a partial file and a
    finished one is reused by later runs (a changed archive gets a new key).
    The disk cost is the archive's uncompressed size; no member is ever
    extracted to the filesystem. ``cache_dir`` defaults to
    :func:`default_cache_dir` (``$GROUNDLAB_CACHE`` or ``~/.cache/groundlab``).

    **Processes.** The file handle is opened lazily and remembered with the
    ``os.getpid()`` that opened it; a forked worker sees a different pid and
    opens its own (a shared descriptor would share its seek position). Pickling
    drops the handle, so ``spawn`` workers work too.

    Args:
        path: the archive.
        cache_dir: groundlab's cache; decompressed ``.tar.gz`` archives go to :func:`archive_cache_root` of it.

    Raises:
        ImageSourceError: missing, unsupported, corrupt or truncated archive.
    """

    def __init__(self, path: str, cache_dir: str | None = None):
        self.path = str(path)
        if not os.path.isfile(self.path):
            raise self._error(f"tar archive {self.path!r} does not exist or is not a file")
        self.cache_dir = cache_dir if cache_dir is not None else default_cache_dir()
        self.data_path = self._uncompressed_path()
        self.index: dict[str, tuple[int, int]] = {}
        self.skipped_members = 0
        self._strip_prefix: str | None = None
        self._build_index()
        self._fh = None
        self._pid: int | None = None
        self._lock = threading.Lock()

    def _error(self, message: str, name: str | None = None) -> ImageSourceError:
        return ImageSourceError(message, source=self.path, name=name)

    # ---------------------------------------------------------------- setup

    def _uncompressed_path(self) -> str:
        """Path of a plain tar with this archive's content (the archive itself or a cache file)."""
        try:
            with open(self.path, "rb") as f:
                magic = f.read(6)
        except OSError as e:
            raise self._error(f"cannot open tar archive {self.path!r}: {e}") from e
        if magic.startswith(_GZIP_MAGIC):
            return self._decompress_to_cache()
        if magic.startswith(_BZ2_MAGIC) or magic.startswith(_XZ_MAGIC):
            raise self._error(f"archive {self.path!r} is bzip2/xz compressed; use .tar or .tar.gz/.tgz")
        return self.path  # decided by content, not suffix: a plain tar named .tgz still works

    def _decompress_to_cache(self) -> str:
        st = os.stat(self.path)
        ident = f"{os.path.abspath(self.path)}\0{st.st_size}\0{st.st_mtime_ns}"
        key = hashlib.sha1(ident.encode("utf-8", "surrogateescape")).hexdigest()
        out_dir = archive_cache_root(self.cache_dir)
        final = os.path.join(out_dir, key + ".tar")
        if os.path.isfile(final):
            return final  # only ever created by os.replace below, so it is complete
        try:
            os.makedirs(out_dir, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=key + ".", suffix=".partial", dir=out_dir)
        except OSError as e:
            raise self._error(f"cannot create a cache file in {out_dir!r} for {self.path!r}: {e}") from e
        try:
            with os.fdopen(fd, "wb") as out, gzip.open(self.path, "rb") as src:
                shutil.copyfileobj(src, out, _CHUNK)
            os.replace(tmp, final)  # atomic: readers see nothing or the whole file
        except BaseException as e:
            with suppress(OSError):
                os.remove(tmp)  # never leave a partial file behind, whatever went wrong
            if isinstance(e, (OSError, EOFError, zlib.error)):
                msg = f"cannot decompress {self.path!r} (corrupt or truncated gzip?) into {final!r}: {e}"
                raise self._error(msg) from e
            raise
        return final

    def _build_index(self) -> None:
        where = self.path if self.data_path == self.path else f"{self.path} (as {self.data_path})"
        try:
            with open(self.data_path, "rb") as f:
                file_size = os.fstat(f.fileno()).st_size
                with tarfile.open(fileobj=f, mode="r:") as tf:
                    while True:
                        m = tf.next()
                        if m is None:
                            break
                        # next() appends every TarInfo to tf.members; we keep only
                        # the index, so drop them to stay flat on huge archives.
                        tf.members.clear()
                        self._add_member(m, file_size, where)
                    end = tf.offset
                # tarfile stops silently at a bad header after the first member;
                # a well-formed archive has a zero block (or nothing) there.
                f.seek(end)
                block = f.read(tarfile.BLOCKSIZE)
                if block and (len(block) < tarfile.BLOCKSIZE or block.count(0) != len(block)):
                    raise self._error(f"tar archive {where!r} is corrupt or truncated at byte {end}")
        except tarfile.TarError as e:
            raise self._error(f"tar archive {where!r} is corrupt or truncated: {e}") from e
        except OSError as e:
            raise self._error(f"cannot read tar archive {where!r}: {e}") from e
        self._strip_prefix = self._common_top_dir()

    def _add_member(self, m: tarfile.TarInfo, file_size: int, where: str) -> None:
        if m.isdir():
            return  # directories are normal, not "skipped"
        name = _safe_member_name(m.name)
        if name is None or not m.isreg() or m.issparse():
            self.skipped_members += 1
            return
        if m.offset_data + m.size > file_size:
            raise self._error(f"tar archive {where!r} is truncated: member {m.name!r} runs past its end")
        self.index[name] = (m.offset_data, m.size)  # a repeated name: the later one wins, as with tar -x

    def _common_top_dir(self) -> str | None:
        """``"dir/"`` when every indexed (non-metadata) member is under ``dir/``
        and stripping it collides with no existing name; else ``None``."""
        tops = {n.split("/", 1)[0] if "/" in n else None for n in self.index if not _is_os_metadata(n)}
        if len(tops) != 1 or None in tops:
            return None
        prefix = tops.pop() + "/"
        if any(n[len(prefix):] in self.index for n in self.index if n.startswith(prefix)):
            return None  # e.g. images/a.jpg and images/images/a.jpg: ambiguous
        return prefix

    # ---------------------------------------------------------------- lookup

    def _lookup(self, name: str) -> tuple[int, int] | None:
        key = posixpath.normpath(name) if name else name
        while key.startswith("./"):
            key = key[2:]
        hit = self.index.get(key)
        if hit is None and self._strip_prefix is not None:
            # Index only: never a filesystem path, so "../x" or "/etc/x" can only miss.
            hit = self.index.get(self._strip_prefix + key)
        return hit

    def exists(self, name: str) -> bool:
        return self._lookup(name) is not None

    def names(self) -> list[str]:
        p = self._strip_prefix
        out = [n[len(p):] if p else n for n in self.index if _is_image_name(n) and not _is_os_metadata(n)]
        return sorted(out)

    def _file(self):
        pid = os.getpid()
        if self._fh is None or self._pid != pid:
            # New process (fork) or first use: own handle and a fresh lock (a lock
            # held by another thread at fork time would never be released here).
            if self._fh is not None:
                # The parent's handle, inherited by fork: closing this process's
                # copy of the descriptor leaves the parent's untouched.
                with suppress(OSError):
                    self._fh.close()
            self._lock = threading.Lock()
            self._fh = open(self.data_path, "rb")
            self._pid = pid
        return self._fh

    def read(self, name: str) -> bytes:
        return self._read(name, None)

    def read_head(self, name: str, size: int) -> bytes:
        return self._read(name, size)

    def _read(self, name: str, limit: int | None) -> bytes:
        hit = self._lookup(name)
        if hit is None:
            raise self._error(f"image {name!r} not found in tar archive {self.path!r}", name)
        offset, size = hit
        size = size if limit is None else min(size, limit)
        try:
            fh = self._file()
            with self._lock:  # seek+read is not atomic across threads
                fh.seek(offset)
                data = fh.read(size)
        except OSError as e:
            raise self._error(f"cannot read image {name!r} from tar archive {self.path!r}: {e}", name) from e
        if len(data) != size:
            raise self._error(
                f"image {name!r} in tar archive {self.path!r} is truncated ({len(data)} of {size} bytes); "
                "was the archive modified after it was opened?", name)
        return data

    def close(self) -> None:
        fh, self._fh, self._pid = getattr(self, "_fh", None), None, None
        if fh is not None:
            with suppress(OSError):
                fh.close()

    def __del__(self):
        self.close()  # otherwise an open handle is reported as a ResourceWarning

    # ---------------------------------------------------------------- pickling

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_fh"] = None  # file objects and locks don't pickle; each process opens its own
        state["_pid"] = None
        state["_lock"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


def open_image_source(path: str, cache_dir: str | None = None) -> ImageSource:
    """Open ``path`` as a :class:`FolderSource` (a directory) or :class:`TarSource`
    (a file ending in ``.tar``, ``.tar.gz`` or ``.tgz``, case-insensitive).

    Args:
        path: folder or archive.
        cache_dir: groundlab's cache, passed to :class:`TarSource` (see :func:`archive_cache_root`).

    Raises:
        ImageSourceError: ``path`` does not exist, or is a file of another kind.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        return FolderSource(path)
    if not os.path.exists(path):
        raise ImageSourceError(f"image source {path!r} does not exist", source=path)
    if path.lower().endswith(_TAR_SUFFIXES):
        return TarSource(path, cache_dir=cache_dir)
    raise ImageSourceError(
        f"image source {path!r} is neither a folder nor a .tar/.tar.gz/.tgz archive", source=path
    )
