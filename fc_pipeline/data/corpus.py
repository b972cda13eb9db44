"""Step 0: list a raw corpus, one row per distinct image.

A corpus is a folder (searched recursively for jpg/jpeg/png/webp) or a parquet/jsonl manifest
with a ``path`` column (relative paths are relative to the manifest) and optional ``caption``
and ``annotation`` columns. In a folder, ``<name>.txt`` beside an image is its caption and
``<name>.panoptic.json`` (+ ``<name>.panoptic.png``) its panoptic annotation (format: see
:mod:`fc_pipeline.data.segmentation`). An empty caption counts as no caption.

The id of an image is the first 16 hex digits of the sha256 of its bytes, so identical files
collapse into one row (the others are listed in ``duplicates``). A file without bytes (missing or
empty) gets its id from its path instead, so that every such file keeps its own ledger row.
"""

from __future__ import annotations

import errno
import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from fc_pipeline.images import DEFAULT_MAX_PIXELS, IMAGE_SUFFIXES, ImageError, load_image

ANNOTATION_SUFFIX = ".panoptic.json"
ANNOTATION_MAP_SUFFIX = ".panoptic.png"
MANIFEST_SUFFIXES = (".parquet", ".jsonl")

CORPUS_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("path", pa.string()),
        ("sha256", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("caption", pa.string()),
        ("annotation", pa.string()),
        ("error", pa.string()),
        ("duplicates", pa.list_(pa.string())),
    ]
)


ENTRY_SCHEMA = pa.schema(
    [("entry", pa.int64()), ("path", pa.string()), ("caption", pa.string()), ("annotation", pa.string())]
)
FILE_SCHEMA = pa.schema([("entry", pa.int64()), *(f for f in CORPUS_SCHEMA if f.name != "duplicates")])


def scan_corpus(
    source: str | Path,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    workers: int = 4,
    previous: pa.Table | None = None,
) -> pa.Table:
    """One row per distinct image of ``source`` (folder or manifest); see the module docstring.

    Columns: ``id, path, sha256, width, height, caption, annotation, error, duplicates``.
    Every file is decoded once, so unusable ones get an ``error`` reason code here. With
    ``previous`` (an earlier scan of the corpus), a file at the same path with the same sha256
    keeps its earlier decode result (size or error) and is only hashed; captions and annotations
    are read afresh.

    The same as :func:`collapse_duplicates` of :func:`scan_files` of :func:`list_corpus`, the three
    parts a scan split into chunks runs in different processes.
    """
    files = scan_files(list_corpus(source), max_pixels=max_pixels, workers=workers, previous=previous)
    return collapse_duplicates(files)


def list_corpus(source: str | Path) -> pa.Table:
    """The image files of a corpus (folder or manifest) in a stable order: ``entry`` (position),
    ``path``, ``caption``, ``annotation`` (the caption and annotation the corpus provides)."""
    entries = _list_entries(Path(source))
    return pa.Table.from_pylist([{"entry": n, **e} for n, e in enumerate(entries)], schema=ENTRY_SCHEMA)


def scan_files(
    entries: pa.Table,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    workers: int = 4,
    previous: pa.Table | None = None,
) -> pa.Table:
    """One row per listed file of ``entries`` (rows of :func:`list_corpus`): its id, sha256, size or
    error reason; ``previous`` as in :func:`scan_corpus`. Duplicates are not collapsed yet."""
    decoded = _decode_results(previous, max_pixels)
    rows = entries.to_pylist()
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        scanned = list(
            tqdm(
                pool.map(lambda entry: _scan_entry(entry, max_pixels, decoded), rows),
                total=len(rows),
                desc="scan corpus",
                disable=len(rows) < 50,
            )
        )
    return pa.Table.from_pylist(scanned, schema=FILE_SCHEMA)


def collapse_duplicates(files: pa.Table) -> pa.Table:
    """The corpus table from :func:`scan_files` rows (of one or several chunks): in listing order, one
    row per id; later files with the same bytes are listed in the first one's ``duplicates`` and
    lend it their caption or annotation when it has none."""
    files = files.sort_by("entry") if files.num_rows else files
    rows: dict[str, dict] = {}
    for row in files.drop_columns(["entry"]).to_pylist():
        first = rows.get(row["id"])
        if first is None:
            rows[row["id"]] = {**row, "duplicates": []}
            continue
        first["duplicates"].append(row["path"])
        first["caption"] = first["caption"] or row["caption"]
        first["annotation"] = first["annotation"] or row["annotation"]
    return pa.Table.from_pylist(list(rows.values()), schema=CORPUS_SCHEMA)


def _list_entries(source: Path) -> list[dict]:
    """``{path, caption, annotation}`` per listed image, in a stable order."""
    if source.is_dir():
        return [_folder_entry(path) for path in _image_files(source)]
    if source.is_file() and source.suffix.lower() in MANIFEST_SUFFIXES:
        return _manifest_entries(source)
    if not source.exists():
        raise FileNotFoundError(f"corpus not found: {source}")
    raise ValueError(f"corpus must be a folder or a {'/'.join(MANIFEST_SUFFIXES)} manifest, got {source}")


