"""Append-only shards: a growing corpus adds shards and never rewrites a complete one.

The four input tables are built by hand (no models): image ``k`` has the id ``f"{k:016x}"``, so
every split below is fixed by the ids alone. ``u`` of the first ids (``split_position``):
0x01 0.257, 0x08 0.0496, 0x15 0.0388, 0x1b 0.0466 — the only ids under 0.05 among 0x00–0x1d.
"""

import json
import logging
import os
import random

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from fc_pipeline.data.corpus import CORPUS_SCHEMA
from fc_pipeline.data.matching import MATCHES_SCHEMA
from fc_pipeline.data.phrases import PHRASES_SCHEMA
from fc_pipeline.data.segmentation import SEGMENTS_SCHEMA
from fc_pipeline.data.shards import read_samples, split_ids, split_position, write_shards
from fc_pipeline.storage import read_parquet

MODELS = {"profile": "tiny", "captioner": "blip2-tiny"}
BACKDATED = 1_000_000_000 * 10**9


class Corpus:
    """The four step tables of a corpus that grows: image ``k`` shows ``1 + k % 3`` people."""

    def __init__(self, root):
        self.root = root
        self.rows = {"corpus": {}, "phrases": {}, "segments": {}, "matches": {}}

    def add(self, keys, error=None):
        for k in keys:
            image_id, people = f"{k:016x}", 1 + k % 3
            path, seg_path = self.root / f"{k}.png", self.root / f"{k}.seg.png"
            Image.new("RGB", (24, 16), (k % 256, 80, 160)).save(path)
            id_map = np.zeros((16, 24), np.uint16)
            for person in range(people):
                id_map[2:14, 1 + 7 * person : 6 + 7 * person] = person + 1
            Image.fromarray(id_map).save(seg_path)
            caption = " and ".join(["a man"] * people)
            subjects = [
                {"phrase": "a man", "start": 10 * n, "end": 10 * n + 5, "segment_id": n + 1, "score": 0.9}
                for n in range(people)
            ]
            segments = [
                {"id": n + 1, "label": "person", "category_id": 1, "isthing": True, "area": 60} for n in range(people)
            ]
            self.rows["corpus"][image_id] = dict(
                id=image_id, path=str(path), sha256=image_id * 4, width=24, height=16, error=error
            )
            self.rows["phrases"][image_id] = dict(id=image_id, raw_caption=caption, caption=caption, error=error)
            self.rows["segments"][image_id] = dict(
                id=image_id, seg_path=str(seg_path), segments=json.dumps(segments), error=error
            )
            self.rows["matches"][image_id] = dict(
                id=image_id, subjects=json.dumps(subjects), n_subjects=people, error=error
            )
        return self

    def remove(self, keys):
        for rows in self.rows.values():
            for k in keys:
                del rows[f"{k:016x}"]

    def tables(self):
        schemas = (CORPUS_SCHEMA, PHRASES_SCHEMA, SEGMENTS_SCHEMA, MATCHES_SCHEMA)
        return [pa.Table.from_pylist(list(rows.values()), schema=s) for rows, s in zip(self.rows.values(), schemas)]


def write(corpus, out, **options):
    return write_shards(*corpus.tables(), out, **{"samples_per_shard": 4, "models": MODELS, **options})


def backdated(out):
    """Bytes and mtime of every shard and sidecar, by path relative to ``out``, after setting each
    mtime to 2001: a file written again later shows a new mtime however fast the test runs."""
    for path in out.glob("*/[0-9]*.*"):
        os.utime(path, ns=(BACKDATED, BACKDATED))
    return files(out)


