"""Incremental steps: update_table row reuse, scan_corpus decode reuse, build_dataset on a grown corpus."""

import hashlib
import logging
import shutil
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import fc_pipeline.data.corpus as corpus_module
from fc_pipeline.data.build import build_dataset
from fc_pipeline.data.corpus import scan_corpus
from fc_pipeline.data.incremental import INPUT_DIGEST, update_table
from fc_pipeline.images import load_image
from fc_pipeline.storage import read_parquet

from .conftest import draw_scene

STEPS = ("captions", "segments", "phrases", "matches")


@pytest.fixture(autouse=True)
def single_torch_thread():
    """Tiny models run fastest on one thread on the shared 2-core machine (see tests/model/conftest.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- update_table --------------------------------------------------------------------------------
def numbers(ids, scale=1):
    return pa.table({"id": [f"i{k}" for k in ids], "x": [k * scale for k in ids]})


class Doubling:
    """A step that doubles ``x``, remembering the ids of every call."""

    def __init__(self):
        self.calls: list[list[str]] = []

    def __call__(self, table: pa.Table) -> pa.Table:
        self.calls.append(table.column("id").to_pylist())
        doubled = pa.table({"id": table.column("id"), "y": [2 * x for x in table.column("x").to_pylist()]})
        return doubled.replace_schema_metadata({b"step": b"doubling"})


def test_update_table_reuses_unchanged_rows(tmp_path):
    output, step = tmp_path / "out.parquet", Doubling()
    first = update_table(output, [numbers(range(5))], {"factor": 2}, step)
    assert (first.computed, first.reused, first.dropped, first.status) == (5, 0, 0, "computed")
    assert step.calls == [[f"i{k}" for k in range(5)]]
    on_disk = pq.read_table(output)
    assert on_disk.column_names == ["id", "y", INPUT_DIGEST] and on_disk.schema.metadata[b"step"] == b"doubling"
    assert on_disk.column("y").to_pylist() == [0, 2, 4, 6, 8] and on_disk.equals(first.table)
    assert len(set(on_disk.column(INPUT_DIGEST).to_pylist())) == 5

    mtime = output.stat().st_mtime_ns
    again = update_table(output, [numbers(range(5))], {"factor": 2}, step)
    assert (again.computed, again.reused, again.dropped, again.status) == (0, 5, 0, "cached")
    assert len(step.calls) == 1 and output.stat().st_mtime_ns == mtime and again.table.equals(first.table)

    grown = numbers([0, 1, 7, 2, 3, 4, 8])  # two new ids, one in the middle: the output follows this order
    update = update_table(output, [grown], {"factor": 2}, step)
    assert (update.computed, update.reused, update.dropped, update.status) == (2, 5, 0, "updated")
    assert step.calls[-1] == ["i7", "i8"]
    assert update.table.column("id").to_pylist() == ["i0", "i1", "i7", "i2", "i3", "i4", "i8"]
    assert update.table.column("y").to_pylist() == [0, 2, 14, 4, 6, 8, 16]
    assert pq.read_table(output).equals(update.table) and update.table.schema.metadata[b"step"] == b"doubling"

    changed = grown.set_column(1, "x", pa.array([0, 1, 7, 20, 3, 4, 8]))  # i2's row changes
    update = update_table(output, [changed], {"factor": 2}, step)
    assert (update.computed, update.reused, update.status) == (1, 6, "updated") and step.calls[-1] == ["i2"]
    assert update.table.column("y").to_pylist()[3] == 40

    update = update_table(output, [changed], {"factor": 3}, step)  # other settings: every row is stale
    assert (update.computed, update.reused, update.status) == (7, 0, "computed") and len(step.calls[-1]) == 7

    shrunk = changed.filter(pa.array([image_id != "i3" for image_id in changed.column("id").to_pylist()]))
    update = update_table(output, [shrunk], {"factor": 3}, step)
    assert (update.computed, update.reused, update.dropped, update.status) == (0, 6, 1, "updated")
    assert len(step.calls) == 4  # nothing computed, only the row of i3 removed
    assert read_parquet(output).column("id").to_pylist() == ["i0", "i1", "i7", "i2", "i4", "i8"]


def test_update_table_digest_covers_every_input(tmp_path):
    """A row of the second input changes, appears or vanishes: only that id is recomputed."""
    output = tmp_path / "out.parquet"
    calls = []

    def join(primary: pa.Table, extra: pa.Table) -> pa.Table:
        calls.append(primary.column("id").to_pylist())
        found = dict(zip(extra.column("id").to_pylist(), extra.column("x").to_pylist()))
        return pa.table({"id": primary.column("id"), "z": [found.get(i) for i in primary.column("id").to_pylist()]})

    update_table(output, [numbers(range(4)), numbers(range(3), scale=10)], {}, join)
    assert calls == [["i0", "i1", "i2", "i3"]]
    update = update_table(output, [numbers(range(4)), numbers([0, 1, 3], scale=10)], {}, join)  # i2 gone, i3 new
    assert (update.computed, update.reused) == (2, 2) and calls[-1] == ["i2", "i3"]
    assert update.table.column("z").to_pylist() == [0, 10, None, 30]


def test_update_table_checks_what_compute_returns(tmp_path):
    output = tmp_path / "out.parquet"
    with pytest.raises(ValueError, match=r"missing \['i2'\], unexpected or repeated \['i9'\]"):
        update_table(output, [numbers(range(3))], {}, lambda t: pa.table({"id": ["i0", "i1", "i9"]}))
    with pytest.raises(ValueError, match=r"missing \[\], unexpected or repeated \['i0'\]"):
        update_table(output, [numbers(range(2))], {}, lambda t: pa.table({"id": ["i0", "i0", "i1"]}))
    assert not output.exists()
    with pytest.raises(ValueError, match="i1 appears twice"):
        update_table(output, [numbers([0, 1, 1])], {}, Doubling())


def test_update_table_recomputes_an_unusable_output(tmp_path, caplog):
    output, step = tmp_path / "out.parquet", Doubling()
    output.write_bytes(b"not parquet")
    with caplog.at_level(logging.WARNING, logger="fc_pipeline.data.incremental"):
        assert update_table(output, [numbers(range(3))], {}, step).status == "computed"
        pq.write_table(numbers(range(3)), output)  # an output from before the digests
        assert update_table(output, [numbers(range(3))], {}, step).computed == 3
    assert "unreadable" in caplog.text and f"no {INPUT_DIGEST} column" in caplog.text
    assert update_table(output, [numbers(range(3))], {}, step).status == "cached"


def test_update_table_recomputes_all_when_the_columns_change(tmp_path):
    output = tmp_path / "out.parquet"
    update_table(output, [numbers(range(3))], {}, Doubling())
    renamed = Doubling()
    update = update_table(output, [numbers(range(4))], {}, lambda t: renamed(t).rename_columns(["id", "w"]))
    assert (update.computed, update.reused) == (4, 0) and renamed.calls == [["i3"], ["i0", "i1", "i2"]]
    assert update.table.column_names == ["id", "w", INPUT_DIGEST] and update.table.column("w").to_pylist() == [
        0,
        2,
        4,
        6,
    ]


# --- scan_corpus(previous=...) -------------------------------------------------------------------
@pytest.fixture
def decodes(monkeypatch) -> list:
    """Every image scan_corpus decodes (the bytes' sha256)."""
    seen = []

    def counting(data, **kwargs):
        seen.append(hashlib.sha256(data).hexdigest())
        return load_image(data, **kwargs)

    monkeypatch.setattr(corpus_module, "load_image", counting)
    return seen


def test_scan_decodes_only_new_or_changed_files(tmp_path, corpus_dir, decodes):
    root = tmp_path / "corpus"
    root.mkdir()
    for k in range(4):
        draw_scene(1, seed=40 + k)[0].save(root / f"img{k}.png")
    shutil.copy(corpus_dir[0] / "bomb.png", root)
    first = scan_corpus(root)
    assert len(decodes) == 5

    for k in (4, 5):  # k = 2 new files
        draw_scene(2, seed=40 + k)[0].save(root / f"img{k}.png")
    (root / "img0.txt").write_text("a man")  # a new caption beside a known file
    decodes.clear()
    second = scan_corpus(root, previous=first)
    new = {hashlib.sha256((root / f"img{k}.png").read_bytes()).hexdigest() for k in (4, 5)}
    # the new files, and the too-large one (the limit may have changed since)
    assert Counter(decodes) == Counter(new | {hashlib.sha256((root / "bomb.png").read_bytes()).hexdigest()})
    assert second.num_rows == 7 and second.equals(scan_corpus(root))
    rows = {r["path"].split("/")[-1]: r for r in second.to_pylist()}
    assert rows["img0.png"]["caption"] == "a man" and rows["bomb.png"]["error"] == "too_large"

    draw_scene(3, seed=99)[0].save(root / "img1.png")  # same path, other bytes
    decodes.clear()
    third = scan_corpus(root, previous=second, max_pixels=100 * 100)
    assert len(decodes) == 2  # img1 and the bomb
    assert {r["path"].split("/")[-1]: r["error"] for r in third.to_pylist()}["img1.png"] is None
    fourth = scan_corpus(root, previous=third, max_pixels=90 * 60)  # 96x64 images are now too large
    assert set(fourth.column("error").to_pylist()) == {"too_large"}


# --- build_dataset on a growing corpus ------------------------------------------------------------
class Counted:
    """A model whose every attribute passes through; remembers the images given to ``method``."""

    def __init__(self, model, method: str):
        self.model, self.method, self.images = model, method, []

    def __getattr__(self, name):
        attribute = getattr(self.model, name)
        if name != self.method:
            return attribute

        def counted(images, *args, **kwargs):
            for image in images if isinstance(images, list) else [images]:
                self.images.append(pixel_digest(image))
            return attribute(images, *args, **kwargs)

        return counted


def pixel_digest(image) -> str:
    return hashlib.sha256(np.asarray(image).tobytes()).hexdigest()


class Factories:
    """Counting factories of counted tiny models."""

    def __init__(self, captioner, segmenter, matcher):
        self.models = {
            "captioner": Counted(captioner, "caption"),
            "segmenter": Counted(segmenter, "segment"),
            "matcher": Counted(matcher, "score"),
        }
        self.calls = Counter()

    def kwargs(self) -> dict:
        return {name: self._factory(name) for name in self.models}

    def _factory(self, name):
        def build():
            self.calls[name] += 1
            return self.models[name]

        return build

    def images(self) -> dict[str, list[str]]:
        return {name: model.images for name, model in self.models.items()}


def copy_images(source, target, names):
    """Copy test-corpus images with their caption and annotation files."""
    target.mkdir(parents=True, exist_ok=True)
    for name in names:
        stem = name.rsplit(".", 1)[0]
        for path in source.glob(f"{stem}.*"):
            shutil.copy(path, target)


def comparable(table: pa.Table) -> set:
    """A step table as a set of rows, without digests and with segment maps named by file name only."""
    rows = set()
    for row in table.drop_columns([c for c in (INPUT_DIGEST,) if c in table.column_names]).to_pylist():
        if row.get("seg_path"):
            row["seg_path"] = row["seg_path"].rsplit("/", 1)[-1]
        rows.add(tuple(sorted((k, str(v)) for k, v in row.items())))
    return rows


def test_build_dataset_processes_only_new_images(tmp_path, corpus_dir, tiny_captioner, tiny_segmenter, tiny_matcher):
    source, root, out = corpus_dir[0], tmp_path / "corpus", tmp_path / "dataset"
    # duo/solo/nobody: provided captions and annotations; plain0: captioned and segmented by the models
    copy_images(source, root, ["duo.jpg", "solo.png", "nobody.png", "plain0.jpg", "truncated.jpg"])
    options = dict(samples_per_shard=2, caption_batch_size=1, segment_batch_size=1)
    models = Factories(tiny_captioner, tiny_segmenter, tiny_matcher)
    first = build_dataset(root, out, **options, **models.kwargs())
    assert first["steps"] == {name: {"computed": 5, "reused": 0, "dropped": 0} for name in STEPS}
    assert first["samples"] == 2 and set(first["seconds"]) == {"images", *STEPS, "shards"}
    assert {name: len(images) for name, images in models.images().items()} == {
        "captioner": 1,
        "segmenter": 1,
        "matcher": 3,
    }

    copy_images(source, root, ["trio.jpg", "plain1.jpg"])  # an annotated, captioned image and a bare one
    models = Factories(tiny_captioner, tiny_segmenter, tiny_matcher)
    second = build_dataset(root, out, **options, **models.kwargs())
    assert second["steps"] == {name: {"computed": 2, "reused": 5, "dropped": 0} for name in STEPS}
    assert second["samples"] == 3 and second["images"] == 7
    plain1, trio = (pixel_digest(load_image(root / name)) for name in ("plain1.jpg", "trio.jpg"))
    assert models.calls == {"captioner": 1, "segmenter": 1, "matcher": 1}
    assert models.images() == {"captioner": [plain1], "segmenter": [plain1], "matcher": [trio]}

    fresh = tmp_path / "fresh"
    build_dataset(root, fresh, **options, captioner=tiny_captioner, segmenter=tiny_segmenter, matcher=tiny_matcher)
    for name in ("images", *STEPS):
        grown, rebuilt = read_parquet(out / f"{name}.parquet"), read_parquet(fresh / f"{name}.parquet")
        assert grown.num_rows == 7 and comparable(grown) == comparable(rebuilt), name
    assert sorted(p.name for p in (out / "segments").iterdir()) == sorted(
        p.name for p in (fresh / "segments").iterdir()
    )

    mtimes = {name: (out / f"{name}.parquet").stat().st_mtime_ns for name in STEPS}
    models = Factories(tiny_captioner, tiny_segmenter, tiny_matcher)
    third = build_dataset(root, out, **options, **models.kwargs())
    assert third["steps"] == {name: {"computed": 0, "reused": 7, "dropped": 0} for name in STEPS}
    assert models.calls == {} and {name: (out / f"{name}.parquet").stat().st_mtime_ns for name in STEPS} == mtimes

    (root / "nobody.png").unlink()
    fourth = build_dataset(root, out, **options, **models.kwargs())
    assert fourth["steps"] == {name: {"computed": 0, "reused": 6, "dropped": 1} for name in STEPS}
    assert models.calls == {} and read_parquet(out / "matches.parquet").num_rows == 6
    assert len(list((out / "segments").iterdir())) == 4  # duo, solo, trio and the dropped nobody's map
