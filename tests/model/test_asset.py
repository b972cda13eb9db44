"""The Dagster training asset, materialised in-process on synthetic shards (the training itself
runs in a Pipes subprocess, as in production)."""

import json
from pathlib import Path

import dagster as dg
import pytest

from assets.resources import DatasetStore
from assets.training import TrainingConfig, fastcomposer_checkpoint

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_fastcomposer_checkpoint_materialises_through_pipes(synthetic_shards, tmp_path):
    config = {"shards": str(synthetic_shards), "resolution": 32, "train_batch_size": 2, "max_steps": 2, "checkpoint_every": 2}
    resources = {
        "store": DatasetStore(data_root=str(tmp_path)),
        "pipes_subprocess_client": dg.PipesSubprocessClient(cwd=str(REPO_ROOT), env={"OMP_NUM_THREADS": "1"}),
    }
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            [fastcomposer_checkpoint],
            resources=resources,
            instance=instance,
            run_config={"ops": {"fastcomposer_checkpoint": {"config": config}}},
        )
        assert result.success
        metadata = result.asset_materializations_for_node("fastcomposer_checkpoint")[0].metadata
    assert metadata["steps"].value == 2
    assert {"loss", "l_noise", "l_loc", "loss_curve", "shards_data_version"} <= set(metadata)
    assert metadata["loss_curve"].value.startswith("![")
    checkpoint = Path(metadata["checkpoint"].value)
    assert checkpoint.name == "checkpoint-0000002" and (checkpoint / "model_index.json").exists()
    assert checkpoint.is_relative_to(tmp_path / "demo" / "checkpoints")
    rows = [json.loads(line) for line in (checkpoint.parent / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]


def test_config_defaults_are_the_cpu_demo_and_hyper_parameters_the_papers():
    config = TrainingConfig()
    assert (config.profile, config.max_steps, config.train_batch_size, config.resolution) == ("tiny", 30, 4, 64)
    assert (config.learning_rate, config.weight_decay, config.localization_weight, config.mask_loss_prob) == (1e-5, 0.01, 1e-3, 0.5)
