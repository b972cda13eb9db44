"""Fan-out inside one corpus: a step table built in K chunks (update_chunk + merge_chunks) is the table
update_table builds; chunk membership, incremental reuse across chunks and K, failed chunks, temp files, the scan."""

import hashlib
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from fc_pipeline.data.chunks import (
    MAX_CHUNKS,
    check_chunks,
    chunk_of,
    chunk_path,
    chunk_rows,
    merge_chunks,
    update_chunk,
)
from fc_pipeline.data.corpus import collapse_duplicates, list_corpus, scan_corpus, scan_files
from fc_pipeline.data.incremental import INPUT_DIGEST, update_table


def numbers(ids, scale=1) -> pa.Table:
    return pa.table(
        {"id": pa.array([f"img{k:03d}" for k in ids], pa.string()), "x": pa.array([k * scale for k in ids], pa.int64())}
    )


def ids_of(table: pa.Table) -> list[str]:
    return table.column("id").to_pylist()


class Step:
    """A two-input step (``y = 2x + extra``), counting every id it is given."""

    def __init__(self):
        self.seen: Counter = Counter()
        self.calls: list[list[str]] = []

    def __call__(self, primary: pa.Table, extra: pa.Table) -> pa.Table:
        ids = ids_of(primary)
        self.calls.append(ids)
        self.seen.update(ids)
        bonus = dict(zip(ids_of(extra), extra.column("x").to_pylist()))
        y = [2 * x + bonus.get(i, 0) for i, x in zip(ids, primary.column("x").to_pylist())]
        return pa.table({"id": ids, "y": pa.array(y, pa.int64())}).replace_schema_metadata({b"step": b"test"})


def run_chunked(output, inputs, step, chunks, settings=None, only=None):
    """Every chunk of ``chunks`` (or those in ``only``), then the merge; the merge's StepUpdate."""
    for chunk in range(chunks) if only is None else only:
        update_chunk(output, inputs, settings or {}, step, chunk=chunk, chunks=chunks)
    return merge_chunks(output, ids_of(inputs[0]), chunks)


def chunk_files(output) -> list[str]:
    return sorted(p.name for p in output.parent.glob(f"{output.stem}.chunk-*"))


# --- chunk_of / check_chunks ------------------------------------------------------------------
def test_chunk_of_is_a_stable_balanced_hash():
    assert chunk_of("abc", 1000) == 74  # sha256("abc")[:8] big-endian, modulo 1000
    assert [chunk_of("0123456789abcdef", k) for k in (1, 2, 3, 7, MAX_CHUNKS)] == [0, 0, 0, 3, 2680]
    image_id = hashlib.sha256(b"some image").hexdigest()[:16]
    expected = int(hashlib.sha256(image_id.encode()).hexdigest()[:16], 16) % 5
    assert {chunk_of(image_id, 5) for _ in range(3)} == {expected}

    ids = [hashlib.sha256(str(n).encode()).hexdigest()[:16] for n in range(10_000)]
    sizes = Counter(chunk_of(i, 4) for i in ids)
    assert set(sizes) == {0, 1, 2, 3} and all(2_250 <= n <= 2_750 for n in sizes.values()), sizes
    # an image keeps its chunk when the corpus grows: membership depends on the id alone
    table = pa.table({"id": ids[:200]})
    grown = pa.table({"id": ids[:300]})
    for chunk in range(3):
        assert ids_of(chunk_rows(grown, chunk, 3))[: chunk_rows(table, chunk, 3).num_rows] == ids_of(
            chunk_rows(table, chunk, 3)
        )
    assert sum(chunk_rows(grown, c, 3).num_rows for c in range(3)) == 300


@pytest.mark.parametrize("bad", [0, -1, MAX_CHUNKS + 1, "2", 2.0, None])
def test_check_chunks_rejects_bad_counts(bad):
    with pytest.raises(ValueError, match=f"from 1 to {MAX_CHUNKS}"):
        check_chunks(bad)


def test_check_chunks_and_update_chunk_arguments(tmp_path):
    assert [check_chunks(k) for k in (1, 3, MAX_CHUNKS)] == [1, 3, MAX_CHUNKS]
    assert chunk_path(tmp_path / "captions.parquet", 2, 7) == tmp_path / "captions.chunk-2-of-7.parquet"
    with pytest.raises(ValueError, match=r"chunk must be in 0…2, not 3"):
        update_chunk(tmp_path / "t.parquet", [numbers(range(3))], {}, Step(), chunk=3, chunks=3)
    with pytest.raises(ValueError, match="chunks must be"):
        update_chunk(tmp_path / "t.parquet", [numbers(range(3))], {}, Step(), chunk=0, chunks=0)
    assert list(tmp_path.iterdir()) == []


