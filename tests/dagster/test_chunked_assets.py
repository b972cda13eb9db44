"""Fan-out inside one corpus through Dagster: the dataset chain with 3 chunks writes what 1 chunk writes,
runs 3 chunk steps per per-image asset, and a chunked rerun of a 1-chunk build is cached end to end."""

import hashlib
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pyarrow as pa
import pytest

import assets
from assets.resources import CaptionerResource, DatasetStore
from fc_pipeline.data.demo_corpus import make_demo_corpus
from fc_pipeline.storage import read_parquet

from .conftest import DATASET_ASSETS, metadata

CORPUS = "fanout"
IMAGES = 24
CHUNKED = ["corpus_images", "captions", "panoptic_segments", "noun_phrases", "subject_matches"]
NAMES = [*CHUNKED, "training_shards"]

pytestmark = pytest.mark.slow


@dataclass
class Build:
    root: Path
    result: dg.ExecuteInProcessResult

    def path(self, name: str) -> Path:
        return self.root / "datasets" / CORPUS / name

    def table(self, name: str) -> pa.Table:
        return read_parquet(self.path(name))


def materialize(instance, source: Path, root: Path, chunks: int, run_config: dict | None = None):
    resources = {
        **assets.defs.resources,
        "store": DatasetStore(data_root=str(root), chunks=chunks),
        "captioner": CaptionerResource(max_new_tokens=8),  # as tests/dagster/conftest.py: quick and as telling
    }
    return dg.materialize(
        DATASET_ASSETS,
        resources=resources,
        instance=instance,
        partition_key=CORPUS,
        run_config={"ops": {"corpus_images": {"config": {"source": str(source)}}}, **(run_config or {})},
    )


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """One drawn corpus built into two data roots: with 1 chunk and with 3 (same instance)."""
    tmp = tmp_path_factory.mktemp("fanout")
    source = make_demo_corpus(tmp / "corpus", n=IMAGES)
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("corpus", [CORPUS])
        one = Build(tmp / "one", materialize(instance, source, tmp / "one", chunks=1))
        three = Build(tmp / "three", materialize(instance, source, tmp / "three", chunks=3))
        yield {"source": source, "instance": instance, 1: one, 3: three}


