"""Writing a file so that readers see the old version or the whole new one, never half of it: a temp file in
the same folder, flushed, then os.replace. Used for checkpoints, results json and label files."""

from __future__ import annotations

import os
import stat
import uuid
from typing import Callable


def _new_temp_file(path: str) -> str:
    """An empty new file next to `path` with the permissions open(path, "w") would give it: path's own mode
    when it exists, else 0o666 less the umask (tempfile.mkstemp's 0o600 would make every output private)."""
    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".tmp_{uuid.uuid4().hex[:12]}_{name}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        if os.path.exists(path):
            os.fchmod(fd, stat.S_IMODE(os.stat(path).st_mode))
    except BaseException:
        os.remove(tmp)
        raise
    finally:
        os.close(fd)
    return tmp


def atomic_write(path: str, write: Callable[[str], None]) -> str:
    """Call write(temp_path), then rename the temp file onto `path` (parent folders are made); returns path.
    On any failure the temp file is removed and `path` is left as it was. The new file has the permissions
    a plain open(path, "w") would have given it."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = _new_temp_file(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def atomic_write_text(path: str, text: str) -> str:
    """atomic_write of a text file, fsync'ed before the rename."""
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    return atomic_write(path, write)
