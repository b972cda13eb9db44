"""Atomic writes: the target appears complete or not at all."""

import json

import pyarrow as pa
import pytest

from fc_pipeline.storage import atomic_write, read_parquet, write_json, write_parquet


def test_atomic_write_replaces_on_success(tmp_path):
    target = tmp_path / "sub" / "file.bin"
    with atomic_write(target) as handle:
        handle.write(b"abc")
        assert not target.exists()
    assert target.read_bytes() == b"abc"
    assert [p.name for p in target.parent.iterdir()] == ["file.bin"]


def test_atomic_write_failure_keeps_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "file.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write(target, "w") as handle:
            handle.write("new, half written")
            raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.txt"]


def test_parquet_and_json_round_trip(tmp_path):
    table = pa.table({"id": ["a", "b"], "n": [1, None]})
    write_parquet(table, tmp_path / "t.parquet")
    assert read_parquet(tmp_path / "t.parquet").equals(table)
    write_json({"x": [1, "é"]}, tmp_path / "o.json")
    assert json.loads((tmp_path / "o.json").read_text("utf-8")) == {"x": [1, "é"]}
    with pytest.raises(FileNotFoundError):
        read_parquet(tmp_path / "missing.parquet")
