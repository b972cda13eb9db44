"""Atomic file writes: a temp file in the target directory, then ``os.replace``.

A reader never sees a half-written file, and a killed writer leaves only a hidden ``.tmp``
file behind (never a file under the final name). A write that the file system refuses (full disk,
read-only, no permission) removes its temp file and raises :class:`WriteError`, one line naming
the path and the cause.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq

TEMP_SUFFIX = ".tmp"
# errors that say the file system refused the write, not that an input was missing
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO})


class WriteError(OSError):
    """A file could not be written (full disk, read-only file system, no permission); names the path."""

    def __init__(self, path: str | Path, cause: OSError) -> None:
        super().__init__(cause.errno, f"cannot write {path}: {cause.strerror or cause}")
        self.filename = str(path)

    def __str__(self) -> str:
        return self.strerror


def _default_file_mode() -> int:
    # mkstemp creates 0600 files; a finished file gets the mode a plain open() would give it.
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


_FILE_MODE = _default_file_mode()


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """Open a temp file beside ``path``; on success it replaces ``path``, on error it is removed."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write supports mode 'wb' or 'w', not {mode!r}")
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    except OSError as exc:
        raise WriteError(path, exc) from exc
    try:
        with os.fdopen(fd, mode, encoding=encoding or ("utf-8" if mode == "w" else None)) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
            os.fchmod(handle.fileno(), _FILE_MODE)
        os.replace(tmp_name, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        if isinstance(exc, OSError) and not isinstance(exc, WriteError) and exc.errno in WRITE_ERRNOS:
            raise WriteError(path, exc) from exc
        raise


def write_parquet(table: pa.Table, path: str | Path) -> Path:
    """Write ``table`` to ``path`` atomically (zstd-compressed parquet)."""
    with atomic_write(path) as handle:
        pq.write_table(table, handle, compression="zstd")
    return Path(path)


def read_parquet(path: str | Path) -> pa.Table:
    """Read a parquet file written by :func:`write_parquet`."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"parquet file not found: {path}")
    return pq.read_table(path)


def write_json(obj: Any, path: str | Path, indent: int | None = 2) -> Path:
    """Write ``obj`` as UTF-8 JSON to ``path`` atomically."""
    with atomic_write(path, "w") as handle:
        json.dump(obj, handle, indent=indent, ensure_ascii=False, sort_keys=False)
        handle.write("\n")
    return Path(path)
