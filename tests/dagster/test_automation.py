"""Corpora as partitions: the sensor, the nightly schedule, the training policy, incremental
re-runs of a growing corpus, and blocking checks gating training."""

import json
import shutil
from pathlib import Path

import dagster as dg
import pytest
from PIL import Image

from assets import automation, checks, dataset
from assets.automation import corpus_sensor, nightly_dataset_refresh, train_on_new_samples
from assets.resources import DatasetStore
from assets.training import fastcomposer_checkpoint
from fc_pipeline.storage import read_parquet

from .conftest import DATASET_ASSETS, DATASET_CHECKS, metadata


def _image(path, color=(200, 120, 40)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 24), color).save(path)


def _tick(store, instance, cursor=None):
    # contexts are closed in order: an unclosed one would leave its instance "current" in Dagster
    with dg.build_sensor_context(instance=instance, cursor=cursor, resources={"store": store}) as context:
        return corpus_sensor(context)


def _skip_message(result) -> str | None:
    """The skip message of a sensor tick that requested nothing (None when it requested runs)."""
    if isinstance(result, dg.SensorResult):
        return None if result.run_requests else result.skip_reason.skip_message
    return result.skip_message if isinstance(result, dg.SkipReason) else None


def _nightly(store, instance):
    with dg.build_schedule_context(instance=instance, resources={"store": store}) as context:
        return nightly_dataset_refresh(context)


def _training_policy(instance):
    with dg.build_sensor_context(instance=instance) as context:
        return train_on_new_samples(context)


def _apply(instance, result: dg.SensorResult):
    """What the daemon does with a sensor result's partition requests."""
    for request in result.dynamic_partitions_requests:
        instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))


def test_sensor_registers_a_new_corpus_and_requests_its_build(tmp_path):
    store = DatasetStore(data_root=str(tmp_path))
    _image(store.corpora_dir / "street" / "a.jpg")
    (store.corpora_dir / "faces.jsonl").write_text(json.dumps({"path": "elsewhere/x.jpg"}) + "\n")
    (store.corpora_dir / "notes.txt").write_text("not a corpus")
    with dg.instance_for_test() as instance:
        result = _tick(store, instance)
        assert isinstance(result, dg.SensorResult)
        (added,) = result.dynamic_partitions_requests
        assert (added.partitions_def_name, sorted(added.partition_keys)) == ("corpus", ["faces", "street"])
        assert sorted(r.partition_key for r in result.run_requests) == ["faces", "street"]
        assert {r.tags["fc_pipeline/trigger"] for r in result.run_requests} == {"new corpus"}
        assert all(r.job_name in (None, "build_dataset") for r in result.run_requests)
        _apply(instance, result)

        # second tick, nothing changed: no request, no new partition
        again = _tick(store, instance, result.cursor)
        assert "no new or changed corpus" in _skip_message(again)

        # a new file in a known corpus: one run for that corpus, no partition added
        _image(store.corpora_dir / "street" / "b.jpg", (10, 20, 30))
        grown = _tick(store, instance, result.cursor)
        assert [r.partition_key for r in grown.run_requests] == ["street"]
        assert grown.run_requests[0].tags["fc_pipeline/trigger"] == "corpus changed"
        assert not grown.dynamic_partitions_requests
        assert grown.run_requests[0].run_key != result.run_requests[1].run_key
        assert instance.get_dynamic_partitions("corpus") == ["faces", "street"]


def test_sensor_restart_with_its_cursor_redoes_nothing(tmp_path):
    store = DatasetStore(data_root=str(tmp_path))
    _image(store.corpora_dir / "street" / "a.jpg")
    with dg.instance_for_test() as instance:
        first = _tick(store, instance)
        _apply(instance, first)
        # the daemon persists the cursor; a restarted daemon evaluates with it
        assert "no new or changed corpus" in _skip_message(_tick(store, instance, first.cursor))
        # without a cursor a registered corpus is rebuilt once (cheap: the build is incremental)
        assert [r.partition_key for r in _tick(store, instance).run_requests] == ["street"]


