"""The code location loads, and the instance/workspace config files are valid for this Dagster."""

from pathlib import Path

import dagster as dg
import pytest
import yaml

import assets
from assets.resources import DatasetStore, default_chunks, default_data_root

REPO_ROOT = Path(__file__).resolve().parents[2]
DATASET = ["corpus_images", "captions", "panoptic_segments", "noun_phrases", "subject_matches", "training_shards"]
BLOCKING = {"caption_non_empty_rate", "shards_readable", "samples_with_subjects", "failure_rate"}


def test_definitions_resolve_every_asset_job_and_check():
    defs = assets.defs
    graph = defs.resolve_asset_graph()
    keys = {key.to_user_string() for key in graph.get_all_asset_keys()}
    assert set(DATASET) <= keys
    assert defs.resolve_job_def("build_dataset").name == "build_dataset"
    assert defs.resolve_implicit_global_asset_job_def() is not None
    for name in DATASET:
        node = graph.get(dg.AssetKey(name))
        assert node.group_name == "dataset"
        assert node.description, f"{name} has no docstring"
    assert graph.get(dg.AssetKey("training_shards")).parent_keys == {
        dg.AssetKey(k) for k in ("corpus_images", "noun_phrases", "panoptic_segments", "subject_matches")
    }
    checks = {key.name: key for key in graph.asset_check_keys}
    assert BLOCKING | {"readable_images"} <= set(checks)
    specs = {spec.name: spec for a in defs.assets if isinstance(a, dg.AssetsDefinition) for spec in a.check_specs}
    specs.update({spec.name: spec for c in defs.asset_checks for spec in c.check_specs})
    assert {name for name in BLOCKING if specs[name].blocking} == BLOCKING


def test_the_chain_is_named_once_for_the_cli():
    from assets.dataset import CHAIN
    from assets.instance import DATASET_ASSETS

    assert [a.key.to_user_string() for a in CHAIN] == list(DATASET_ASSETS) == DATASET


def test_model_steps_share_the_gpu_pool():
    ops = {op.name: op for d in assets.defs.assets for op in d.node_def.iterate_op_defs()}
    gpu = {name for name, op in ops.items() if op.pool == "gpu"}
    # the chunks of the model steps, one GPU each; listing, merging and the CPU steps stay off the pool
    assert gpu == {
        "captions_chunk",
        "panoptic_segments_chunk",
        "subject_matches_chunk",
        "fastcomposer_checkpoint",
        "evaluation_report",
    }
    for name in gpu:  # what the k8s executor reads to put the step on a GPU node
        assert "dagster-k8s/config" in ops[name].tags
    assert {"captions_chunks", "captions_merge", "noun_phrases_chunk", "corpus_images_chunk"} <= set(ops) - gpu


def test_data_root_defaults_to_env_then_repo(monkeypatch, tmp_path):
    monkeypatch.delenv("FC_PIPELINE_DATA", raising=False)
    assert default_data_root() == REPO_ROOT / "data"
    monkeypatch.setenv("FC_PIPELINE_DATA", str(tmp_path))
    store = DatasetStore()
    assert store.source("street") == tmp_path / "corpora" / "street"
    assert store.path("street", "images.parquet") == tmp_path / "datasets" / "street" / "images.parquet"
    (tmp_path / "corpora").mkdir()
    (tmp_path / "corpora" / "street.jsonl").write_text("")
    assert store.source("street") == tmp_path / "corpora" / "street.jsonl"  # a manifest corpus
    assert store.checkpoints_dir == tmp_path / "checkpoints"