def _image_files(folder: Path) -> list[Path]:
    """The image files under ``folder``, and symlinks named like images that lead nowhere (dangling,
    a loop): they get a ledger row (``broken_symlink``, ``symlink_loop``) instead of vanishing."""
    files = (
        path
        for path in folder.rglob("*")
        if (path.is_file() or (path.is_symlink() and not path.exists()))
        and path.suffix.lower() in IMAGE_SUFFIXES
        and not path.name.lower().endswith(ANNOTATION_MAP_SUFFIX)
        and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    )
    return sorted(files)


def _folder_entry(path: Path) -> dict:
    caption_file = path.with_suffix(".txt")
    annotation = path.with_name(path.stem + ANNOTATION_SUFFIX)
    return {
        "path": str(path),
        "caption": caption_file.read_text("utf-8", errors="replace") if caption_file.is_file() else None,
        "annotation": str(annotation) if annotation.is_file() else None,
    }


def _manifest_entries(manifest: Path) -> list[dict]:
    """The manifest's records; a bad one raises ``ValueError`` naming the file and line (jsonl) or row (parquet)."""
    if manifest.suffix.lower() == ".parquet":
        try:
            rows = pq.read_table(manifest).to_pylist()
        except (OSError, pa.ArrowException) as exc:
            raise ValueError(f"{manifest}: not a readable parquet file ({exc})") from None
        records = [(f"{manifest}: row {number}", row) for number, row in enumerate(rows, start=1)]
    else:
        try:
            lines = manifest.read_text("utf-8").splitlines()
        except UnicodeDecodeError as exc:
            raise ValueError(f"{manifest}: not UTF-8 text ({exc.reason})") from None
        records = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                records.append((f"{manifest}:{number}", json.loads(line)))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{manifest}:{number}: not a JSON object ({exc.msg})") from None
    entries = []
    for where, record in records:
        if not isinstance(record, dict):
            raise ValueError(f"{where}: not a JSON object but {type(record).__name__}")
        if not record.get("path"):
            raise ValueError(f"{where}: the record has no 'path'")
        for key in ("path", "caption", "annotation"):
            if record.get(key) is not None and not isinstance(record[key], str):
                raise ValueError(f"{where}: '{key}' must be a string, not {type(record[key]).__name__}")
        annotation = record.get("annotation")
        entries.append(
            {
                "path": str(_resolve(manifest.parent, record["path"])),
                "caption": record.get("caption"),
                "annotation": str(_resolve(manifest.parent, annotation)) if annotation else None,
            }
        )
    return entries


def _resolve(base: Path, path: str) -> Path:
    path = Path(path).expanduser()
    return path if path.is_absolute() else base / path


def _decode_results(previous: pa.Table | None, max_pixels: int) -> dict[tuple[str, str], dict]:
    """``(path, sha256) -> {width, height, error}`` of the files of ``previous`` that need no new decode.

    An image over ``max_pixels``, or one refused as too large, is decoded again: the limit may differ.
    """
    results = {}
    for row in [] if previous is None else previous.to_pylist():
        too_large = row["error"] == "too_large" or (row["width"] or 0) * (row["height"] or 0) > max_pixels
        if row["sha256"] is None or too_large:
            continue
        result = {"width": row["width"], "height": row["height"], "error": row["error"]}
        for path in [row["path"], *row["duplicates"]]:
            results[(path, row["sha256"])] = result
    return results


def _scan_entry(entry: dict, max_pixels: int, decoded: dict[tuple[str, str], dict]) -> dict:
    path = Path(entry["path"])
    caption = (entry["caption"] or "").strip() or None
    row = {
        "entry": entry["entry"],
        "path": str(path),
        "sha256": None,
        "width": None,
        "height": None,
        "caption": caption,
        "annotation": entry["annotation"],
        "error": None,
    }
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        data = None
        row["error"] = "broken_symlink" if path.is_symlink() else "not_found"
    except OSError as exc:
        data = None
        row["error"] = "symlink_loop" if exc.errno == errno.ELOOP else "unreadable"
    if not data:
        row["error"] = row["error"] or "empty_file"
        row["id"] = "path-" + hashlib.sha256(str(path).encode()).hexdigest()[:11]
        return row
    row["sha256"] = hashlib.sha256(data).hexdigest()
    row["id"] = row["sha256"][:16]
    if (row["path"], row["sha256"]) in decoded:
        row.update(decoded[(row["path"], row["sha256"])])
        return row
    try:
        image = load_image(data, max_pixels=max_pixels)
        row["width"], row["height"] = image.size
    except ImageError as exc:
        row["error"] = exc.reason
    return row