# --- chunked = unchunked ------------------------------------------------------------------------
@pytest.mark.parametrize("chunks", [1, 2, 3, 7])
def test_chunked_step_writes_the_unchunked_table(tmp_path, chunks):
    """Every chunk then the merge: the table update_table writes, each id computed exactly once."""
    primary, extra = numbers([5, 3, 17, 0, 11, *range(20, 45)]), numbers(range(0, 45, 3), scale=100)
    whole = update_table(tmp_path / "whole.parquet", [primary, extra], {"k": 1}, Step())

    output, step = tmp_path / "chunked.parquet", Step()
    per_chunk = []
    for chunk in range(chunks):
        update = update_chunk(output, [primary, extra], {"k": 1}, step, chunk=chunk, chunks=chunks)
        per_chunk.append(update.computed)
        assert all(chunk_of(i, chunks) == chunk for i in ids_of(update.table))
        if update.computed:
            assert pq.read_table(chunk_path(output, chunk, chunks)).num_rows == update.computed
    assert sum(per_chunk) == primary.num_rows and len(chunk_files(output)) == sum(n > 0 for n in per_chunk)
    assert step.seen == Counter(ids_of(primary))  # each id once, over all chunks
    assert len({chunk_of(ids[0], chunks) for ids in step.calls}) == len(step.calls) == sum(n > 0 for n in per_chunk)
    assert all(len({chunk_of(i, chunks) for i in ids}) == 1 for ids in step.calls)  # a call sees one chunk's ids

    merged = merge_chunks(output, ids_of(primary), chunks)
    assert (merged.computed, merged.reused, merged.dropped, merged.status) == (30, 0, 0, "computed")
    assert merged.table.equals(whole.table) and pq.read_table(output).equals(whole.table)
    assert pq.read_table(output).schema.metadata[b"step"] == b"test"
    assert ids_of(merged.table) == ids_of(primary) and merged.table.column_names == ["id", "y", INPUT_DIGEST]
    assert chunk_files(output) == []


# --- incremental ----------------------------------------------------------------------------------
def test_grown_corpus_computes_only_new_ids_in_their_chunks(tmp_path):
    output, step, extra = tmp_path / "out.parquet", Step(), numbers([])
    run_chunked(output, [numbers(range(12)), extra], step, 3)
    assert sum(step.seen.values()) == 12

    grown = numbers([*range(6), 40, *range(6, 12), 41, 42, 43])  # four new ids, one in the middle
    new = {f"img{k:03d}" for k in (40, 41, 42, 43)}
    step = Step()
    updates = [update_chunk(output, [grown, extra], {}, step, chunk=c, chunks=3) for c in range(3)]
    assert step.seen == Counter(new)
    for chunk, update in enumerate(updates):
        mine = {i for i in new if chunk_of(i, 3) == chunk}
        assert update.computed == len(mine) and update.reused == update.table.num_rows - len(mine)
        assert chunk_path(output, chunk, 3).exists() == bool(mine)  # a chunk with nothing new writes nothing
    assert sorted(i for ids in step.calls for i in ids) == sorted(new)
    assert all(len({chunk_of(i, 3) for i in ids}) == 1 for ids in step.calls)  # each call: one chunk's ids

    merged = run_chunked(output, [grown, extra], Step(), 3, only=())  # the chunks ran above
    assert (merged.computed, merged.reused, merged.dropped, merged.status) == (4, 12, 0, "updated")
    assert merged.table.equals(update_table(tmp_path / "whole.parquet", [grown, extra], {}, Step()).table)