def test_dataset_assets_and_checks_are_partitioned_by_corpus():
    defs = assets.defs
    graph = defs.resolve_asset_graph()
    for name in DATASET:
        partitions = graph.get(dg.AssetKey(name)).partitions_def
        assert isinstance(partitions, dg.DynamicPartitionsDefinition) and partitions.name == "corpus", name
    for name in ("fastcomposer_checkpoint", "evaluation_report"):
        assert graph.get(dg.AssetKey(name)).partitions_def is None
    dataset_checks = [
        c for c in defs.asset_checks if {k.asset_key.to_user_string() for k in c.check_keys} <= set(DATASET)
    ]
    assert len(dataset_checks) == 5
    for check in dataset_checks:
        assert check.partitions_def is not None and check.partitions_def.name == "corpus"
    build = defs.resolve_job_def("build_dataset")
    assert build.partitions_def.name == "corpus"
    assert {k.to_user_string() for k in build.asset_layer.executable_asset_keys} == set(DATASET)
    train = defs.resolve_job_def("train")
    assert {k.to_user_string() for k in train.asset_layer.executable_asset_keys} == {
        "fastcomposer_checkpoint",
        "evaluation_report",
    }


def test_sensors_and_schedule_are_on_by_default():
    defs = assets.defs
    sensors = {s.name: s for s in defs.sensors}
    assert set(sensors) == {"corpus_sensor", "train_on_new_samples"}
    assert all(s.default_status == dg.DefaultSensorStatus.RUNNING for s in sensors.values())
    assert sensors["corpus_sensor"].job_name == "build_dataset" and sensors["train_on_new_samples"].job_name == "train"
    (schedule,) = defs.schedules
    assert (schedule.name, schedule.cron_schedule, schedule.job_name) == (
        "nightly_dataset_refresh",
        "0 2 * * *",
        "build_dataset",
    )
    assert schedule.default_status == dg.DefaultScheduleStatus.RUNNING


def test_dagster_yaml_builds_an_instance_with_a_gpu_pool(tmp_path):
    (tmp_path / "dagster.yaml").write_text((REPO_ROOT / "dagster.yaml").read_text())
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        concurrency = instance.get_concurrency_config()
        assert concurrency.pool_config.default_pool_limit == 1
        assert concurrency.run_queue_config.max_concurrent_runs >= 1
        assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
        assert not instance.telemetry_enabled
        assert instance.run_monitoring_enabled
        assert instance.run_retries_enabled and instance.run_retries_max_retries == 1
        assert not instance.run_retries_retry_on_asset_or_op_failure  # step failures are real errors
        assert Path(instance.root_directory) == tmp_path
        assert (tmp_path / "history" / "runs.db").exists()


def test_workspace_loads_the_assets_module():
    workspace = yaml.safe_load((REPO_ROOT / "workspace.yaml").read_text())
    assert workspace["load_from"] == [{"python_module": {"module_name": "assets", "working_directory": "."}}]


def test_chunks_default_to_env_then_one():
    assert default_chunks({}) == 1 and default_chunks({"FC_PIPELINE_CHUNKS": "16"}) == 16
    for bad in ("0", "4097", "two"):
        with pytest.raises(ValueError, match=f"FC_PIPELINE_CHUNKS must be an integer from 1 to 4096, not '{bad}'"):
            default_chunks({"FC_PIPELINE_CHUNKS": bad})


def test_chunk_steps_share_the_cores_on_the_multiprocess_executor(monkeypatch):
    import types

    import torch

    from assets.chunked import share_cores

    def context(executor: str, max_concurrent: int | None = None):
        execution = {"execution": {"config": {"max_concurrent": max_concurrent}}} if max_concurrent else {}
        job = types.SimpleNamespace(executor_def=types.SimpleNamespace(name=executor))
        return types.SimpleNamespace(job_def=job, run_config=execution)

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    before = torch.get_num_threads()
    try:
        for executor, max_concurrent, chunks, threads in [
            ("multiprocess", 2, 4, 4),  # 2 chunks at a time on 8 cores
            ("multiprocess", None, 4, 2),  # 4 at a time
            ("multiprocess", 16, 16, 1),
        ]:
            torch.set_num_threads(before)
            share_cores(context(executor, max_concurrent), chunks)
            assert torch.get_num_threads() == threads, (executor, max_concurrent, chunks)
        torch.set_num_threads(3)
        share_cores(context("in_process"), 4)  # chunks one after another: every core for each
        assert torch.get_num_threads() == 3
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        share_cores(context("multiprocess", 2), 2)  # the user's setting wins
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