def files(out):
    return {str(p.relative_to(out)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(out.glob("*/[0-9]*.*"))}


def splits_by_id(out):
    return {s["id"]: split for split in ("train", "val") for s in read_samples(out, split)}


@pytest.fixture
def corpus(tmp_path):
    (tmp_path / "images").mkdir()
    return Corpus(tmp_path / "images")


def test_growing_corpus_appends_shards_and_keeps_the_old_ones(corpus, tmp_path):
    out = tmp_path / "shards"
    first = write(corpus.add(range(10)).add([100], error="truncated"), out)
    assert first["mode"] == "appended" and first["appended"] == 10 and first["images"] == 11
    assert first["splits"]["val"] == {"samples": 1, "shards": ["00000.tar"], "subjects_histogram": {"3": 1}}  # 0x08
    assert first["splits"]["train"]["shards"] == ["00000.tar", "00001.tar", "00002.tar"]  # 4 + 4 + 1
    assert first["failures"] == {"truncated": 1}
    before = backdated(out)

    second = write(corpus.add(range(10, 30)), out)
    assert second["mode"] == "appended" and second["appended"] == 20 and second["images"] == 31
    new = [
        "train/00003.tar",
        "train/00004.tar",
        "train/00005.tar",
        "train/00006.tar",
        "train/00007.tar",
        "val/00001.tar",
    ]
    assert [p[len(str(out)) + 1 :] for p in second["written"]] == new
    assert [p[len(str(out)) + 1 :] for p in second["skipped"]] == [
        "train/00000.tar",
        "train/00001.tar",
        "train/00002.tar",
        "val/00000.tar",
    ]
    after = files(out)
    assert {name: after[name] for name in before} == before  # same bytes, same mtime
    assert set(after) - set(before) == {n for p in new for n in (p, p.replace(".tar", ".parquet"))}
    # totals over every shard: 30 samples, 10 of each subject count, 3 in val (0x08, 0x15, 0x1b)
    assert second["samples"] == 30 and second["subjects_histogram"] == {"1": 10, "2": 10, "3": 10}
    assert second["splits"]["val"]["samples"] == 3 and second["splits"]["train"]["samples"] == 27
    assert [len(read_parquet(out / "train" / f"0000{n}.parquet")) for n in range(8)] == [4, 4, 1, 4, 4, 4, 4, 2]
    on_disk = json.loads((out / "val" / "_stats.json").read_text())
    assert (
        on_disk["samples"] == 3
        and on_disk["shards"] == ["00000.tar", "00001.tar"]
        and on_disk["failures"] == {"truncated": 1}
    )
    assert splits_by_id(out) == {f"{k:016x}": "val" if k in (0x08, 0x15, 0x1B) else "train" for k in range(30)}
    assert read_parquet(out / "failures.parquet").to_pylist() == [
        {"id": f"{100:016x}", "path": str(corpus.root / "100.png"), "step": "scan", "reason": "truncated"}
    ]

    third = write(corpus, out, samples_per_shard=100)  # shard size shapes new shards only
    assert third["mode"] == "unchanged" and third["written"] == [] and third["appended"] == 0
    assert files(out) == after and third["splits"] == second["splits"]


def test_a_sample_never_changes_split_as_the_corpus_grows(corpus, tmp_path):
    out = tmp_path / "shards"
    write(corpus.add([0, 1]), out)
    assert splits_by_id(out) == {f"{0:016x}": "train", f"{1:016x}": "val"}  # no u < 0.05: the smallest u validates
    seen = {}
    for keys in ([2, 3], range(4, 12), range(12, 30)):
        stats = write(corpus.add(keys), out)
        now = splits_by_id(out)
        assert {i: now[i] for i in seen} == seen and len(now) == stats["samples"]
        seen = now
    assert sorted(i for i, split in seen.items() if split == "val") == [f"{k:016x}" for k in (0x01, 0x08, 0x15, 0x1B)]


def test_split_depends_on_the_id_only_until_val_max():
    rng = random.Random(0)
    ids = [f"{rng.getrandbits(64):016x}" for _ in range(3000)]
    one_go = split_ids(ids, 0.05, 1000)  # binomial: 150 ± 12 expected
    assert len(one_go["val"]) == 171 and set(one_go["val"]) == {i for i in ids if split_position(i) < 0.05}
    for order in range(3):
        shuffled = rng.sample(ids, len(ids))
        cuts = sorted(rng.sample(range(200, len(ids)), 6))
        assigned, counts = {}, {"train": 0, "val": 0}
        for a, b in zip([0, *cuts], [*cuts, len(ids)]):
            for split, chunk in split_ids(shuffled[a:b], 0.05, 1000, existing=counts).items():
                assigned |= dict.fromkeys(chunk, split)
                counts[split] += len(chunk)
        assert sorted(i for i, split in assigned.items() if split == "val") == one_go["val"], order
    # a capped val fills up with the first arrivals under 0.05, then stays full
    counts, val = {"train": 0, "val": 0}, []
    for a in range(0, 3000, 500):
        new = split_ids(ids[a : a + 500], 0.05, 60, existing=counts)
        counts = {split: counts[split] + len(new[split]) for split in counts}
        val += new["val"]
        assert counts["val"] == min(60, sum(split_position(i) < 0.05 for i in ids[: a + 500]))
    assert len(val) == 60 and all(split_position(i) < 0.05 for i in val)


def test_changed_settings_or_rebuild_rewrite_every_shard(corpus, tmp_path, caplog):
    out = tmp_path / "shards"
    write(corpus.add(range(10)), out)
    assert json.loads((out / "_dataset.json").read_text()) == {"models": MODELS, "val_fraction": 0.05, "val_max": 1000}
    before = backdated(out)
    with caplog.at_level(logging.WARNING, logger="fc_pipeline.data.shards"):
        other = write(corpus, out, models={**MODELS, "captioner": "blip2-other"}, samples_per_shard=5)
    assert "models changed" in caplog.text
    assert other["mode"] == "rebuilt" and other["appended"] == 10 and other["skipped"] == []
    assert other["splits"]["train"]["shards"] == ["00000.tar", "00001.tar"] and other["samples"] == 10
    assert next(read_samples(out, "val"))["meta"]["models"]["captioner"] == "blip2-other"
    assert json.loads((out / "_dataset.json").read_text())["models"]["captioner"] == "blip2-other"
    assert write(corpus, out, models={**MODELS, "captioner": "blip2-other"})["mode"] == "unchanged"
    # back to the first settings: the same bytes as the first build
    assert write(corpus, out, val_max=1000)["mode"] == "rebuilt"
    assert {name: data for name, (data, _) in files(out).items()} == {name: data for name, (data, _) in before.items()}
    assert write(corpus, out, rebuild=True)["mode"] == "rebuilt"
    caplog.clear()
    (out / "_dataset.json").unlink()  # shards of an earlier version
    with caplog.at_level(logging.WARNING, logger="fc_pipeline.data.shards"):
        assert write(corpus, out)["mode"] == "rebuilt"
    assert "no _dataset.json" in caplog.text


def test_a_tar_without_its_sidecar_is_written_again(corpus, tmp_path):
    out = tmp_path / "shards"
    write(corpus.add(range(10)), out)
    before = backdated(out)
    train = out / "train"
    (train / "00002.parquet").unlink()  # killed between the last tar and its sidecar
    (train / ".00003.tar.abc123.tmp").write_bytes(b"half a shard from a killed run")
    (train / "00001.tar").unlink()  # a sidecar left without its tar
    again = write(corpus, out)
    # the samples of both incomplete shards go into new shards after the last complete one
    assert [p[len(str(out)) + 1 :] for p in again["written"]] == ["train/00001.tar", "train/00002.tar"]
    assert again["mode"] == "appended" and again["appended"] == 5 and again["samples"] == 10
    after = files(out)
    assert after["train/00000.tar"] == before["train/00000.tar"] and after["val/00000.tar"] == before["val/00000.tar"]
    assert {name: data for name, (data, _) in after.items()} == {name: data for name, (data, _) in before.items()}
    assert not list(train.glob(".*.tmp"))


def test_stale_and_orphaned_samples_stay_in_their_shards(corpus, tmp_path, caplog):
    out = tmp_path / "shards"
    write(corpus.add(range(12)), out)
    before = backdated(out)
    corpus.rows["phrases"][f"{3:016x}"]["caption"] = "a man in a hat"  # an edited caption
    corpus.rows["matches"][f"{4:016x}"] |= {"subjects": "[]", "n_subjects": 0}  # now fails: no_person
    corpus.remove([5, 6])
    with caplog.at_level(logging.WARNING, logger="fc_pipeline.data.shards"):
        stats = write(corpus, out)
    assert "2 sample(s)" in caplog.text and "rebuild=True" in caplog.text
    assert (stats["mode"], stats["stale"], stats["orphaned"], stats["appended"]) == ("unchanged", 2, 2, 0)
    assert files(out) == before and stats["samples"] == 12 and stats["images"] == 10
    assert stats["failures"] == {}  # 0x04 is a sample of a shard, so not in the ledger
    samples = {s["id"]: s for split in ("train", "val") for s in read_samples(out, split)}
    assert samples[f"{3:016x}"]["meta"]["caption"] == "a man"
    rebuilt = write(corpus, out, rebuild=True)
    assert (rebuilt["stale"], rebuilt["orphaned"], rebuilt["samples"], rebuilt["failures"]) == (
        0,
        0,
        9,
        {"no_person": 1},
    )


def test_an_image_that_failed_in_a_shard_is_not_tried_again(corpus, tmp_path):
    out = tmp_path / "shards"
    corpus.add(range(6))
    image = corpus.root / "2.png"
    saved = image.read_bytes()
    image.write_bytes(b"")
    first = write(corpus, out)
    assert first["samples"] == 5 and first["failures"] == {"empty_file": 1}
    image.write_bytes(saved)
    again = write(corpus, out)
    assert again["mode"] == "unchanged" and again["failures"] == {"empty_file": 1}
    ledger = read_parquet(out / "failures.parquet").to_pylist()
    assert ledger == [{"id": f"{2:016x}", "path": str(image), "step": "shard", "reason": "empty_file"}]
    assert write(corpus, out, rebuild=True)["samples"] == 6
