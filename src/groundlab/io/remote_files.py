"""Files named by an `s3://`, `gs://` or `http(s)://` URI, fetched once into groundlab's cache.

`local_path(uri, cache_dir, key)` is the one door: a local path comes back unchanged; a URI is read through
fsspec (s3fs for S3, gcsfs for GCS, aiohttp for HTTP) and copied to
`{cache_dir}/remote/{sha1(location, version)}/{file name}`, where the version is the object's ETag (or
Last-Modified) and size. An unchanged object is found in the cache without a transfer; an overwritten one has a
new version, so a new cache entry is fetched. The file keeps its name, so what follows (`.tar.gz` archives read
by TarSource, `.jsonl` vs `.json`, `.safetensors`) works as for a local file; archives stay archives.

Credentials are never ours: they come from the libraries' usual places (AWS_ACCESS_KEY_ID / AWS_PROFILE /
~/.aws, AWS_ENDPOINT_URL, GOOGLE_APPLICATION_CREDENTIALS, fsspec's config files). A URI itself may carry them
(`https://user:pass@host/...`, a presigned `?X-Amz-Signature=...`): `redact` hides those parts wherever we log or
record a URI.
"""

from __future__ import annotations

import hashlib
import logging
import os
import posixpath
import re
from contextlib import suppress
from typing import Any, Dict, Optional
from urllib.parse import urlsplit, urlunsplit

from groundlab.errors import MissingFile, UserError
from groundlab.ops.atomic_write import atomic_write

log = logging.getLogger(__name__)

__all__ = ["REMOTE_SCHEMES", "RemoteFileError", "is_remote", "redact", "local_path", "use_cache_dir",
           "remote_cache_root"]

REMOTE_SCHEMES = ("s3", "gs", "gcs", "http", "https")
# the package fsspec needs per scheme, for the one sentence when it is missing
_PACKAGES = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "http": "aiohttp", "https": "aiohttp"}
# a URI ends where a list or mapping of them goes on (`image_dir=[s3://a,s3://b]`): `,[]{}` end it too
_URI = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>,\[\]{}]+")
_CHUNK = 1 << 20

# The run's `cache_dir`, set once by the runner: model loaders never see the config, and fetch into the same
# cache as the data this way. None: $GROUNDLAB_CACHE or ~/.cache/groundlab (the config's own default).
_run_cache_dir: Optional[str] = None


class RemoteFileError(UserError):
    """A URI that can not be read (no access, no network, not a single object); the message names the URI."""


def is_remote(path: Any) -> bool:
    """Whether `path` is a URI of a scheme `local_path` fetches (`s3`, `gs`/`gcs`, `http`, `https`)."""
    return isinstance(path, str) and "://" in path and path.split("://", 1)[0].lower() in REMOTE_SCHEMES


def _redact_one(uri: str) -> str:
    parts = urlsplit(uri)
    netloc = parts.netloc
    if "@" in netloc:  # user:password@host
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    query = "***" if parts.query else ""  # presigned URLs carry their signature and key id here
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact(text: Any) -> Any:
    """`text` (str) with every URI's user info and query string replaced by `***`; other values unchanged."""
    return _URI.sub(lambda m: _redact_one(m.group(0)), text) if isinstance(text, str) else text


def use_cache_dir(cache_dir: Optional[str]) -> None:
    """Make `cache_dir` (the run's config `cache_dir`) the cache of every later `local_path` without one."""
    global _run_cache_dir
    _run_cache_dir = os.path.expanduser(cache_dir) if cache_dir else None