def test_unchanged_rerun_is_cached_and_writes_nothing(tmp_path):
    output, inputs = tmp_path / "out.parquet", [numbers(range(10)), numbers([1, 2], scale=7)]
    first = run_chunked(output, inputs, Step(), 3)
    mtime, step = output.stat().st_mtime_ns, Step()
    for chunk in range(3):
        update = update_chunk(output, inputs, {}, step, chunk=chunk, chunks=3)
        assert (update.computed, update.dropped, update.status) == (0, 0, "cached")
        assert update.reused == update.table.num_rows == sum(chunk_of(i, 3) == chunk for i in ids_of(inputs[0]))
    assert step.calls == [] and chunk_files(output) == []
    again = merge_chunks(output, ids_of(inputs[0]), 3)
    assert (again.computed, again.reused, again.dropped, again.status) == (0, 10, 0, "cached")
    assert output.stat().st_mtime_ns == mtime and again.table.equals(first.table)


def test_changed_rows_and_removed_ids(tmp_path):
    output = tmp_path / "out.parquet"
    run_chunked(output, [numbers(range(10)), numbers([])], Step(), 2)

    changed = numbers(range(10)).set_column(1, "x", pa.array([0, 1, 2, 30, 4, 5, 6, 7, 8, 9], pa.int64()))
    step = Step()
    update = run_chunked(output, [changed, numbers([])], step, 2)
    assert step.seen == Counter({"img003": 1}) and (update.computed, update.reused, update.status) == (1, 9, "updated")
    assert update.table.column("y").to_pylist()[3] == 60

    extra = numbers([7], scale=1000)  # a row of the second input appears: only that id is recomputed
    step = Step()
    update = run_chunked(output, [changed, extra], step, 2)
    assert step.seen == Counter({"img007": 1}) and update.computed == 1 and update.table.column("y")[7].as_py() == 7014

    shrunk = changed.filter(pa.array([i not in ("img002", "img005") for i in ids_of(changed)]))
    step = Step()
    update = run_chunked(output, [shrunk, extra], step, 2)
    assert step.calls == [] and chunk_files(output) == []
    assert (update.computed, update.reused, update.dropped, update.status) == (0, 8, 2, "updated")
    assert ids_of(pq.read_table(output)) == ids_of(shrunk)
    assert update.table.equals(update_table(tmp_path / "whole.parquet", [shrunk, extra], {}, Step()).table)


def test_other_settings_recompute_every_chunk(tmp_path):
    output, inputs = tmp_path / "out.parquet", [numbers(range(9)), numbers([])]
    run_chunked(output, inputs, Step(), 3, settings={"v": 1})
    step = Step()
    update = run_chunked(output, inputs, step, 3, settings={"v": 2})
    assert step.seen == Counter(ids_of(inputs[0])) and (update.computed, update.status) == (9, "computed")


def test_changing_chunk_count_reuses_every_row(tmp_path):
    """Built with K=2, grown, rerun with K=3: only the new ids are computed; then K=1 computes nothing."""
    output, extra = tmp_path / "out.parquet", numbers([])
    run_chunked(output, [numbers(range(20)), extra], Step(), 2)
    grown, step = numbers(range(25)), Step()
    update = run_chunked(output, [grown, extra], step, 3)
    assert step.seen == Counter(ids_of(numbers(range(20, 25))))
    assert (update.computed, update.reused, update.dropped) == (5, 20, 0)
    assert update.table.equals(update_table(tmp_path / "whole.parquet", [grown, extra], {}, Step()).table)

    mtime, step = output.stat().st_mtime_ns, Step()
    for chunks in (1, 4, 7):
        update = run_chunked(output, [grown, extra], step, chunks)
        assert update.status == "cached" and step.calls == [] and output.stat().st_mtime_ns == mtime


# --- failed and empty chunks ------------------------------------------------------------------
class Failing(Step):
    """A step that raises on the ids of one chunk."""

    def __init__(self, chunk: int, chunks: int):
        super().__init__()
        self.chunk, self.chunks = chunk, chunks

    def __call__(self, primary, extra):
        if any(chunk_of(i, self.chunks) == self.chunk for i in ids_of(primary)):
            raise RuntimeError("out of memory")
        return super().__call__(primary, extra)


