"""Settings declared once (fc_pipeline.settings): every library field is a Dagster config field and a
CLI flag, bad values fail up front everywhere, and library logs reach the Dagster event log."""

import dataclasses
import logging
from pathlib import Path

import dagster as dg
import pyarrow as pa
import pytest
import yaml

import assets
from assets import dataset
from assets.evaluation import EvaluationReportConfig
from assets.resources import CaptionerResource, DatasetStore, SegmenterResource, default_resources
from assets.training import LIBRARY_ONLY, TrainingConfig
from fc_pipeline.cli.main import build_parser, main
from fc_pipeline.data.build import build_dataset
from fc_pipeline.data.settings import DatasetSettings
from fc_pipeline.evaluation.runner import EvaluationConfig
from fc_pipeline.settings import SettingError
from fc_pipeline.storage import write_parquet
from fc_pipeline.training.train import TINY_PRESET, TrainConfig

REPO = Path(__file__).resolve().parents[1]
# the Dagster field of each DatasetSettings field: (config class or resource, its name there)
DATASET_FIELDS = {
    "caption_batch_size": (dataset.CaptionsConfig, "batch_size"),
    "max_new_tokens": (CaptionerResource, "max_new_tokens"),
    "segment_batch_size": (dataset.SegmentsConfig, "batch_size"),
    "segment_threshold": (SegmenterResource, "threshold"),
    "mask_threshold": (SegmenterResource, "mask_threshold"),
    "overlap_mask_area_threshold": (SegmenterResource, "overlap_mask_area_threshold"),
    "phrase_batch_size": (dataset.PhrasesConfig, "batch_size"),
    "match_threshold": (dataset.MatchesConfig, "threshold"),
    "max_subjects": (dataset.MatchesConfig, "max_subjects"),
    "samples_per_shard": (dataset.ShardsConfig, "samples_per_shard"),
    "val_fraction": (dataset.ShardsConfig, "val_fraction"),
    "val_max": (dataset.ShardsConfig, "val_max"),
    "rebuild": (dataset.ShardsConfig, "rebuild"),
}


def names(settings) -> set[str]:
    return {field.name for field in dataclasses.fields(settings)}


def cli_flags(*argv: str) -> dict[str, str]:
    """``{field: flag}`` of the settings flags of one sub-command."""
    return build_parser().parse_args(list(argv)).flags


def test_every_training_field_is_a_dagster_field_and_a_flag():
    config = TrainingConfig()
    for field in dataclasses.fields(TrainConfig):
        if field.name in LIBRARY_ONLY:
            continue
        assert field.name in TrainingConfig.model_fields, f"TrainingConfig lacks {field.name}"
        described = TrainingConfig.model_fields[field.name].description
        assert described.startswith(field.metadata["help"]), field.name
        expected = TINY_PRESET.get(field.name, field.default)
        assert getattr(config, field.name) == expected, field.name
    assert TrainingConfig.model_fields["max_steps"].description == "Optimiser steps. (paper: 150000)"
    assert set(cli_flags("train")) == names(TrainConfig) - {"shards", "output_dir"}  # those are --shards, --out


def test_every_evaluation_field_is_a_dagster_field_and_a_flag():
    assert names(EvaluationConfig) <= set(EvaluationReportConfig.model_fields)
    assert set(cli_flags("evaluate", "--checkpoint", "c", "--out", "o")) == names(EvaluationConfig)
    defaults = EvaluationReportConfig()
    assert defaults.guidance_scale == EvaluationConfig.guidance_scale and defaults.matching == "greedy"


def test_every_dataset_field_is_a_dagster_field_and_a_flag():
    assert set(DATASET_FIELDS) == names(DatasetSettings), "map the new DatasetSettings field to its Dagster field"
    for field in dataclasses.fields(DatasetSettings):
        owner, name = DATASET_FIELDS[field.name]
        assert owner.model_fields[name].default == field.default, field.name
    assert set(cli_flags("build-dataset", "corpus", "--out", "o")) == names(DatasetSettings)


