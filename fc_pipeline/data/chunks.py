"""Fan-out inside one corpus: a per-image step split into K chunks that run at the same time.

An image belongs to chunk ``chunk_of(id, K)`` (a hash of its id, so chunks stay balanced and an
image keeps its chunk when the corpus grows). Chunk ``i`` of a step brings its own table
``<step>.chunk-<i>-of-<K>.parquet`` up to date (:func:`update_chunk`, the same incremental rules
as a whole step, reusing rows of the step's merged table) and :func:`merge_chunks` then writes the
one table the step has always had, in the order of its input, the chunk files removed. A chunk
with nothing to compute writes no file; its rows stay those of the merged table. So whatever K is,
the merged table, and everything built from it, is the table one unchunked step writes.

Each chunk runs in its own process, on its own GPU or pod (``assets/dataset.py`` maps the chunks of
a step onto Dagster steps; docs/architecture.md, "Fan-out inside a corpus").
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from fc_pipeline.data.incremental import INPUT_DIGEST, StepUpdate, read_step_table, update_table
from fc_pipeline.locks import locked_output
from fc_pipeline.storage import write_parquet

MAX_CHUNKS = 4096


def chunk_of(key: str, chunks: int) -> int:
    """The chunk (``0 … chunks-1``) of an image id (or any key): sha256 of the key, modulo ``chunks``."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % chunks


def check_chunks(chunks: int) -> int:
    """``chunks`` if it is a valid number of chunks (1 … :data:`MAX_CHUNKS`), else ``ValueError``."""
    if not isinstance(chunks, int) or not 1 <= chunks <= MAX_CHUNKS:
        raise ValueError(f"chunks must be an integer from 1 to {MAX_CHUNKS}, not {chunks!r}")
    return chunks


def chunk_rows(table: pa.Table, chunk: int, chunks: int, key: str = "id") -> pa.Table:
    """The rows of ``table`` whose ``key`` column falls in ``chunk`` of ``chunks``."""
    if chunks == 1:
        return table
    mask = [chunk_of(value, chunks) == chunk for value in table.column(key).to_pylist()]
    return table.filter(pa.array(mask, pa.bool_()))


def chunk_path(output: str | Path, chunk: int, chunks: int) -> Path:
    """The file of ``chunk`` of ``chunks`` beside a step's table: ``<stem>.chunk-<i>-of-<K>.parquet``."""
    output = Path(output)
    return output.with_name(f"{output.stem}.chunk-{chunk}-of-{chunks}{output.suffix}")


def remove_chunk_files(output: str | Path) -> list[Path]:
    """Remove every chunk file of a step's table (of any K): after a merge, or stale ones of another K."""
    output = Path(output)
    removed = []
    for path in output.parent.glob(f"{output.stem}.chunk-*-of-*{output.suffix}"):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(path)
    return removed


def update_chunk(
    output: str | Path,
    inputs: Sequence[pa.Table],
    settings: dict,
    compute: Callable[..., pa.Table],
    *,
    chunk: int,
    chunks: int,
    temp_dirs: Sequence[str | Path] = (),
) -> StepUpdate:
    """Chunk ``chunk`` of ``chunks`` of the step whose merged table is ``output``: the images of
    ``inputs[0]`` in that chunk, computed or reused as :func:`~fc_pipeline.data.incremental.update_table`
    does (rows are reused from the chunk's file or from ``output``). Writes the chunk's file only
    when something changed. Other chunks may run at the same time; each holds only its own file's lock."""
    check_chunks(chunks)
    if not 0 <= chunk < chunks:
        raise ValueError(f"chunk must be in 0…{chunks - 1}, not {chunk}")
    ids = chunk_rows(inputs[0], chunk, chunks).column("id")
    mine = [t.filter(pc.is_in(t.column("id"), ids)) for t in inputs]
    path = chunk_path(output, chunk, chunks)
    if not len(ids) and (chunk or inputs[0].num_rows):  # nothing falls in this chunk (chunk 0 writes an empty corpus)
        with locked_output(path, what="writer of this chunk"):
            path.unlink(missing_ok=True)
        return StepUpdate(mine[0], computed=0, reused=0, dropped=0)
    return update_table(
        path,
        mine,
        settings,
        compute,
        temp_dirs=temp_dirs,
        reuse_from=output,
        owns=lambda image_id: chunk_of(image_id, chunks) == chunk,
    )


