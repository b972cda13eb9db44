"""One writer per dataset folder, step table and training run: a second one is refused with a line
naming the first; a killed holder's lock frees itself; contended builds end in a correct dataset."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

from fc_pipeline.locks import WriterLockHeld, writer_lock

from .conftest import sample_ids, snapshot, start_build, subprocess_env, temp_files

pytestmark = pytest.mark.reliability

HOLD_SCRIPT = """
import sys, time
from pathlib import Path
from fc_pipeline.locks import writer_lock
with writer_lock(sys.argv[1], folder=sys.argv[2] == "folder"):
    for temp in sys.argv[3:]:
        Path(temp).write_bytes(b"a write in progress")
    print("locked", flush=True)
    time.sleep(600)
"""


@pytest.fixture
def hold():
    """``hold(target, folder=True, temps=())``: a live process holding the lock (killed -9 at the end)."""
    holders = []

    def start(target, folder=True, temps=()):
        command = [sys.executable, "-c", HOLD_SCRIPT, str(target), "folder" if folder else "file", *map(str, temps)]
        process = subprocess.Popen(command, env=subprocess_env(), stdout=subprocess.PIPE, text=True)
        assert process.stdout.readline().strip() == "locked"
        holders.append(process)
        return process

    yield start
    for process in holders:
        process.kill()
        process.wait()


def test_a_second_writer_is_refused_naming_the_holder_and_a_killed_holder_frees_the_lock(tmp_path, hold):
    holder = hold(tmp_path / "dataset")
    with pytest.raises(WriterLockHeld) as refused:
        with writer_lock(tmp_path / "dataset", what="dataset build"):
            pass
    message = str(refused.value)
    assert f"{tmp_path / 'dataset'} is being written by another dataset build: pid {holder.pid}" in message
    assert f"on host {socket.gethostname()} since 20" in message and "\n" not in message
    holder.send_signal(signal.SIGKILL)  # kill -9: no clean-up ran, the lock file stays
    holder.wait()
    with writer_lock(tmp_path / "dataset") as lock:
        assert json.loads(lock.read_text())["pid"] != holder.pid


def test_every_entry_point_takes_the_lock(tmp_path, hold, corpus, reference, rebuild):
    from fc_pipeline.cli import main
    from fc_pipeline.data.incremental import update_table
    from fc_pipeline.data.shards import write_shards
    from fc_pipeline.storage import read_parquet
    from fc_pipeline.training.train import TrainConfig, train

    out = tmp_path / "out"
    hold(out)
    with pytest.raises(WriterLockHeld, match=f"{out} is being written by another"):
        rebuild(out)
    assert main(["build-dataset", str(corpus), "--out", str(out)]) == 1

    # the shard writer (what the Dagster asset calls): the holder's temp file is left alone
    shards = tmp_path / "shards"
    in_progress = shards / "train" / ".00000.tar.x1.tmp"
    in_progress.parent.mkdir(parents=True)
    hold(shards, temps=[in_progress])
    tables = [read_parquet(reference[0] / f"{name}.parquet") for name in ("images", "phrases", "segments", "matches")]
    with pytest.raises(WriterLockHeld, match="is being written by another shard writer"):
        write_shards(*tables, shards)
    assert in_progress.exists()

    # one step table (the Dagster dataset steps)
    table = tmp_path / "captions.parquet"
    hold(table, folder=False)
    with pytest.raises(WriterLockHeld, match=f"{table} is being written by another writer of this step"):
        update_table(table, [tables[0]], {}, lambda rows: rows)

    # a training run folder, refused before anything is loaded
    run = tmp_path / "run"
    hold(run)
    with pytest.raises(WriterLockHeld, match=f"{run} is being written by another training run"):
        train(TrainConfig.tiny(str(reference[0] / "shards"), str(run)))
    with pytest.raises(SystemExit, match=f"^train: {run} is being written by another training run"):
        main(["train", "--shards", str(reference[0] / "shards"), "--out", str(run)])


@pytest.mark.parametrize("sizes", [(1, 20), (2, 2)], ids=["different-shard-sizes", "equal-settings"])
def test_two_builds_of_one_folder_end_in_one_refusal_or_a_correct_dataset(tmp_path, corpus, reference, sizes):
    out = tmp_path / "out"
    builds = [start_build(corpus, out, size, delay=0.3) for size in sizes]
    results = [(build.wait(timeout=300), *build.communicate()) for build in builds]
    codes = sorted(code for code, _, _ in results)
    assert codes in ([0, 0], [0, 1]), results
    for code, _, err in results:
        if code:
            assert err.strip().splitlines()[-1].startswith(f"build-dataset: {out} is being written by another"), err
    ids = sample_ids(out)
    assert len(ids) == len(set(ids)) == sum(s["samples"] for s in reference[1]["stats"].values())
    got = snapshot(out)
    assert got["ledger"] == reference[1]["ledger"] and got["tables"] == reference[1]["tables"]
    assert not temp_files(out)


DAGSTER_SCRIPT = """
import json, sys
import dagster as dg
import assets
from assets import dataset
from assets.resources import DatasetStore
data_root, source = sys.argv[1:3]
steps = [dataset.corpus_images, dataset.captions, dataset.panoptic_segments, dataset.noun_phrases,
         dataset.subject_matches, dataset.training_shards]