def test_legacy_flags_still_parse():
    args = build_parser().parse_args(
        ["train", "--shards", "s", "--out", "o", "--batch-size", "2", "--lr", "1e-4", "--no-resume", "--max-steps", "3"]
    )
    assert (args.train_batch_size, args.learning_rate, args.resume, args.max_steps) == (2, 1e-4, False, 3)
    args = build_parser().parse_args(
        "evaluate --checkpoint c --out o --steps 2 --alpha 0.5 0.6 --prompt-set multi --no-baseline".split()
    )
    assert (args.num_inference_steps, args.alphas, args.prompt_sets) == (2, [0.5, 0.6], ["multi"])
    assert args.text_only_baseline is False


def test_every_generation_setting_is_a_flag_and_a_jobs_field(tmp_path, capsys):
    from fc_pipeline.cli.generation import GenerationJob

    assert set(cli_flags("generate", "--checkpoint", "c", "--prompt", "p")) == names(GenerationJob) - {
        "prompt",
        "out",
        "subjects",
    }
    out = tmp_path / "o.png"
    argv = ["generate", "--checkpoint", str(tmp_path / "none"), "--prompt", "a man", "--out", str(out)]
    assert main([*argv, "--alpha", "1.2"]) == 2  # refused before the checkpoint is even looked at
    assert "alpha must be <= 1, got 1.2" in capsys.readouterr().err and not out.exists()
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"prompt": "a man", "out": "x.png", "steps": 0}\n')
    assert main(["generate", "--checkpoint", str(tmp_path / "none"), "--jobs", str(jobs)]) == 2
    assert f"{jobs}:1: steps must be >= 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["build-dataset", "{corpus}", "--out", "{out}", "--samples-per-shard", "0"],
            "--samples-per-shard must be >= 1",
        ),
        (["build-dataset", "{corpus}", "--out", "{out}", "--val-fraction", "1.5"], "--val-fraction must be <= 1"),
        (["train", "--shards", "{corpus}", "--out", "{out}", "--max-steps", "-3"], "--max-steps must be >= 1, got -3"),
        (["train", "--shards", "{corpus}", "--out", "{out}", "--lr", "0"], "--lr must be > 0"),
        (["evaluate", "--checkpoint", "{corpus}", "--out", "{out}", "--alpha", "1.2"], "--alpha must be <= 1"),
        (["evaluate", "--checkpoint", "{corpus}", "--out", "{out}", "--steps", "0"], "--steps must be >= 1"),
    ],
)
def test_cli_rejects_a_bad_value_before_any_work(tmp_path, capsys, argv, message):
    corpus, out = tmp_path / "corpus", tmp_path / "out"
    corpus.mkdir()
    with pytest.raises(SystemExit) as exit_info:
        main([arg.format(corpus=corpus, out=out) for arg in argv])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"fc-pipeline {argv[0]}: error: {message}")
    assert not out.exists()  # nothing was computed or written


def test_library_and_dagster_reject_bad_values_up_front(tmp_path):
    with pytest.raises(SettingError, match="alphas must be <= 1, got 1.5"):
        EvaluationConfig(alphas=(0.5, 1.5))
    with pytest.raises(SettingError, match="mixed_precision must be one of auto, no, fp16, bf16"):
        TrainConfig("s", "o", mixed_precision="fp8")
    with pytest.raises(SettingError, match="samples_per_shard must be >= 1"):
        build_dataset(tmp_path, tmp_path / "out", samples_per_shard=0)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="max_steps must be >= 1"):
        TrainingConfig(max_steps=0)
    with pytest.raises(ValueError, match="val_fraction must be <= 1"):
        dataset.ShardsConfig(val_fraction=2.0)
    # a closed set of choices is an enum of the Dagster schema: refused when the run is launched
    job = dg.define_asset_job("train", selection=["fastcomposer_checkpoint"]).resolve(
        asset_graph=assets.defs.resolve_asset_graph()
    )
    with pytest.raises(dg.DagsterInvalidConfigError, match="not in enum type"):
        dg.validate_run_config(job, {"ops": {"fastcomposer_checkpoint": {"config": {"profile": "huge"}}}})


