"""Bad inputs end in one clear line, and every file of a corpus ends in a shard or in the ledger."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fc_pipeline.data.corpus import scan_corpus

pytestmark = pytest.mark.reliability


def test_symlinks_that_lead_nowhere_are_in_the_ledger(reference, corpus):
    out, snap = reference
    images = pq.read_table(out / "images.parquet").to_pylist()
    by_name = {row["path"].rsplit("/", 1)[-1]: row for row in images}
    assert by_name["ghost.jpg"]["error"] == "broken_symlink"
    assert by_name["loop_a.jpg"]["error"] == by_name["loop_b.jpg"]["error"] == "symlink_loop"
    ledger = {(row[1].rsplit("/", 1)[-1], row[3]) for row in snap["ledger"]}
    assert {("ghost.jpg", "broken_symlink"), ("loop_a.jpg", "symlink_loop"), ("loop_b.jpg", "symlink_loop")} <= ledger
    # every listed image is a sample or a ledger row, exactly once
    samples = [i for stats in snap["stats"].values() for i in [stats["samples"]]]
    assert sum(samples) + len(snap["ledger"]) == len(images)


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"path": "a.jpg"}', '{"path": 12345}'], r"manifest.jsonl:2: 'path' must be a string, not int"),
        (['{"path": "a.jpg"}', "", '{"caption": "x"}'], r"manifest.jsonl:3: the record has no 'path'"),
        (['{"path": "a.jpg", "caption": 5}'], r"manifest.jsonl:1: 'caption' must be a string, not int"),
        (['{"path": "a.jpg"', '{"path": "b.jpg"}'], r"manifest.jsonl:1: not a JSON object \(Expecting"),
        (['["a.jpg"]'], r"manifest.jsonl:1: not a JSON object but list"),
    ],
)
def test_a_bad_manifest_line_is_named(tmp_path, lines, message):
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=message):
        scan_corpus(manifest)


def test_a_bad_parquet_manifest_row_is_named(tmp_path):
    manifest = tmp_path / "manifest.parquet"
    pq.write_table(pa.table({"path": [1, 2]}), manifest)
    with pytest.raises(ValueError, match=r"manifest.parquet: row 1: 'path' must be a string, not int"):
        scan_corpus(manifest)


def test_cli_exits_2_with_one_line_on_a_bad_manifest(tmp_path, capsys):
    from fc_pipeline.cli import main

    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text(json.dumps({"path": 12345}) + "\n")
    assert main(["build-dataset", str(manifest), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"build-dataset: {manifest}:1: 'path' must be a string, not int"
