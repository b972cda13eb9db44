"""The whole chain on the test corpus: shards read back with webdataset and tarfile, ledger, resume
(growth of a corpus: test_shards_append.py)."""

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from fc_pipeline.data.shards import read_samples, shard_urls, split_ids, split_position, write_shards
from fc_pipeline.storage import read_parquet


def _tables(out):
    return [read_parquet(out / f"{name}.parquet") for name in ("images", "phrases", "segments", "matches")]


def test_every_image_is_a_sample_or_in_the_ledger(built, corpus_dir):
    out, stats = built
    _, expected = corpus_dir
    ledger = {row["path"].split("/")[-1]: row for row in read_parquet(out / "shards" / "failures.parquet").to_pylist()}
    assert {name: row["reason"] for name, row in ledger.items()} == {n: r for n, r in expected.items() if r}
    assert ledger["truncated.jpg"]["step"] == "scan" and ledger["nobody.png"]["step"] == "match"
    samples = [n for n, r in expected.items() if r is None]
    assert stats["images"] == len(expected) and stats["samples"] == len(samples) == 7
    assert stats["failures"] == {
        "bad_annotation": 1,
        "empty_file": 1,
        "no_person": 1,
        "no_segments": 3,
        "too_large": 1,
        "truncated": 1,
        "unreadable": 1,
    }
    assert stats["splits"]["val"]["samples"] == 1  # no u < 0.05 among 7: the smallest u (cmyk.jpg) validates
    assert stats["subjects_histogram"] == {"1": 4, "2": 2, "3": 1}
    assert stats["splits"]["train"]["shards"] == ["00000.tar", "00001.tar", "00002.tar"]
    on_disk = json.loads((out / "shards" / "train" / "_stats.json").read_text())
    assert on_disk["samples"] == 6 and on_disk["failures"] == stats["failures"]
    assert set(stats["seconds"]) == {"images", "captions", "segments", "phrases", "matches", "shards"}


def test_samples_read_back_with_webdataset(built, corpus_dir):
    out, _ = built
    root, _ = corpus_dir
    samples = {s["meta"]["source"]["path"].split("/")[-1]: s for s in read_samples(out / "shards", "train")}
    samples |= {s["meta"]["source"]["path"].split("/")[-1]: s for s in read_samples(out / "shards", "val")}
    assert len(samples) == 7
    duo = samples["duo.jpg"]
    meta = duo["meta"]
    assert meta["raw_caption"] == "two women standing on the grass"
    assert meta["caption"] == "a woman and a woman standing on the grass"
    assert [(s["phrase"], s["start"], s["end"]) for s in meta["subjects"]] == [("a woman", 0, 7), ("a woman", 12, 19)]
    for subject in meta["subjects"]:
        assert meta["caption"][subject["start"] : subject["end"]] == subject["phrase"]
        segment = next(s for s in meta["segments"] if s["id"] == subject["segment_id"])
        assert segment["label"] == "person" and (duo["seg"] == subject["segment_id"]).sum() == segment["area"]
    assert len({s["segment_id"] for s in meta["subjects"]}) == 2
    assert duo["image"].mode == "RGB" and duo["image"].size == (96, 64) and duo["seg"].shape == (64, 96)
    assert duo["seg"].dtype == np.uint16
    assert meta["source"]["sha256"].startswith(duo["id"]) and meta["models"]["profile"] == "tiny"
    assert samples["trio.jpg"]["meta"]["caption"].startswith("a young man and a young man and a young man")
    assert len(samples["trio.jpg"]["meta"]["subjects"]) == 3
    assert samples["rotated.jpg"]["image"].size == (96, 64)  # stored upright
    assert samples["cmyk.jpg"]["image"].mode == "RGB"
    original = np.asarray(Image.open(root / "duo.jpg"), dtype=np.int16)
    assert np.abs(np.asarray(duo["image"], dtype=np.int16) - original).mean() < 3  # JPEG q95 re-encode


def test_shards_read_back_with_plain_tarfile(built):
    out, _ = built
    urls = shard_urls(out / "shards", "train")
    assert [u.split("/")[-1] for u in urls] == ["00000.tar", "00001.tar", "00002.tar"]
    names = []
    for url in urls:
        with tarfile.open(url) as tar:
            members = tar.getnames()
            names += members
            key = members[0].split(".")[0]
            assert sorted(members[:3]) == sorted([f"{key}.jpg", f"{key}.json", f"{key}.seg.png"])
            seg = Image.open(io.BytesIO(tar.extractfile(f"{key}.seg.png").read()))
            assert seg.mode == "I;16"
            assert json.loads(tar.extractfile(f"{key}.json").read())["subjects"]
        sidecar = read_parquet(url.replace(".tar", ".parquet"))
        assert sorted(sidecar.column("id").to_pylist()) == sorted({m.split(".")[0] for m in members})
    assert len(names) == 3 * 6