def test_a_tick_lists_only_the_folders_that_changed(tmp_path, monkeypatch):
    import os

    from fc_pipeline.data import corpora

    store = DatasetStore(data_root=str(tmp_path))
    for folder in range(20):
        for number in range(50):  # 1000 files in 20 folders
            path = store.corpora_dir / "big" / f"part{folder:02d}" / f"{number}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"x")
    listed = []
    real_scandir = os.scandir

    def scandir(path):
        if isinstance(path, (str, os.PathLike)) and Path(path).is_relative_to(store.corpora_dir / "big"):
            listed.append(Path(path).name)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with dg.instance_for_test() as instance:
        first = _tick(store, instance)
        _apply(instance, first)
        assert len(listed) == 21  # the first tick lists every folder once
        listed.clear()
        idle = _tick(store, instance, first.cursor)
        assert "no new or changed corpus" in _skip_message(idle) and listed == []  # nothing listed, only stats
        (store.corpora_dir / "big" / "part07" / "new.jpg").write_bytes(b"y")
        grown = _tick(store, instance, idle.cursor)
        assert [r.partition_key for r in grown.run_requests] == ["big"] and listed == ["part07"]
        listed.clear()
        (store.corpora_dir / "big" / "part03" / "7.jpg").unlink()
        (store.corpora_dir / "big" / "part21").mkdir()
        (store.corpora_dir / "big" / "part21" / "a.jpg").write_bytes(b"z")
        shrunk = _tick(store, instance, grown.cursor)
        assert [r.partition_key for r in shrunk.run_requests] == ["big"]
        assert sorted(listed) == ["big", "part03", "part21"]
        state = json.loads(shrunk.cursor)["big"]
        assert state["signature"] == corpora.watch_corpus(store.corpora_dir / "big")["signature"]  # same as a full walk


def test_nightly_schedule_requests_only_corpora_whose_files_changed(chain):
    store = chain.store()
    assert isinstance(_nightly(store, chain.instance), dg.SkipReason)  # demo is up to date
    extra = store.source("demo") / "zz_new_upload.jpg"
    _image(extra, (1, 2, 3))
    try:
        (request,) = _nightly(store, chain.instance)
        assert request.partition_key == "demo" and request.run_key.startswith("nightly:demo:")
    finally:
        extra.unlink()


def test_growing_corpus_processes_only_new_images_and_appends_shards(chain):
    """A second partition: build it, add two images, build again."""
    store = chain.store()
    source = store.corpora_dir / "growing"
    shutil.copytree(store.source("demo"), source)
    sampled = sorted(Path(p).name.split(".")[0] for p in _sample_paths(chain.path("shards")))
    held_back = sampled[:2]  # scenes that became samples in the session's build
    assert len(held_back) == 2
    parked = chain.root / "parked"
    parked.mkdir()
    for path in source.iterdir():
        if path.name.split(".")[0] in held_back:
            shutil.move(path, parked / path.name)
    chain.instance.add_dynamic_partitions("corpus", ["growing"])
    first = chain.materialize(DATASET_ASSETS, partition="growing")
    assert first.success
    before = metadata(first, "corpus_images")["images"]
    shards_dir = store.path("growing", "shards")
    tars = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in shards_dir.glob("*/*.tar")}

    for path in parked.iterdir():
        shutil.move(path, source / path.name)
    second = chain.materialize(DATASET_ASSETS + DATASET_CHECKS, partition="growing")
    assert second.success
    corpus = metadata(second, "corpus_images")
    assert corpus["images"] == before + 2 and corpus["new_images"] == 2 and corpus["status"] == "updated"
    for step in ("captions", "panoptic_segments", "noun_phrases", "subject_matches"):
        counts = metadata(second, step)
        assert (counts["computed"], counts["reused"], counts["status"]) == (2, before, "updated"), step
    shards = metadata(second, "training_shards")
    assert shards["mode"] == "appended" and shards["appended"] == 2 and shards["shards_written"] >= 1
    assert shards["rows"] == metadata(first, "training_shards")["rows"] + 2
    for path, (data, mtime) in tars.items():  # completed shards untouched
        assert path.read_bytes() == data and path.stat().st_mtime_ns == mtime
    assert all(e.passed for e in second.get_asset_check_evaluations())
    ids = set(read_parquet(store.path("growing", "matches.parquet")).column("id").to_pylist())
    assert len(ids) == before + 2