def test_a_failed_chunk_blocks_the_merge_until_it_reruns(tmp_path):
    output, inputs = tmp_path / "out.parquet", [numbers(range(12)), numbers([])]
    failing = Failing(chunk=1, chunks=2)
    first = update_chunk(output, inputs, {}, failing, chunk=0, chunks=2)
    assert first.computed == first.table.num_rows > 0
    with pytest.raises(RuntimeError, match="out of memory"):
        update_chunk(output, inputs, {}, failing, chunk=1, chunks=2)
    assert chunk_files(output) == ["out.chunk-0-of-2.parquet"]

    lacking = [i for i in ids_of(inputs[0]) if chunk_of(i, 2) == 1]
    with pytest.raises(ValueError, match=rf"{len(lacking)} image\(s\) have no row in any of its 2 chunk\(s\)") as info:
        merge_chunks(output, ids_of(inputs[0]), 2)
    assert lacking[0] in str(info.value) and not output.exists()
    assert chunk_files(output) == ["out.chunk-0-of-2.parquet"]  # kept for the rerun

    mtime, step = chunk_path(output, 0, 2).stat().st_mtime_ns, Step()
    assert update_chunk(output, inputs, {}, step, chunk=0, chunks=2).status == "cached"  # reads its own file
    assert update_chunk(output, inputs, {}, step, chunk=1, chunks=2).computed == len(lacking)
    assert sorted(step.seen) == sorted(lacking) and chunk_path(output, 0, 2).stat().st_mtime_ns == mtime
    merged = merge_chunks(output, ids_of(inputs[0]), 2)
    assert (merged.computed, merged.reused, merged.status) == (12, 0, "computed") and chunk_files(output) == []
    assert merged.table.equals(update_table(tmp_path / "whole.parquet", inputs, {}, Step()).table)


def test_a_failed_chunk_on_a_grown_corpus(tmp_path):
    """With a merged table in place, a chunk that did not run leaves its new ids without rows: the merge refuses."""
    output, extra = tmp_path / "out.parquet", numbers([])
    run_chunked(output, [numbers(range(10)), extra], Step(), 2)
    before = output.read_bytes()
    grown = numbers(range(16))
    new_in_1 = [i for i in ids_of(numbers(range(10, 16))) if chunk_of(i, 2) == 1]
    assert new_in_1, "the grown ids must reach chunk 1"
    update_chunk(output, [grown, extra], {}, Step(), chunk=0, chunks=2)
    with pytest.raises(ValueError, match="run every chunk of the step before merging"):
        merge_chunks(output, ids_of(grown), 2)
    assert output.read_bytes() == before


def test_more_chunks_than_ids_and_stale_chunk_files_of_another_count(tmp_path):
    output, inputs, step = tmp_path / "out.parquet", [numbers(range(3)), numbers([])], Step()
    (tmp_path / "out.chunk-1-of-5.parquet").write_bytes(b"left by a killed run with K=5")
    pq.write_table(numbers([99]), tmp_path / "out.chunk-0-of-2.parquet")
    updates = [update_chunk(output, inputs, {}, step, chunk=c, chunks=7) for c in range(7)]
    empty = [u for u in updates if u.table.num_rows == 0]
    assert len(empty) >= 4 and all((u.computed, u.reused, u.status) == (0, 0, "cached") for u in empty)
    assert sum(u.computed for u in updates) == 3 and step.seen == Counter(ids_of(inputs[0]))
    merged = merge_chunks(output, ids_of(inputs[0]), 7)
    assert merged.table.equals(update_table(tmp_path / "whole.parquet", inputs, {}, Step()).table)
    assert chunk_files(output) == []  # the K=7 files and the stale K=5 and K=2 files


# --- temp files -------------------------------------------------------------------------------
def test_a_chunk_removes_only_its_own_temp_files(tmp_path):
    output, maps = tmp_path / "segments.parquet", tmp_path / "segments"
    maps.mkdir()
    ids = [hashlib.sha256(str(n).encode()).hexdigest()[:16] for n in range(12)]
    table = pa.table({"id": ids, "x": list(range(12))})
    temps = {i: maps / f".{i}.png.a1b2c3.tmp" for i in ids}
    for temp in temps.values():
        temp.write_bytes(b"half a segment map")
    (maps / f"{ids[0]}.png").write_bytes(b"a finished map")
    beside = tmp_path / ".segments.chunk-1-of-3.parquet.x9.tmp"  # a killed writer of chunk 1's own file
    beside.write_bytes(b"torn")

    update_chunk(output, [table, numbers([])], {}, Step(), chunk=1, chunks=3, temp_dirs=[maps])
    left = {i for i, temp in temps.items() if temp.exists()}
    assert left == {i for i in ids if chunk_of(i, 3) != 1} and 0 < len(left) < 12
    assert (maps / f"{ids[0]}.png").exists() and not beside.exists()

    update_table(tmp_path / "whole.parquet", [table, numbers([])], {}, Step(), temp_dirs=[maps])  # unchunked: all
    assert not any(temp.exists() for temp in temps.values()) and (maps / f"{ids[0]}.png").exists()


