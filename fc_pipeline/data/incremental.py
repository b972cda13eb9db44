"""Incremental dataset steps: a grown corpus costs only its new images.

Every step output table carries an :data:`INPUT_DIGEST` column: per image, the sha256 of the
step's settings and of that image's row in each input table. :func:`update_table` reuses every
row whose digest is unchanged and computes only the others. Since an output row's digest is part
of the row the next step reads, a change travels down the chain image by image, and nothing else
is redone. Rows of images that left the corpus are dropped from the table; files a step wrote for
them (segment maps) stay on disk.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from fc_pipeline.locks import locked_output, remove_temp_files
from fc_pipeline.storage import write_parquet

logger = logging.getLogger(__name__)

INPUT_DIGEST = "input_digest"


@dataclass(frozen=True)
class StepUpdate:
    """What :func:`update_table` did: the current table and how its rows came about."""

    table: pa.Table
    computed: int
    reused: int
    dropped: int

    @property
    def status(self) -> str:
        """``cached`` (the file was left as it was), ``computed`` (nothing reused) or ``updated``."""
        if self.computed == 0 and self.dropped == 0:
            return "cached"
        return "computed" if self.reused == 0 else "updated"


def input_digests(inputs: Sequence[pa.Table], settings: dict) -> dict[str, str]:
    """Per id of ``inputs[0]``: sha256 of ``settings`` and the id's row in every input (``null`` if absent)."""
    base = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    primary, *others = (table.to_pylist() for table in inputs)
    others = [{row["id"]: row for row in rows} for rows in others]
    digests = {}
    for row in primary:
        if row["id"] in digests:
            raise ValueError(f"id {row['id']} appears twice in the step's first input")
        digest = base.copy()
        rows = [row] + [table.get(row["id"]) for table in others]
        digest.update(json.dumps(rows, sort_keys=True, default=str).encode())
        digests[row["id"]] = digest.hexdigest()
    return digests


def update_table(
    output: str | Path,
    inputs: Sequence[pa.Table],
    settings: dict,
    compute: Callable[..., pa.Table],
    *,
    temp_dirs: Sequence[str | Path] = (),
    reuse_from: str | Path | None = None,
    owns: Callable[[str], bool] | None = None,
) -> StepUpdate:
    """Bring ``output`` up to date with ``inputs``: rows are keyed by ``id`` (ids and order from inputs[0]);
    a row is reused when the existing output has it with the same input digest (sha256 of the settings + that
    id's row in every input table), every other id is computed by
    ``compute(*inputs_filtered_to_those_ids)``; the merged table is written atomically.

    ``compute`` must return one row per id it is given. When nothing is pending and nothing dropped the
    file is not rewritten (status ``cached``); its row order is then the one it was written in.

    The step holds the lock of ``output`` (:func:`fc_pipeline.locks.locked_output`) while it reads,
    computes and writes, so a second writer of the same table is refused; the holder removes the
    temp files killed writers left beside ``output`` and in ``temp_dirs`` (folders the step writes
    into, e.g. the segment maps).

    A chunk of a step (:mod:`fc_pipeline.data.chunks`) passes ``reuse_from``, the step's merged
    table, whose rows are reused for ids ``output`` lacks, and ``owns``, which says which image ids
    are the chunk's: it then removes only its own temp files in ``temp_dirs`` (named ``.<id>…``),
    since the other chunks write into the same folders at the same time.
    """
    output = Path(output)
    with locked_output(output, what="writer of this step"):
        for folder in temp_dirs:
            remove_temp_files(folder, owned=None if owns is None else lambda temp: owns(temp.name[1:].split(".")[0]))
        return _update(output, inputs, settings, compute, None if reuse_from is None else Path(reuse_from))


