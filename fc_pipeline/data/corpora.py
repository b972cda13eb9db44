"""The corpora under a root folder, and a cheap signature of each one's files.

A corpus is a sub-folder ``<root>/<name>/`` (images searched recursively, with their ``.txt``
captions and panoptic annotations) or a manifest ``<root>/<name>.jsonl`` / ``<name>.parquet``
(see :mod:`fc_pipeline.data.corpus`). Its name is what Dagster uses as the partition key, so it
must match :data:`CORPUS_NAME`; hidden entries and other files are ignored. A folder wins over a
manifest of the same name.

:func:`corpus_signature` hashes every file's relative path, size and modification time (nothing
is read). :func:`watch_corpus` gives the same kind of answer at a cost that does not grow with
the number of unchanged files: it stats the corpus's folders and lists only those whose
modification time moved (a file added, removed or renamed into place changes its folder's
time), so a sensor can tell once a minute which corpora changed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path
from typing import Any

from fc_pipeline.data.corpus import MANIFEST_SUFFIXES

logger = logging.getLogger(__name__)

CORPUS_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def discover_corpora(root: str | Path) -> dict[str, Path]:
    """``{name: folder or manifest}`` of every corpus under ``root`` (empty if it does not exist)."""
    root = Path(root)
    if not root.is_dir():
        return {}
    found: dict[str, Path] = {}
    for entry in sorted(root.iterdir(), key=lambda p: (not p.is_dir(), p.name)):
        name = entry.name if entry.is_dir() else entry.stem
        if entry.name.startswith(".") or not (entry.is_dir() or entry.suffix.lower() in MANIFEST_SUFFIXES):
            continue
        if not CORPUS_NAME.match(name):
            logger.warning("ignoring %s: a corpus name is letters, digits, '_', '.' or '-' (max 128)", entry)
            continue
        if name in found:
            logger.warning("ignoring %s: the folder %s has the same corpus name", entry, found[name])
            continue
        found[name] = entry
    return found


def corpus_signature(source: str | Path) -> str:
    """sha256 (16 hex) of the relative path, size and mtime of every file of a corpus folder,
    or of the manifest file itself; ``"missing"`` if ``source`` does not exist."""
    source = Path(source)
    if not source.exists():
        return "missing"
    files = sorted(p for p in source.rglob("*") if p.is_file()) if source.is_dir() else [source]
    digest = hashlib.sha256()
    for path in files:
        stat = path.stat()
        relative = path.relative_to(source).as_posix() if source.is_dir() else path.name
        digest.update(f"{relative}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def _folder_entry(folder: Path) -> list[Any]:
    """``[mtime_ns, digest of its files' names/sizes/mtimes, sub-folder names]`` of one folder."""
    digest, subfolders = hashlib.sha256(), []
    mtime = folder.stat().st_mtime_ns
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.is_dir(follow_symlinks=False):
            subfolders.append(entry.name)
        elif entry.is_file():
            stat = entry.stat()
            digest.update(f"{entry.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return [mtime, digest.hexdigest()[:16], subfolders]


def watch_corpus(source: str | Path, previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """The change-detection state of a corpus: ``{"signature", "folders"}``.

    ``previous`` is the state of the last call: a folder whose modification time did not move is
    taken from it unlisted, so an unchanged corpus costs one ``stat`` per folder, whatever its
    number of files. A manifest is its own size and modification time. A file rewritten in place
    (same name, no rename) leaves its folder's time alone and shows only in
    :func:`corpus_signature` (the nightly refresh compares that one).
    """
    source = Path(source)
    if not source.exists():
        return {"signature": "missing", "folders": {}}
    if not source.is_dir():
        stat = source.stat()
        return {"signature": f"{stat.st_size:x}-{stat.st_mtime_ns:x}", "folders": {}}
    known = (previous or {}).get("folders", {})
    folders: dict[str, list[Any]] = {}
    pending = ["."]
    while pending:
        relative = pending.pop()
        folder = source / relative
        try:
            mtime = folder.stat().st_mtime_ns
            entry = known[relative] if relative in known and known[relative][0] == mtime else _folder_entry(folder)
        except FileNotFoundError:  # removed while we looked
            continue
        folders[relative] = entry
        pending.extend(f"{relative}/{name}" if relative != "." else name for name in entry[2])
    digest = hashlib.sha256()
    for relative in sorted(folders):
        digest.update(f"{relative}\0{folders[relative][1]}\n".encode())
    return {"signature": digest.hexdigest()[:16], "folders": folders}