def _sample_paths(shards_dir):
    return [
        path
        for sidecar in shards_dir.glob("*/[0-9]*.parquet")
        for path in read_parquet(sidecar).column("path").to_pylist()
    ]


def _partition_checks(instance, corpus):
    return checks.failed_shard_checks(instance, [corpus])


def test_failing_blocking_check_keeps_training_from_the_corpus(chain):
    assert chain.materialize([dataset.training_shards, *checks.SHARD_CHECKS], {}).success
    assert _partition_checks(chain.instance, "demo") == {}  # checks passed on the latest shards
    strict = {"ops": {"training_shards_failure_rate": {"config": {"min_yield": 1.0}}}}
    failed = chain.materialize([dataset.training_shards, checks.failure_rate], strict)
    assert not failed.success
    # failed, and the other two did not run on these (re-materialised) shards
    assert _partition_checks(chain.instance, "demo") == {
        "demo": {
            "failure_rate": "failed",
            "shards_readable": "not run on the latest shards",
            "samples_with_subjects": "not run on the latest shards",
        }
    }

    result = dg.materialize(
        [fastcomposer_checkpoint],
        resources=chain.resources,
        instance=chain.instance,
        run_config={"ops": {"fastcomposer_checkpoint": {"config": {"corpora": ["demo"], "max_steps": 1}}}},
        raise_on_error=False,
    )
    assert not result.success
    (failure,) = result.get_step_failure_events()
    assert "blocking checks have not passed" in failure.event_specific_data.error.message
    assert "demo (shards_readable not run on the latest shards" in failure.event_specific_data.error.message
    assert "failure_rate failed" in failure.event_specific_data.error.message

    # the training sensor waits too, and says why
    skip = _training_policy(chain.instance)
    assert isinstance(skip, dg.SkipReason)

    # the checks pass again on a fresh evaluation: training is unblocked
    assert chain.materialize([dataset.training_shards, *checks.SHARD_CHECKS], {}).success
    assert _partition_checks(chain.instance, "demo") == {}


def test_training_policy_counts_new_samples_against_the_last_checkpoint(chain, monkeypatch):
    train = sum(
        metadata(chain.materialize([dataset.training_shards, *checks.SHARD_CHECKS], {}), "training_shards")[
            "samples_out"
        ].values()
    )
    assert train >= 1
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("corpus", ["demo"])

        def shards(train_samples, passed=True):
            @dg.asset(name="training_shards", partitions_def=dataset.corpus_partitions)
            def stand_in():
                return dg.MaterializeResult(
                    metadata={"samples_out": dg.MetadataValue.json({"train": train_samples, "val": 1})}
                )

            def stand_in_check(name):
                @dg.asset_check(asset=stand_in, name=name, partitions_def=dataset.corpus_partitions)
                def verdict():
                    return dg.AssetCheckResult(passed=passed)

                return verdict

            stand_ins = [stand_in_check(c.check_key.name) for c in checks.SHARD_CHECKS]
            return dg.materialize([stand_in, *stand_ins], instance=instance, partition_key="demo", raise_on_error=False)

        shards(5)
        monkeypatch.setenv(automation.MIN_NEW_SAMPLES_ENV, "10")
        skip = _training_policy(instance)
        assert isinstance(skip, dg.SkipReason) and "5 new training samples" in skip.skip_message
        shards(12)
        request = _training_policy(instance)
        assert isinstance(request, dg.RunRequest) and request.run_key == "train:12"

        @dg.asset(name="fastcomposer_checkpoint")
        def trained():
            return dg.MaterializeResult(metadata={"dataset_samples": 12})

        dg.materialize([trained], instance=instance)
        assert isinstance(_training_policy(instance), dg.SkipReason)
        shards(25, passed=False)
        waiting = _training_policy(instance)
        assert isinstance(waiting, dg.SkipReason) and "blocking checks" in waiting.skip_message


@pytest.mark.parametrize("name", ["with space", ".hidden", "ümlaut"])
def test_corpus_names_that_are_not_partition_keys_are_ignored(tmp_path, name):
    store = DatasetStore(data_root=str(tmp_path))
    (store.corpora_dir / name).mkdir(parents=True, exist_ok=True)
    assert store.corpora() == {}