def merge_chunks(output: str | Path, ids: Sequence[str], chunks: int) -> StepUpdate:
    """Write a step's table from its chunk files (after every :func:`update_chunk` of ``chunks``):
    the rows of ``ids`` (the step's first input, in that order) from the chunk files, or from the
    table as it was for chunks that wrote none; the chunk files are then removed. ``computed`` counts
    rows that are new or changed against the previous table, ``dropped`` ids that left it. When
    nothing changed the table is left as it was (status ``cached``). Rows of a chunk without a file
    are taken as the previous table has them: merge only after every chunk ran.

    Raises ``ValueError`` when some id has no row (a chunk did not run), or when the step's columns
    changed (new code) while some chunks had nothing to compute: their rows are in the old columns,
    so the previous table is removed and the next run computes them again."""
    output = Path(output)
    ids = list(ids)
    with locked_output(output, what="merge of this step"):
        files = [p for p in (chunk_path(output, i, chunks) for i in range(chunks)) if p.exists()]
        previous = read_step_table(output, warn=False)  # the chunks warned already
        previous_digests = _digests(previous)
        parts = [pq.read_table(p) for p in files]
        covered = {i for part in parts for i in part.column("id").to_pylist()}
        if parts and previous is not None and not all(p.schema.equals(previous.schema) for p in parts):
            output.unlink()
            raise ValueError(
                f"{output}: the step's columns changed while some of its {chunks} chunk(s) had nothing to compute; "
                "their rows had the old columns and were removed: run the step again to compute them"
            )
        if previous is not None:
            rest = [i for i in ids if i not in covered and i in previous_digests]
            parts.append(previous.filter(pc.is_in(previous.column("id"), pa.array(rest, pa.string()))))
        parts = [p for p in parts if p.num_rows] or parts[:1]
        rows = pa.concat_tables(parts) if parts else None
        position = {} if rows is None else {i: n for n, i in enumerate(rows.column("id").to_pylist())}
        missing = [i for i in ids if i not in position]
        if missing:
            raise ValueError(
                f"{output}: {len(missing)} image(s) have no row in any of its {chunks} chunk(s) "
                f"(e.g. {missing[:3]}); run every chunk of the step before merging"
            )
        table = rows.take(pa.array([position[i] for i in ids], pa.int64()))
        digests = _digests(table)
        computed = sum(previous_digests.get(i) != digests[i] for i in ids)
        dropped = len(previous_digests.keys() - digests.keys())
        unchanged = not files and previous is not None and previous.column("id").to_pylist() == ids
        if not unchanged:
            write_parquet(table, output)
        remove_chunk_files(output)
    return StepUpdate(table, computed=computed, reused=len(ids) - computed, dropped=dropped)


def _digests(table: pa.Table | None) -> dict[str, str]:
    """id -> input digest of a step table (empty for none)."""
    if table is None:
        return {}
    return dict(zip(table.column("id").to_pylist(), table.column(INPUT_DIGEST).to_pylist()))


def read_chunks(output: str | Path, chunks: int) -> list[pa.Table]:
    """Every chunk file of ``output`` for ``chunks``, for a step whose chunks always write one (the scan);
    ``ValueError`` naming the missing ones otherwise."""
    paths = [chunk_path(output, i, chunks) for i in range(chunks)]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise ValueError(f"chunk files missing: {missing}; run every chunk of the step before merging")
    return [pq.read_table(p) for p in paths]
