"""One writer per dataset folder, step table and training run folder.

:func:`writer_lock` takes an exclusive ``fcntl.flock`` on a lock file in the folder and holds it
for the whole write. The kernel releases the lock when its holder exits, however it exits (a
``kill -9`` too), so a lock is never stale: the next writer just takes it. The holder's host, pid,
start time and command line are written into the lock file, and a second writer that arrives
meanwhile is refused with :class:`WriterLockHeld` naming them. Temp files beside a locked output
(:func:`remove_temp_files`) are removed only by the lock's holder, never under another writer.

Lock files stay in place after a write (removing one would let two writers lock two different
files); they are hidden (``.lock``, ``.<name>.lock``) so no shard or table glob sees them.
Advisory locks: every writer of the project takes them; on a network file system they hold only
where it supports ``flock``.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import logging
import os
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from fc_pipeline.storage import TEMP_SUFFIX, WriteError

logger = logging.getLogger(__name__)

LOCK_NAME = ".lock"


class WriterLockHeld(RuntimeError):
    """Another writer holds the lock of a folder or file; the message names it."""


def lock_path(target: str | Path, folder: bool = True) -> Path:
    """The lock file of ``target``: ``<target>/.lock`` for a folder, ``<dir>/.<name>.lock`` for a file."""
    target = Path(target)
    return target / LOCK_NAME if folder else target.with_name(f".{target.name}.lock")


@contextlib.contextmanager
def writer_lock(target: str | Path, *, folder: bool = True, what: str = "writer") -> Iterator[Path]:
    """Hold the exclusive lock of ``target`` (a folder, created if missing, or a file) while the block runs.

    Raises :class:`WriterLockHeld` at once when another process holds it, :class:`WriteError`
    when the lock file cannot be created (read-only or full disk). Yields the lock file's path.
    """
    path = lock_path(target, folder)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    except OSError as exc:
        raise WriteError(path, exc) from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise WriterLockHeld(f"{Path(target)} is being written by another {what}: {_describe(fd)}") from None
        holder = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv),
        }
        with contextlib.suppress(OSError):  # the holder note is informative; a full disk must not block the lock
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the lock


def _describe(fd: int) -> str:
    """The holder recorded in a lock file, in words."""
    try:
        holder = json.loads(os.pread(fd, 65536, 0).decode() or "{}")
    except (OSError, ValueError):
        holder = {}
    if not holder:
        return "its holder has not recorded itself yet; try again in a moment"
    return (
        f"pid {holder.get('pid')} on host {holder.get('host')} since {holder.get('started')} "
        f"({holder.get('command') or 'no command line'}); wait for it to finish or stop it "
        "(the lock of a killed writer frees itself)"
    )


def remove_temp_files(folder: str | Path, prefix: str = ".", owned: Callable[[Path], bool] | None = None) -> list[Path]:
    """Remove the temp files (``<prefix>*.tmp``) a killed writer left in ``folder`` (only those ``owned``
    accepts, when given); call it holding the lock."""
    folder = Path(folder)
    removed = []
    for temp in folder.glob(f"{prefix}*{TEMP_SUFFIX}") if folder.is_dir() else []:
        if owned is not None and not owned(temp):
            continue
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
            removed.append(temp)
    if removed:
        logger.info("removed %d temp file(s) of a killed writer in %s", len(removed), folder)
    return removed


@contextlib.contextmanager
def locked_output(path: str | Path, what: str = "writer") -> Iterator[Path]:
    """Hold the lock of one output file (``<dir>/.<name>.lock``) and clear the temp files of its killed writers."""
    path = Path(path)
    with writer_lock(path, folder=False, what=what) as lock:
        remove_temp_files(path.parent, f".{path.name}.")
        yield lock
