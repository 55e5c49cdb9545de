"""Paths that may be URLs: a workdir, manifest or recording at `gs://bucket/...` (or `s3://`) as
well as on local disk, through `etils.epath` (fsspec underneath: gcsfs for gs://, s3fs for s3://).

Local paths keep the plain file calls they always had (same behaviour, same error messages); only
a URL goes through epath. Nothing here may wrap a URL in `pathlib.Path` or call `absolute()` on
it: both turn `gs://b/r` into the local folder `./gs:/b/r`.
"""

from __future__ import annotations

import atexit
import builtins
import contextlib
import math
import os
import posixpath
import re
import tempfile
import time
from typing import IO

import fsspec
from etils import epath

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")

# gcsfs caches folder listings for the life of the process, but orbax writes checkpoints through
# tensorstore and other processes write too: a cached listing would miss their files.
for _protocol in ("gs", "gcs"):
    fsspec.config.conf.setdefault(_protocol, {}).setdefault("use_listings_cache", False)


def is_url(path: str | os.PathLike) -> bool:
    """True for `scheme://...` (remote storage), False for a local path."""
    return bool(_URL.match(os.fspath(path)))


def as_path(path: str | os.PathLike) -> epath.Path:
    """An epath.Path for a URL or a local path (local ones made absolute, as the checkpointer
    needs). An unsupported scheme is a ValueError naming it."""
    text = os.fspath(path)
    if not is_url(text):
        return epath.Path(os.path.abspath(text))
    try:
        return epath.Path(text)
    except KeyError:
        scheme = text.split("://", 1)[0]
        raise ValueError(
            f"{text}: unsupported storage scheme {scheme}:// (use gs://, s3://, az://, hf:// or "
            "a local path)"
        ) from None


def join(base: str, rel: str) -> str:
    """`rel` (a manifest's audio entry) resolved against the folder `base`: a URL or an absolute
    local path stays as it is, anything else is relative to `base`, normalised."""
    if is_url(rel):
        return rel
    rel = os.path.expanduser(rel)
    if os.path.isabs(rel):
        return os.path.normpath(rel)
    if is_url(base):
        scheme, rest = base.split("://", 1)
        return f"{scheme}://{posixpath.normpath(posixpath.join(rest, rel))}"
    return os.path.normpath(os.path.join(base, rel))


def parent(path: str | os.PathLike) -> str:
    """The folder holding `path` (absolute when local)."""
    text = os.fspath(path)
    if is_url(text):
        scheme, rest = text.split("://", 1)
        return f"{scheme}://{posixpath.dirname(rest.rstrip('/'))}"
    return os.path.dirname(os.path.abspath(text))


def isfile(path: str | os.PathLike) -> bool:
    text = os.fspath(path)
    return as_path(text).is_file() if is_url(text) else os.path.isfile(text)


def open(path: str | os.PathLike, mode: str = "r") -> IO:  # noqa: A001 - the builtin, for URLs too
    """A file object for `path` (text modes are UTF-8)."""
    text = os.fspath(path)
    if is_url(text):
        return as_path(text).open(mode)
    return builtins.open(text, mode, **({} if "b" in mode else {"encoding": "utf-8"}))


def makedirs(path: str | os.PathLike) -> None:
    """Create a folder and its parents (object stores have no folders: nothing to do there)."""
    text = os.fspath(path)
    if not is_url(text):
        os.makedirs(text, exist_ok=True)


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` whole or not at all, for readers in other processes: a local file
    is written beside and renamed into place; an object store's upload is whole by itself."""
    text = os.fspath(path)
    if is_url(text):
        as_path(text).write_bytes(data)
        return
    tmp = f"{text}.tmp-{os.getpid()}"
    with builtins.open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, text)


def local_copy(path: str | os.PathLike) -> str:
    """A local file with the contents of `path`: `path` itself when local, else a download to a
    temporary file removed when the process exits (for files read line by line many times, such
    as a manifest)."""
    text = os.fspath(path)
    if not is_url(text):
        return text
    fd, local = tempfile.mkstemp(prefix="blspkd-", suffix="-" + posixpath.basename(text))
    atexit.register(_remove, local)
    with os.fdopen(fd, "wb") as f:
        f.write(as_path(text).read_bytes())
    return local


def _remove(path: str) -> None:
    with contextlib.suppress(OSError):
        os.remove(path)


class LineLog:
    """A text file that grows by lines (metrics.jsonl, skipped.jsonl). Locally each `write` is
    appended and flushed at once. An object store cannot append, so there the whole text (what
    the object held at start, then every line since) is uploaded again: at most every
    `upload_seconds`, and at `flush(force=True)` and `close()`."""

    def __init__(self, path: str | os.PathLike, upload_seconds: float = 30.0):
        self.path = os.fspath(path)
        self.remote = is_url(self.path)
        self.upload_seconds = upload_seconds
        if self.remote:
            p = as_path(self.path)
            self._text = [p.read_text()] if p.exists() else []
            self._dirty, self._uploaded = False, -math.inf  # the first line goes up at once
        else:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            self._file = builtins.open(self.path, "a", encoding="utf-8")  # noqa: SIM115

    def read_lines(self) -> list[str]:
        """What the file held when opened, and every line written since."""
        if self.remote:
            return "".join(self._text).splitlines()
        with builtins.open(self.path, encoding="utf-8") as f:
            return f.read().splitlines()

    def write(self, line: str) -> None:
        if not self.remote:
            self._file.write(line + "\n")
            self._file.flush()
            return
        self._text.append(line + "\n")
        self._dirty = True
        self.flush()

    def flush(self, force: bool = False) -> None:
        if not self.remote or not self._dirty:
            return
        if force or time.monotonic() - self._uploaded >= self.upload_seconds:
            as_path(self.path).write_text("".join(self._text))
            self._dirty, self._uploaded = False, time.monotonic()

    def close(self) -> None:
        if self.remote:
            self.flush(force=True)
        else:
            self._file.close()
