import dataclasses
import json
import os
import shutil
import subprocess
import sys

import dagster as dg
import pytest

from assets.partitions import corpus_partitions
from assets.resources import DatasetStore
from assets.training import ASSET_ONLY, TrainingConfig, fastcomposer_checkpoint
from fc_pipeline.training.train import TrainConfig

# a handful of steps at 32 px: the run exercises the whole path, not the model's quality
QUICK = dict(resolution=32, train_batch_size=2, max_steps=2, checkpoint_every=2)


def test_asset_config_covers_the_training_options():
    library_only = {"shards", "output_dir", "progress"}
    assert (
        set(TrainingConfig.model_fields) - set(ASSET_ONLY)
        == {f.name for f in dataclasses.fields(TrainConfig)} - library_only
    )
    # no config: the CPU demo preset of the library
    preset = TrainConfig.tiny("s", "o")
    defaults = TrainingConfig()
    for name in (
        "profile",
        "resolution",
        "train_batch_size",
        "max_steps",
        "checkpoint_every",
        "learning_rate",
        "localization_weight",
    ):
        assert getattr(defaults, name) == getattr(preset, name), name


def test_out_of_memory_retries_halve_the_batch_and_keep_the_run(tmp_path):
    from assets.training import train_config

    config = TrainingConfig(train_batch_size=8, gradient_accumulation_steps=1)
    runs = [train_config(config, ["s"], tmp_path, {"demo": "v1"}, retry) for retry in range(4)]
    assert [(r.train_batch_size, r.gradient_accumulation_steps) for r in runs] == [(8, 1), (4, 2), (2, 4), (1, 8)]
    assert len({r.output_dir for r in runs}) == 1  # same effective batch: the retry resumes the same run
    other_data = train_config(config, ["s"], tmp_path, {"demo": "v2"})
    assert other_data.output_dir != runs[0].output_dir  # new shards: a new run
    assert train_config(TrainingConfig(train_batch_size=1), ["s"], tmp_path, {}, 3).train_batch_size == 1


@pytest.mark.slow
def test_asset_materialises_a_loadable_checkpoint_through_pipes(synthetic_shards, tmp_path):
    from fc_pipeline.pipeline import FastComposerPipeline

    store = DatasetStore(data_root=str(tmp_path / "data"))
    shutil.copytree(synthetic_shards, store.path("demo", "shards"))

    @dg.asset(name="training_shards", partitions_def=corpus_partitions)
    def stand_in_shards() -> dg.MaterializeResult:
        return dg.MaterializeResult(data_version=dg.DataVersion("shards-v1"))

    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("corpus", ["demo"])
        assert dg.materialize([stand_in_shards], instance=instance, partition_key="demo").success
        # the checks' gate is tested in tests/dagster/test_automation.py; these shards have no check runs
        result = dg.materialize(
            [fastcomposer_checkpoint],
            instance=instance,
            resources={"store": store, "pipes_subprocess_client": dg.PipesSubprocessClient()},
            run_config={"ops": {"fastcomposer_checkpoint": {"config": {**QUICK, "require_passing_checks": False}}}},
        )
        assert result.success
        event = instance.get_latest_materialization_event(fastcomposer_checkpoint.key)
    metadata = {key: value.value for key, value in event.asset_materialization.metadata.items()}
    assert metadata["steps"] == 2
    assert all(isinstance(metadata[k], float) for k in ("loss", "l_noise", "l_loc"))
    assert metadata["shards_data_versions"] == {"demo": "shards-v1"} and metadata["corpora"] == ["demo"]
    assert metadata["dataset_samples"] == metadata["train_samples"]["demo"] == 0  # synthetic shards carry no sidecars
    assert metadata["loss_curve"].startswith("![preview](data:image/png;base64,")
    run_dir = store.checkpoints_dir
    checkpoint = metadata["checkpoint"]  # what the evaluation asset reads
    assert checkpoint.startswith(str(run_dir)) and checkpoint.endswith("checkpoint-0000002")
    assert os.path.exists(metadata["loss_curve_path"])
    saved = json.loads(open(metadata["train_config"]).read())
    assert saved["max_steps"] == 2 and saved["resolution"] == 32 and saved["profile"] == "tiny"
    pipeline = FastComposerPipeline.from_pretrained(checkpoint)
    assert pipeline.unet.config.sample_size > 0 and pipeline.fuser is not None


@pytest.mark.slow
def test_cli_train_writes_a_checkpoint(synthetic_shards, tmp_path):
    out = tmp_path / "run"
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(dataclasses.asdict(TrainConfig.tiny("elsewhere", "elsewhere", progress=False, **QUICK))))
    command = [
        sys.executable,
        "-m",
        "fc_pipeline.cli",
        "train",
        "--config",
        str(cfg),
        "--shards",
        str(synthetic_shards),
        "--out",
        str(out),
        "--max-steps",
        "1",
        "--batch-size",
        "1",
        "--localization-weight",
        "0.01",
    ]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"checkpoint: {out / 'checkpoint-0000001'}" in done.stdout
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["steps"] == 1
    config = json.loads((out / "checkpoint-0000001" / "training_state" / "trainer_state.json").read_text())["config"]
    assert config["localization_weight"] == 0.01 and config["train_batch_size"] == 1 and config["resolution"] == 32

    missing = subprocess.run(
        [sys.executable, "-m", "fc_pipeline.cli", "train", "--out", str(out)], capture_output=True, text=True
    )
    assert missing.returncode != 0 and "--shards" in missing.stderr