def test_a_bad_step_config_fails_the_run_before_its_first_step_computes(tmp_path):
    run_config = {
        "ops": {
            "corpus_images": {"config": {"demo_images": 4}},
            "training_shards": {"config": {"samples_per_shard": 0}},
        }
    }
    resources = {**default_resources(), "store": DatasetStore(data_root=str(tmp_path))}
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("corpus", ["demo"])
        result = dg.materialize(
            [dataset.corpus_images, dataset.training_shards],
            instance=instance,
            resources=resources,
            partition_key="demo",
            run_config=run_config,
            raise_on_error=False,
        )
    assert not result.success
    (failure,) = result.get_step_failure_events()
    assert failure.step_key == "corpus_images.corpus_images_chunks"  # its first step
    message = failure.event_specific_data.error.message
    assert "invalid config of step training_shards: samples_per_shard must be >= 1, got 0" in message
    assert not (tmp_path / "corpora").exists() and not (tmp_path / "datasets").exists()  # nothing computed


def test_library_warnings_reach_the_run_event_log(tmp_path):
    python_logs = yaml.safe_load((REPO / "dagster.yaml").read_text())["python_logs"]
    assert python_logs == yaml.safe_load((REPO / "deploy/k8s/dagster.yaml").read_text())["python_logs"]
    helm = yaml.safe_load((REPO / "deploy/k8s/values.yaml").read_text())["pythonLogs"]
    assert (helm["managedPythonLoggers"], helm["pythonLogLevel"]) == (
        python_logs["managed_python_loggers"],
        python_logs["python_log_level"],
    )
    store = DatasetStore(data_root=str(tmp_path))
    captions = {"id": ["a"], "caption": ["two women on a beach"], "caption_source": ["provided"]}
    write_parquet(pa.table({**captions, "error": pa.array([None], pa.string())}), store.path("demo", dataset.CAPTIONS))

    def phrases_run(instance) -> list:
        store.path("demo", dataset.PHRASES).write_bytes(b"not a parquet file")  # the step warns and recomputes
        result = dg.materialize(
            [dataset.noun_phrases], instance=instance, resources={"store": store}, partition_key="demo"
        )
        assert result.success
        return [
            entry
            for entry in instance.all_logs(result.run_id)
            if entry.user_message and "is unreadable" in entry.user_message
        ]

    with dg.instance_for_test(overrides={"python_logs": python_logs}) as instance:
        instance.add_dynamic_partitions("corpus", ["demo"])
        (warning,) = phrases_run(instance)
    assert warning.level == logging.WARNING and "recomputing every row" in warning.user_message
    assert warning.step_key == "noun_phrases.noun_phrases_chunk[0_of_1]"
    with dg.instance_for_test() as instance:  # without python_logs the library's warning stays out of the run
        instance.add_dynamic_partitions("corpus", ["demo"])
        assert phrases_run(instance) == []


@pytest.mark.filterwarnings("ignore:Specifying a partitions_def on an AssetCheckSpec")
def test_gate_reads_check_results_through_public_apis():
    """The training gate: checks evaluated on a corpus's latest shards count; a failed one blocks,
    and re-materialised shards without check runs are 'not run on the latest shards'."""
    from assets.checks import failed_shard_checks

    parts = dataset.corpus_partitions

    @dg.asset(name="training_shards", partitions_def=parts)
    def shards() -> dg.MaterializeResult:
        return dg.MaterializeResult()

    def check(name: str, passed: bool):
        @dg.asset_check(asset=shards, name=name, partitions_def=parts, blocking=True)
        def _check() -> dg.AssetCheckResult:
            return dg.AssetCheckResult(passed=passed)

        return _check

    names = ("shards_readable", "samples_with_subjects", "failure_rate")
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("corpus", ["demo", "other"])
        for corpus in ("demo", "other"):
            passing = [check(name, True) for name in names]
            assert dg.materialize([shards, *passing], instance=instance, partition_key=corpus).success
        assert failed_shard_checks(instance, ["demo", "other"]) == {}
        checks = [check(name, name != "failure_rate") for name in names]
        failed = dg.materialize([shards, *checks], instance=instance, partition_key="demo", raise_on_error=False)
        assert not failed.success
        assert dg.materialize([shards], instance=instance, partition_key="other").success  # new shards, no checks
        assert failed_shard_checks(instance, ["demo", "other"]) == {
            "demo": {"failure_rate": "failed"},
            "other": dict.fromkeys(names, "not run on the latest shards"),
        }