# --- edge cases -------------------------------------------------------------------------------
def test_an_empty_corpus_merges_into_an_empty_table(tmp_path):
    """update_table writes an empty table for an empty input; the chunked step should do the same."""
    empty = numbers([])
    whole = update_table(tmp_path / "whole.parquet", [empty, empty], {}, Step())
    assert whole.table.num_rows == 0
    output = tmp_path / "out.parquet"
    assert run_chunked(output, [empty, empty], Step(), 2).table.num_rows == 0


def test_changed_columns_in_one_chunk_are_recomputed_on_the_next_run(tmp_path):
    """The step's columns change (new code) while only one chunk has pending ids: update_table recomputes
    every row at once; the chunked merge cannot compute, so it refuses clearly, removes the rows in the old
    columns, and the next run computes them (the chunk that already has the new columns is reused)."""
    output, extra = tmp_path / "out.parquet", numbers([])
    run_chunked(output, [numbers(range(6)), extra], Step(), 2)
    new_id = next(k for k in range(6, 100) if chunk_of(f"img{k:03d}", 2) == 0)
    grown = numbers([*range(6), new_id])

    def wider(primary, extra):
        return Step()(primary, extra).append_column("z", pa.array([1] * primary.num_rows, pa.int64()))

    with pytest.raises(ValueError, match="columns changed while some of its 2 chunk"):
        run_chunked(output, [grown, extra], wider, 2)
    assert not output.exists()
    calls = []

    def counted(primary, extra):
        calls.extend(primary.column("id").to_pylist())
        return wider(primary, extra)

    merged = run_chunked(output, [grown, extra], counted, 2)
    assert merged.table.column_names == ["id", "y", "z", INPUT_DIGEST]
    assert merged.table.equals(update_table(tmp_path / "whole.parquet", [grown, extra], {}, wider).table)
    assert sorted(calls) == sorted(i for i in grown.column("id").to_pylist() if chunk_of(i, 2) == 1)


# --- the scan, split by path ------------------------------------------------------------------
def save_image(path, seed: int) -> None:
    Image.new("RGB", (24, 16), (seed * 40 % 256, seed * 90 % 256, 30)).save(path)


def test_scan_in_chunks_collapses_duplicates_across_chunks(tmp_path):
    source = tmp_path / "corpus"
    (source / "sub").mkdir(parents=True)
    for k in range(6):
        save_image(source / f"img{k}.png", seed=k)
    (source / "img1.txt").write_text("a man")
    (source / "empty.png").write_bytes(b"")
    (source / "broken.png").write_bytes(b"\x89PNG not really")

    def chunk_of_path(path):
        return chunk_of(str(path), 3)

    # copies of img0 (first in listing order) that land in other chunks, one of them captioned
    candidates = [source / "sub" / f"copy{n}.png" for n in range(50)]
    first = source / "img0.png"
    copies = [p for p in candidates if chunk_of_path(p) != chunk_of_path(first)][:2]
    for copy in copies:
        copy.write_bytes(first.read_bytes())
    copies[1].with_suffix(".txt").write_text("the same picture")
    assert len({chunk_of_path(p) for p in [first, *copies]}) >= 2

    listing = list_corpus(source)
    parts = [scan_files(chunk_rows(listing, c, 3, key="path")) for c in range(3)]
    assert sum(p.num_rows for p in parts) == listing.num_rows == 10 and all(p.num_rows for p in parts)
    chunked = collapse_duplicates(pa.concat_tables(parts))
    whole = scan_corpus(source)
    assert chunked.equals(whole) and chunked.num_rows == 8  # 6 images, 2 copies collapsed, 2 unusable files

    row = {r["path"]: r for r in whole.to_pylist()}[str(first)]
    assert sorted(row["duplicates"]) == sorted(str(p) for p in copies)
    assert row["caption"] == "the same picture"  # lent by a copy scanned in another chunk
    errors = {r["path"].rsplit("/", 1)[-1]: r["error"] for r in whole.to_pylist() if r["error"]}
    assert errors.keys() == {"empty.png", "broken.png"} and errors["empty.png"] == "empty_file"
