"""kill -9 at seeded moments of a build and of a training run: the next run resumes and ends where
an uninterrupted one does, byte for byte (shards) or loss for loss (training); the resumed
checkpoint refuses a pickled weight file slipped into it."""

from __future__ import annotations

import dataclasses
import json
import pickle
import random
import subprocess
import sys

import pytest

from fc_pipeline.training.train import TrainConfig, _truncate_metrics, list_checkpoints, train

from .conftest import kill_when, snapshot, start_build, subprocess_env, temp_files

pytestmark = pytest.mark.reliability

KILL_SEED = 0
KILL_POINTS = 3


def _milestones(reference_out):
    """The files a build writes, in the order it writes them (the last one excluded: a kill after it kills nothing)."""
    tables = [f"{name}.parquet" for name in ("images", "captions", "segments", "phrases", "matches")]
    shards = sorted(str(p.relative_to(reference_out)) for p in (reference_out / "shards").glob("*/[0-9]*.tar"))
    return (tables + shards)[:-1]


@pytest.mark.parametrize("point", range(KILL_POINTS))
def test_a_build_killed_at_a_random_moment_resumes_to_the_uninterrupted_result(
    tmp_path, corpus, reference, rebuild, point
):
    reference_out, expected = reference
    milestone = random.Random(KILL_SEED).sample(_milestones(reference_out), KILL_POINTS)[point]
    out = tmp_path / "out"
    build = start_build(corpus, out, delay=0.2)
    assert kill_when(build, lambda: (out / milestone).exists()), build.communicate()
    # what a kill in the middle of a write leaves (whether or not this kill landed in one)
    (out / ".captions.parquet.k9.tmp").write_bytes(b"half a table")
    (out / "segments").mkdir(exist_ok=True)
    (out / "segments" / ".0123.png.k9.tmp").write_bytes(b"half a map")
    (out / "shards" / "train").mkdir(parents=True, exist_ok=True)
    (out / "shards" / "train" / ".00009.tar.k9.tmp").write_bytes(b"half a shard")
    rebuild(out)
    assert snapshot(out) == expected
    assert not temp_files(out)


def _train_config(shards, out, **overrides):
    options = dict(resolution=32, train_batch_size=2, max_steps=4, checkpoint_every=2, progress=False)
    return TrainConfig.tiny(str(shards), str(out), **{**options, **overrides})


def test_training_killed_after_a_checkpoint_resumes_to_the_uninterrupted_losses(tmp_path, reference, one_thread):
    shards = reference[0] / "shards"
    config = _train_config(shards, tmp_path / "killed")
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(dataclasses.asdict(config)))
    command = [sys.executable, "-m", "fc_pipeline.training.train", "--config", str(config_path)]
    run = subprocess.Popen(command, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    # killed in step 3 or 4: after the step-2 checkpoint, before the run's end
    killed = kill_when(
        run, lambda: metrics.exists() and metrics.read_text().count("\n") >= 2 and list_checkpoints(tmp_path / "killed")
    )
    assert killed, run.communicate()
    with open(metrics, "a") as log:  # and the disk filled up in the middle of a line
        log.write('{"step": 9, "loss": 0.1')
    resumed = train(config)
    assert resumed.resumed_from == 2 and resumed.steps == 4
    assert not temp_files(tmp_path / "killed")
    full = train(_train_config(shards, tmp_path / "full"))
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for a, b in zip(full.history, rows):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["l_loc"] == pytest.approx(a["l_loc"], rel=1e-4, abs=1e-8)

    # a pickled weight file slipped into the resumed checkpoint is refused before it is unpickled
    from fc_pipeline.checkpoints import UnsafeCheckpointError
    from fc_pipeline.pipeline import FastComposerPipeline

    marker = tmp_path / "code-ran"
    (resumed.checkpoint / "unet" / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(_WritesAFile(marker)))
    with pytest.raises(UnsafeCheckpointError, match="pickled weights are refused"):
        FastComposerPipeline.from_pretrained(resumed.checkpoint)
    assert not marker.exists()


class _WritesAFile:
    """Unpickling it creates ``path``: proof that a pickle was (not) loaded."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_a_torn_last_log_line_is_dropped_and_a_bad_earlier_one_is_named(tmp_path, caplog):
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.9}\n{"step": 3, "lo')
    assert [r["step"] for r in _truncate_metrics(log, 2)] == [1, 2]
    assert "metrics.jsonl:3: dropped a torn last line" in caplog.text
    assert log.read_text() == '{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.9}\n'
    log.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo\n{"step": 3, "loss": 0.8}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a JSON line \(Unterminated string"):
        _truncate_metrics(log, 3)
