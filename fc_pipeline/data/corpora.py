"""The corpora under a root folder, and a cheap signature of each one's files.

A corpus is a sub-folder ``<root>/<name>/`` (images searched recursively, with their ``.txt``
captions and panoptic annotations) or a manifest ``<root>/<name>.jsonl`` / ``<name>.parquet``
(see :mod:`fc_pipeline.data.corpus`). Its name is what Dagster uses as the partition key, so it
must match :data:`CORPUS_NAME`; hidden entries and other files are ignored. A folder wins over a
manifest of the same name.

The signature hashes every file's relative path, size and modification time (nothing is read),
so a sensor can tell, once a minute, which corpora gained, lost or changed files.
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path

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