def test_resume_writes_only_what_a_killed_run_left_incomplete(built, tmp_path):
    out, _ = built
    tables = _tables(out)
    target = tmp_path / "shards"
    kwargs = dict(samples_per_shard=2, models={"profile": "tiny"})
    first = write_shards(*tables, target, **kwargs)
    assert len(first["written"]) == 4 and first["skipped"] == [] and first["mode"] == "appended"
    train = target / "train"
    last = (train / "00002.tar").read_bytes()
    mtimes = {p.name: p.stat().st_mtime_ns for p in train.iterdir()}
    (train / "00002.parquet").unlink()  # killed between the last tar and its sidecar
    (train / ".00003.tar.abc123.tmp").write_bytes(b"half a shard from a killed run")
    second = write_shards(*tables, target, **kwargs)
    assert [p.split("/")[-1] for p in second["written"]] == ["00002.tar"] and len(second["skipped"]) == 3
    assert (train / "00002.tar").read_bytes() == last  # the same samples give the same bytes
    for name in ("00000.tar", "00001.tar", "00000.parquet", "00001.parquet"):
        assert (train / name).stat().st_mtime_ns == mtimes[name]
    assert not list(train.glob(".*.tmp"))
    assert second["splits"] == first["splits"] and second["appended"] == 2
    # other models change every sample's metadata: every shard is written again
    third = write_shards(*tables, target, samples_per_shard=2, models={"profile": "other"})
    assert len(third["written"]) == 4 and third["mode"] == "rebuilt"


def test_killed_write_leaves_no_tar(built, tmp_path, monkeypatch):
    import fc_pipeline.data.shards as shards

    def explode(record):
        raise KeyboardInterrupt  # a kill in the middle of a shard

    monkeypatch.setattr(shards, "_encode_sample", explode)
    with pytest.raises(KeyboardInterrupt):
        write_shards(*_tables(built[0]), tmp_path / "s", samples_per_shard=2)
    assert not list((tmp_path / "s").rglob("*.tar")) and not list((tmp_path / "s").rglob("*.tmp"))


def test_split_is_by_id_and_sized():
    ids = [f"{k:016x}" for k in range(200)]
    split = split_ids(ids, val_fraction=0.05, val_max=1000)
    assert len(split["val"]) == 13 and len(split["train"]) == 187  # the ids with u < 0.05 (10 expected)
    assert split == split_ids(list(reversed(ids)), 0.05, 1000)
    assert len(split_ids(ids, 0.5, val_max=7)["val"]) == 7
    assert split_ids(ids[:1], 0.05, 1000) == {"train": ids[:1], "val": []}
    assert split_ids(ids[:2], 0.05, 1000) == {"train": ids[:1], "val": ids[1:2]}  # none under 0.05: smallest u
    assert split_ids(ids, 0.0, 1000)["val"] == []
    assert split_ids(ids[:1], 0.05, 1000, existing={"train": 1, "val": 0}) == {"train": [], "val": ids[:1]}
    grown = split_ids([f"{k:016x}" for k in range(200, 220)], 0.05, 1000, existing={"train": 187, "val": 13})
    assert grown["val"] == [] and len(grown["train"]) == 20  # no new id under 0.05; the old ones stay put
    assert split_ids(ids, 0.05, 15, existing={"train": 0, "val": 10})["val"] == sorted(
        sorted(split["val"], key=split_position)[:5]
    )


def test_shard_size_shapes_only_new_shards(built, tmp_path):
    tables = _tables(built[0])
    write_shards(*tables, tmp_path, samples_per_shard=1)
    assert len(shard_urls(tmp_path, "train")) == 6
    again = write_shards(*tables, tmp_path, samples_per_shard=4)
    assert again["mode"] == "unchanged" and again["written"] == [] and len(shard_urls(tmp_path, "train")) == 6
    assert sum(1 for _ in read_samples(tmp_path, "train")) == 6


def test_cli_build_dataset(tmp_path, capsys):
    from fc_pipeline.cli import main

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    Image.new("RGB", (8, 8)).save(corpus / "x.png")
    (corpus / "x.txt").write_text("two men")
    (corpus / "y.jpg").write_bytes(b"")
    assert main(["build-dataset", str(corpus), "--out", str(tmp_path / "out"), "--match-threshold", "0.5"]) == 0
    printed = capsys.readouterr().out
    assert "images in: 2  samples out: 0" in printed and "'empty_file': 1" in printed and "'no_segments': 1" in printed
    assert (tmp_path / "out" / "shards" / "failures.parquet").exists()