def remote_cache_root(cache_dir: Optional[str] = None) -> str:
    """`{cache_dir}/remote`: fetched objects (cache_dir: as `local_path` takes it)."""
    root = cache_dir or _run_cache_dir or os.environ.get("GROUNDLAB_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "groundlab")
    return os.path.join(os.path.expanduser(root), "remote")


def _filesystem(uri: str, key: str):
    """(fsspec filesystem, its path of `uri`); a missing protocol package is one sentence saying which."""
    import fsspec

    scheme = uri.split("://", 1)[0].lower()
    try:
        return fsspec.core.url_to_fs(uri)
    except ImportError:
        raise RemoteFileError(f"{key}={redact(uri)}: reading {scheme}:// URIs needs the package "
                              f"{_PACKAGES[scheme]} (pip install {_PACKAGES[scheme]}).") from None


def _version(info: Dict[str, Any]) -> Optional[str]:
    """What changes when the object does: its ETag (S3, HTTP), GCS's md5/generation, else its Last-Modified time,
    with the size; None when the server tells none of them."""
    tag = None
    for field in ("ETag", "etag", "md5Hash", "generation", "Last-Modified", "LastModified", "updated", "mtime"):
        if info.get(field):
            tag = f"{field}={info[field]}"
            break
    size = info.get("size")
    if tag is None and size is None:
        return None
    return f"{tag}\0size={size}"


def local_path(uri: Optional[str], cache_dir: Optional[str] = None, key: str = "path") -> Optional[str]:
    """The local file of `uri`: the value itself when it is not a remote URI (a local path, "" or None), else the
    cached copy of the object, fetched when the cache has no copy of its current version.

    cache_dir: groundlab's cache (the config's `cache_dir`); None: the run's (see `use_cache_dir`).
    key: the config key that named `uri`, for messages.
    Raises MissingFile when the object does not exist, RemoteFileError when it can not be read; both name the
    (redacted) URI in one sentence."""
    if not is_remote(uri):
        return uri
    shown = redact(uri)
    fs, path = _filesystem(uri, key)
    try:
        with suppress(Exception):
            fs.invalidate_cache(path)  # a listing cached earlier in this process would hide a changed object
        info = fs.info(path)
    except FileNotFoundError:
        raise MissingFile(f"{key}={shown} does not exist (no such object).") from None
    except Exception as err:  # noqa: BLE001 - any client error (access, network) is the user's to fix
        raise RemoteFileError(f"{key}={shown} cannot be read: {redact(str(err)) or type(err).__name__}.") from None
    if info.get("type") == "directory":
        raise RemoteFileError(f"{key}={shown} is a folder (a prefix), not one object: give a file "
                              f"(images as one .tar/.tar.gz archive).")
    parts = urlsplit(uri)
    location = f"{parts.scheme.lower()}://{parts.netloc.rsplit('@', 1)[-1]}{parts.path}"  # never the credentials
    version = _version(info)
    name = posixpath.basename(parts.path.rstrip("/")) or "file"
    digest = hashlib.sha1(f"{location}\0{version}".encode()).hexdigest()[:24]
    folder = os.path.join(remote_cache_root(cache_dir), digest)
    final = os.path.join(folder, name)
    if version is not None and os.path.isfile(final):
        return final  # only ever created by os.replace below, so it is complete
    _fetch(fs, path, final, info.get("size"), key, shown)
    return final


def _fetch(fs, path: str, final: str, size: Optional[int], key: str, shown: str) -> None:
    """Copy the object to `final` through a temporary file in its folder, then os.replace (ops.atomic_write: the
    cache file gets the permissions of a plain open(), so a shared cache stays readable): concurrent processes
    (DDP ranks) never see a partial file."""
    def copy(tmp: str) -> None:
        with open(tmp, "wb") as out, fs.open(path, "rb") as src:
            while True:
                chunk = src.read(_CHUNK)
                if not chunk:
                    break
                out.write(chunk)
        got = os.path.getsize(tmp)
        if size is not None and got != size:
            raise RemoteFileError(f"{key}={shown}: fetched {got} of {size} bytes (did the object change while "
                                  f"it was read?).")

    try:
        atomic_write(final, copy)
    except BaseException as err:
        if isinstance(err, FileNotFoundError):
            raise MissingFile(f"{key}={shown} does not exist (no such object).") from None
        if isinstance(err, UserError) or not isinstance(err, Exception):
            raise
        if isinstance(err, OSError) and not os.path.isdir(os.path.dirname(final)):
            raise RemoteFileError(f"{key}={shown}: cannot create a cache file in {os.path.dirname(final)}: "
                                  f"{err}.") from None
        raise RemoteFileError(f"{key}={shown} cannot be read: {redact(str(err)) or type(err).__name__}.") from None
    log.info("fetched %s (%s bytes) into %s", shown, os.path.getsize(final), final)