def _update(
    output: Path,
    inputs: Sequence[pa.Table],
    settings: dict,
    compute: Callable[..., pa.Table],
    reuse_from: Path | None,
) -> StepUpdate:
    """The body of :func:`update_table`, run holding the lock of ``output``."""
    digests = input_digests(inputs, settings)
    order = list(digests)
    old, old_digests = _read_previous(output)
    if reuse_from is not None:
        old, old_digests = _with_rows_of(reuse_from, old, old_digests, digests)
    reused = [i for i in order if old_digests.get(i) == digests[i]]
    pending = [i for i in order if old_digests.get(i) != digests[i]]
    dropped = len(old_digests.keys() - digests.keys())
    if old is not None and not pending and not dropped:
        return StepUpdate(_in_order(old, order, digests), computed=0, reused=len(reused), dropped=0)

    rows = None if old is None else old.filter(pc.is_in(old.column("id"), pa.array(reused, pa.string())))
    if pending or old is None:
        computed = _compute(compute, inputs, pending)
        if reused and not rows.schema.equals(computed.schema):
            logger.warning("%s: the step's columns changed; recomputing its %d other rows too", output, len(reused))
            rows, reused = _compute(compute, inputs, reused), []
        parts = [rows, computed] if rows is not None and rows.num_rows else [computed]
        rows = pa.concat_tables(parts).replace_schema_metadata(computed.schema.metadata)
    table = _in_order(rows, order, digests)
    write_parquet(table, output)
    return StepUpdate(table, computed=len(order) - len(reused), reused=len(reused), dropped=dropped)


def read_step_table(path: Path, warn: bool = True) -> pa.Table | None:
    """A step's table with its :data:`INPUT_DIGEST` column; None when there is none usable: missing,
    or (with a warning unless ``warn`` is off) unreadable or written without digests."""
    if not path.exists():
        return None
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        if warn:
            logger.warning("%s is unreadable (%s); recomputing every row", path, exc)
        return None
    if INPUT_DIGEST not in table.column_names or "id" not in table.column_names:
        if warn:
            logger.warning("%s has no %s column; recomputing every row", path, INPUT_DIGEST)
        return None
    return table


def _read_previous(output: Path) -> tuple[pa.Table | None, dict[str, str]]:
    """The existing output without its digests, and id -> digest; ``(None, {})`` when there is none usable."""
    table = read_step_table(output)
    if table is None:
        return None, {}
    digests = dict(zip(table.column("id").to_pylist(), table.column(INPUT_DIGEST).to_pylist()))
    return table.drop_columns([INPUT_DIGEST]), digests


def _with_rows_of(
    source: Path, old: pa.Table | None, old_digests: dict[str, str], digests: dict[str, str]
) -> tuple[pa.Table | None, dict[str, str]]:
    """``old`` plus the rows of ``source`` whose ids are current (in ``digests``) and not in ``old``."""
    more, more_digests = _read_previous(source)
    wanted = [i for i in more_digests if i in digests and i not in old_digests]
    if not wanted or (old is not None and not more.schema.equals(old.schema)):  # other columns: recompute those
        return old, old_digests
    more = more.filter(pc.is_in(more.column("id"), pa.array(wanted, pa.string())))
    merged = more if old is None else pa.concat_tables([old, more])
    return merged, {**old_digests, **{i: more_digests[i] for i in wanted}}


def _compute(compute: Callable[..., pa.Table], inputs: Sequence[pa.Table], ids: list[str]) -> pa.Table:
    """``compute`` on the rows of ``ids``, checked to return exactly those ids."""
    wanted, wanted_set = pa.array(ids, pa.string()), set(ids)
    table = compute(*(t.filter(pc.is_in(t.column("id"), wanted)) for t in inputs))
    if INPUT_DIGEST in table.column_names:
        table = table.drop_columns([INPUT_DIGEST])
    returned = Counter(table.column("id").to_pylist())
    if returned != Counter(ids):
        missing = sorted(set(ids) - set(returned))
        unexpected = sorted(i for i, n in returned.items() if i not in wanted_set or n > 1)
        raise ValueError(
            f"the step must return one row per pending id; missing {missing}, unexpected or repeated {unexpected}"
        )
    return table


def _in_order(table: pa.Table, order: list[str], digests: dict[str, str]) -> pa.Table:
    """``table``'s rows in ``order``, with the input digest column appended."""
    position = {image_id: index for index, image_id in enumerate(table.column("id").to_pylist())}
    table = table.take(pa.array([position[i] for i in order], pa.int64()))
    return table.append_column(pa.field(INPUT_DIGEST, pa.string()), pa.array([digests[i] for i in order], pa.string()))