with dg.instance_for_test() as instance:
    instance.add_dynamic_partitions("corpus", ["demo"])
    result = dg.materialize(
        steps, resources={**assets.defs.resources, "store": DatasetStore(data_root=data_root)}, instance=instance,
        partition_key="demo", raise_on_error=False,
        run_config={"ops": {"corpus_images": {"config": {"source": source}}}},
    )
    errors = []
    for event in result.all_events:
        error = event.step_failure_data.error if event.is_step_failure else None
        while error is not None and error.cause is not None:  # the library's own error, under Dagster's
            error = error.cause
        if error is not None:
            errors.append(error.message.strip())
    print(json.dumps({"success": result.success, "errors": errors}))
"""


def test_two_dagster_materialisations_of_one_partition(tmp_path, corpus, reference):
    from assets.checks import evaluate_shards_readable

    command = [sys.executable, "-c", textwrap.dedent(DAGSTER_SCRIPT), str(tmp_path), str(corpus)]
    runs = [subprocess.Popen(command, env=subprocess_env(), stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outcomes = [json.loads(run.communicate(timeout=300)[0].strip().splitlines()[-1]) for run in runs]
    for outcome in outcomes:
        assert all("is being written by another" in error for error in outcome["errors"]), outcome
    if not any(outcome["success"] for outcome in outcomes):
        # each run was refused a step the other held (steps of independent branches go on): run again
        again = subprocess.run(command, env=subprocess_env(), stdout=subprocess.PIPE, text=True, timeout=300)
        assert json.loads(again.stdout.strip().splitlines()[-1])["success"]
    out = tmp_path / "datasets" / "demo"
    ids = sample_ids(out)
    assert len(ids) == len(set(ids)) == sum(s["samples"] for s in reference[1]["stats"].values())
    assert sorted(ids) == sorted(sample_ids(reference[0]))
    assert evaluate_shards_readable(out / "shards").passed
    assert not temp_files(out)


def test_shards_readable_fails_on_a_sample_in_two_shards(tmp_path, reference):
    import shutil

    from assets.checks import evaluate_shards_readable

    shards = tmp_path / "shards"
    shutil.copytree(reference[0] / "shards", shards)
    assert evaluate_shards_readable(shards).passed
    train = shards / "train"
    for suffix in (".tar", ".parquet"):  # what two unserialised writers left: one sample twice
        shutil.copy(train / f"00000{suffix}", train / f"00099{suffix}")
    stats = json.loads((train / "_stats.json").read_text())
    stats["samples"] += len(sample_ids(tmp_path)) - sum(s["samples"] for s in reference[1]["stats"].values())
    (train / "_stats.json").write_text(json.dumps(stats))  # the counts agree: only the duplicates are wrong
    result = evaluate_shards_readable(shards)
    assert not result.passed
    problems = result.metadata["problems"].value
    assert problems and all("in more than one shard (train/00000.tar and train/00099.tar)" in p for p in problems)