def shard_files(build: Build) -> dict[str, str]:
    """``<split>/<file>`` -> sha256 of every shard tar and sidecar."""
    files = sorted(p for ext in ("tar", "parquet") for p in build.path("shards").glob(f"*/[0-9]*.{ext}"))
    return {f"{p.parent.name}/{p.name}": hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def without_root(table: pa.Table, root: Path, column: str) -> pa.Table:
    """``table`` with the data root in ``column`` replaced by a placeholder."""
    values = [None if v is None else v.replace(str(root), "<root>") for v in table.column(column).to_pylist()]
    return table.set_column(table.column_names.index(column), column, pa.array(values, pa.string()))


def step_outputs(result: dg.ExecuteInProcessResult, op: str) -> dict[str, dict]:
    """Step key -> output metadata of every step of ``op`` (e.g. ``captions_chunk``)."""
    outputs = {}
    for event in result.all_events:
        if event.is_successful_output and event.step_key.split(".")[-1].split("[")[0] == op:
            data = event.step_output_data.metadata
            outputs[event.step_key] = {k: getattr(v, "value", v) for k, v in data.items()}
    return outputs


def test_three_chunks_write_what_one_chunk_writes(builds):
    one, three = builds[1], builds[3]
    assert one.result.success and three.result.success
    shards = shard_files(one)
    assert any(name.endswith(".tar") for name in shards) and any(name.endswith(".parquet") for name in shards)
    assert shard_files(three) == shards  # byte-identical shards and sidecars, same split

    assert three.table("images.parquet").equals(one.table("images.parquet"))  # paths point into the one source
    for name in ("captions.parquet", "phrases.parquet"):
        assert three.table(name).equals(one.table(name)), name
    segments = [without_root(b.table("segments.parquet"), b.root, "seg_path") for b in (one, three)]
    assert segments[1].equals(segments[0]) and segments[0].num_rows == IMAGES
    maps = [sorted(p.name for p in b.path("segments").iterdir()) for b in (one, three)]
    with_map = segments[0].column("seg_path").drop_null().to_pylist()
    assert maps[0] == maps[1] == sorted(Path(p).name for p in with_map) and len(maps[0]) >= 1
    for name in maps[0]:
        assert (three.path("segments") / name).read_bytes() == (one.path("segments") / name).read_bytes()
    matches = [b.table("matches.parquet") for b in (one, three)]
    assert matches[1].drop_columns(["input_digest"]).equals(matches[0].drop_columns(["input_digest"]))

    for build in (one, three):  # no chunk file or listing stays behind
        leftovers = [
            p.name
            for p in build.path("").iterdir()
            if not p.name.startswith(".") and (".chunk-" in p.name or ".listing." in p.name)
        ]
        assert leftovers == []
    for name in NAMES:
        first, chunked = metadata(one.result, name), metadata(three.result, name)
        assert chunked["status"] == first["status"] == ("updated" if name == "training_shards" else "computed"), name
        assert chunked["rows"] == first["rows"] and chunked["failures_by_reason"] == first["failures_by_reason"], name


def data_version(result: dg.ExecuteInProcessResult, name: str) -> str:
    (event,) = result.asset_materializations_for_node(name)
    return event.tags["dagster/data_version"]


def test_data_versions_do_not_depend_on_the_chunk_count(builds):
    """Tables and shards without data-root paths: same bytes, so the same data version whatever K was."""
    for name in ("corpus_images", "captions", "noun_phrases", "training_shards"):
        assert data_version(builds[3].result, name) == data_version(builds[1].result, name), name
    assert len({data_version(builds[3].result, name) for name in NAMES}) == len(NAMES)


def test_three_chunks_run_as_three_steps(builds):
    result = builds[3].result
    for name in CHUNKED:
        steps = step_outputs(result, f"{name}_chunk")
        assert sorted(steps) == [f"{name}.{name}_chunk[{i}_of_3]" for i in range(3)], name
        assert [s["chunk"] for s in sorted(steps.values(), key=lambda s: s["chunk"])] == ["0_of_3", "1_of_3", "2_of_3"]
        assert metadata(result, name)["chunks"] == 3
    scans = step_outputs(result, "corpus_images_chunk")
    assert sum(s["files"] for s in scans.values()) == IMAGES and sum(s["unreadable"] for s in scans.values()) == 1

    captions = metadata(result, "captions")
    assert captions["computed"] == captions["rows"] == IMAGES and (captions["reused"], captions["dropped"]) == (0, 0)
    chunks = step_outputs(result, "captions_chunk").values()
    assert sum(c["computed"] for c in chunks) == IMAGES and all(0 < c["computed"] < IMAGES for c in chunks)
    assert metadata(builds[1].result, "captions")["chunks"] == 1
    assert len(step_outputs(builds[1].result, "captions_chunk")) == 1


def test_chunked_rerun_of_a_one_chunk_build_is_cached(builds):
    one = builds[1]
    tables = ["images.parquet", "captions.parquet", "segments.parquet", "phrases.parquet", "matches.parquet"]
    mtimes = {name: one.path(name).stat().st_mtime_ns for name in tables}
    shards = shard_files(one)
    result = materialize(
        builds["instance"],
        builds["source"],
        one.root,
        chunks=1,
        run_config={"resources": {"store": {"config": {"data_root": str(one.root), "chunks": 3}}}},
    )
    assert result.success
    assert {name: metadata(result, name)["status"] for name in NAMES} == dict.fromkeys(NAMES, "cached")
    assert len(step_outputs(result, "captions_chunk")) == 3 and metadata(result, "captions")["chunks"] == 3
    for name in CHUNKED[1:]:
        meta = metadata(result, name)
        assert (meta["computed"], meta["reused"], meta["dropped"]) == (0, IMAGES, 0), name
        assert all(s["computed"] == 0 for s in step_outputs(result, f"{name}_chunk").values()), name
    assert metadata(result, "corpus_images")["new_images"] == 0
    assert metadata(result, "training_shards")["appended"] == 0
    assert {name: one.path(name).stat().st_mtime_ns for name in tables} == mtimes and shard_files(one) == shards
    assert not [p for p in one.path("").iterdir() if ".chunk-" in p.name and not p.name.startswith(".")]
