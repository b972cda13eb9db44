"""End to end through subprocesses: `fc-pipeline demo` into a real Dagster instance, then the
README's `dagster asset materialize -m assets --select '*'` on a fresh DAGSTER_HOME."""

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from .test_definitions import DATASET

REPO_ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """`fc-pipeline demo` of the dataset chain on the default 24-image demo corpus."""
    tmp = tmp_path_factory.mktemp("demo")
    data, home = tmp / "data", tmp / "home"
    command = [str(BIN / "fc-pipeline"), "demo", "--data-root", str(data), "--dagster-home", str(home), "--select", *DATASET]
    done = subprocess.run(command, cwd=tmp, capture_output=True, text=True, timeout=300)
    return data, home, done


def test_demo_prints_the_shards_and_a_summary(demo):
    data, home, done = demo
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"shards: {data / 'demo' / 'shards'}" in done.stdout
    assert "images in: 24" in done.stdout
    assert "failures by reason:" in done.stdout and '"truncated": 1' in done.stdout
    assert (data / "demo" / "shards" / "train" / "00000.tar").is_file()


def test_demo_run_is_recorded_in_the_instance(demo, monkeypatch):
    data, home, done = demo
    assert (home / "dagster.yaml").read_text() == (REPO_ROOT / "dagster.yaml").read_text()
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    with dg.DagsterInstance.from_config(str(home)) as instance:
        (run,) = instance.get_runs()
        assert run.status == dg.DagsterRunStatus.SUCCESS
        event = instance.get_latest_materialization_event(dg.AssetKey("training_shards"))
        assert event.asset_materialization.metadata["images_in"].value == 24


@pytest.mark.slow
def test_readme_materialize_command_on_a_fresh_dagster_home(demo, tmp_path):
    """Every asset of the code location (training and evaluation included) with their defaults;
    the dataset steps find the demo's outputs and report ``cached``."""
    data, _, _ = demo
    home = tmp_path / "dagster_home"  # as the README says: a fresh folder with the repo's dagster.yaml
    home.mkdir()
    (home / "dagster.yaml").write_text((REPO_ROOT / "dagster.yaml").read_text())
    env = {**os.environ, "DAGSTER_HOME": str(home), "FC_PIPELINE_DATA": str(data)}
    command = [str(BIN / "dagster"), "asset", "materialize", "-m", "assets", "--select", "*"]
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=540)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    with dg.DagsterInstance.from_config(str(home)) as instance:
        (run,) = instance.get_runs()
        assert run.status == dg.DagsterRunStatus.SUCCESS
        shards = instance.get_latest_materialization_event(dg.AssetKey("training_shards")).asset_materialization
        assert shards.metadata["status"].value == "cached"
        materialized = {key.to_user_string() for key in instance.get_asset_keys()}
    assert set(DATASET) <= materialized
