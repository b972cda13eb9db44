"""scan_corpus: folders and manifests, ids, captions, annotations, duplicates, error codes."""

import hashlib
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from fc_pipeline.data.corpus import scan_corpus


def test_folder_scan_rows_and_reasons(corpus_dir):
    root, expected = corpus_dir
    table = scan_corpus(root)
    assert table.column_names == [
        "id",
        "path",
        "sha256",
        "width",
        "height",
        "caption",
        "annotation",
        "error",
        "duplicates",
    ]
    rows = {r["path"].split("/")[-1]: r for r in table.to_pylist()}
    assert set(rows) == set(expected)  # the duplicate in sub/ collapsed, annotation PNGs are not images
    duo = rows["duo.jpg"]
    assert duo["sha256"] == hashlib.sha256((root / "duo.jpg").read_bytes()).hexdigest()
    assert duo["id"] == duo["sha256"][:16]
    assert duo["duplicates"] == [str(root / "sub" / "duo_copy.jpg")]
    assert duo["caption"] == "two women standing on the grass"
    assert duo["annotation"] == str(root / "duo.panoptic.json")
    assert (duo["width"], duo["height"]) == (96, 64)
    assert (rows["rotated.jpg"]["width"], rows["rotated.jpg"]["height"]) == (96, 64)  # EXIF applied
    assert rows["trio.jpg"]["caption"] == "3 young men on a field"  # stripped
    assert rows["blank_caption.png"]["caption"] is None
    assert rows["plain0.jpg"]["annotation"] is None
    scan_reasons = {"truncated", "empty_file", "unreadable", "too_large"}
    for name, reason in expected.items():
        assert rows[name]["error"] == (reason if reason in scan_reasons else None), name
    assert len({r["id"] for r in rows.values()}) == len(rows)


def test_manifest_jsonl_and_parquet(tmp_path):
    Image.new("RGB", (10, 8), "red").save(tmp_path / "a.png")
    Image.new("RGB", (10, 8), "blue").save(tmp_path / "b.png")
    records = [
        {"path": "a.png", "caption": "a red square"},
        {"path": str(tmp_path / "b.png")},
        {"path": "missing.png", "caption": "gone"},
    ]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "m.parquet")
    for manifest in ("m.jsonl", "m.parquet"):
        rows = scan_corpus(tmp_path / manifest).to_pylist()
        assert [r["caption"] for r in rows] == ["a red square", None, "gone"]
        assert [r["error"] for r in rows] == [None, None, "not_found"]
        assert rows[0]["path"] == str(tmp_path / "a.png")
        assert rows[2]["id"].startswith("path-") and len(rows[2]["id"]) == 16


def test_bad_sources(tmp_path):
    with pytest.raises(FileNotFoundError):
        scan_corpus(tmp_path / "nope")
    (tmp_path / "m.jsonl").write_text('{"path": "a.png"}\nnot json\n')
    with pytest.raises(ValueError, match=r"m.jsonl:2"):
        scan_corpus(tmp_path / "m.jsonl")
    (tmp_path / "n.jsonl").write_text('{"caption": "no path"}\n')
    with pytest.raises(ValueError, match="no 'path'"):
        scan_corpus(tmp_path / "n.jsonl")
    (tmp_path / "x.csv").write_text("path\n")
    with pytest.raises(ValueError, match="manifest"):
        scan_corpus(tmp_path / "x.csv")
