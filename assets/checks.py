"""Asset checks of the dataset chain; the blocking ones guard everything downstream (training).

Each check is an ``evaluate_*`` function on the data (usable and testable without a run) plus a
thin ``@asset_check`` that points it at the corpus's files. Thresholds are check config.
"""

import warnings
from pathlib import Path

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from fc_pipeline.data.shards import CAPTION_REASONS
from fc_pipeline.storage import read_parquet

from .dataset import CAPTIONS, IMAGES, SHARDS, captions, corpus_images, training_shards
from .metadata import failure_counts
from .partitions import corpus_partitions
from .resources import DatasetStore

# Ledger reasons that mean "nothing to learn from here" rather than "something broke": an image
# without a person, or a caption without a noun. Every other reason counts as an error.
FILTER_REASONS = ("empty_caption", "no_segments", "no_phrases", "no_match", "no_person")


def _rate(numerator: int, denominator: int) -> float:
    return numerator / denominator if denominator else 0.0


def evaluate_readable_rate(corpus: pa.Table, min_rate: float) -> dg.AssetCheckResult:
    """Share of corpus files that decode as images is at least ``min_rate``."""
    readable = corpus.column("error").null_count
    rate = _rate(readable, corpus.num_rows)
    return dg.AssetCheckResult(
        passed=corpus.num_rows > 0 and rate >= min_rate,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "readable_rate": rate,
            "min_rate": min_rate,
            "images": corpus.num_rows,
            "unreadable_by_reason": dg.MetadataValue.json(failure_counts(corpus)),
        },
    )


def evaluate_caption_rate(table: pa.Table, min_rate: float) -> dg.AssetCheckResult:
    """Share of readable images with a non-empty caption is at least ``min_rate``."""
    # readable images: no error, or one the captioning step itself gave
    rows = [r for r in table.to_pylist() if r["error"] is None or r["error"] in CAPTION_REASONS]
    non_empty = sum(bool(r["caption"] and r["caption"].strip()) and r["error"] is None for r in rows)
    rate = _rate(non_empty, len(rows))
    return dg.AssetCheckResult(
        passed=bool(rows) and rate >= min_rate,
        metadata={"non_empty_rate": rate, "min_rate": min_rate, "readable_images": len(rows), "captioned": non_empty},
    )


def evaluate_shards_readable(shards_dir: Path) -> dg.AssetCheckResult:
    """Every sample of every split reads back (image, json with a caption, seg map of the image's
    size), no sample id is in two shards, and each split holds as many samples as its ``_stats.json``
    says. Shards verified by an earlier evaluation are not decoded again (complete shards are immutable)."""
    from fc_pipeline.data.shards import verify_shards

    result = verify_shards(shards_dir)
    counts, problems = result["counts"], result["problems"]
    return dg.AssetCheckResult(
        passed=not problems and sum(counts.values()) > 0,
        metadata={
            "samples_read": dg.MetadataValue.json(counts),
            "problems": dg.MetadataValue.json(problems[:20]),
            "shards_decoded": result["decoded_shards"],
            "shards_verified_before": result["reused_shards"],
        },
    )


def evaluate_subject_rate(shards_dir: Path, min_rate: float) -> dg.AssetCheckResult:
    """Share of shard samples with at least one subject (from the shards' parquet sidecars)."""
    sidecars = sorted(shards_dir.glob("*/[0-9]*.parquet"))
    n_subjects = [n for path in sidecars for n in pq.read_table(path, columns=["n_subjects"]).column(0).to_pylist()]
    rate = _rate(sum(n >= 1 for n in n_subjects), len(n_subjects))
    return dg.AssetCheckResult(
        passed=bool(n_subjects) and rate >= min_rate,
        metadata={"with_subjects_rate": rate, "min_rate": min_rate, "samples": len(n_subjects)},
    )


def evaluate_failure_rate(
    corpus: pa.Table, ledger: pa.Table, max_error_rate: float, min_yield: float
) -> dg.AssetCheckResult:
    """Images failed by an error (broken file, annotation or model) stay under ``max_error_rate``
    and the share of images that became samples is at least ``min_yield``."""
    reasons = ledger.column("reason").to_pylist()
    errors = sum(reason not in FILTER_REASONS for reason in reasons)
    images = corpus.num_rows
    error_rate, sample_yield = _rate(errors, images), _rate(images - len(reasons), images)
    return dg.AssetCheckResult(
        passed=images > 0 and error_rate <= max_error_rate and sample_yield >= min_yield,
        metadata={
            "error_rate": error_rate,
            "max_error_rate": max_error_rate,
            "sample_yield": sample_yield,
            "min_yield": min_yield,
            "images": images,
            "failures_by_reason": dg.MetadataValue.json(failure_counts(ledger, "reason")),
        },
    )


class ReadableRateConfig(dg.Config):
    min_rate: float = Field(default=0.8, description="Minimum share of corpus files that decode.")


class CaptionRateConfig(dg.Config):
    min_rate: float = Field(default=0.9, description="Minimum share of readable images with a caption.")


class SubjectRateConfig(dg.Config):
    min_rate: float = Field(default=0.95, description="Minimum share of samples with at least one subject.")


class FailureRateConfig(dg.Config):
    max_error_rate: float = Field(default=0.2, description="Maximum share of images failed by an error.")
    min_yield: float = Field(
        default=0.1,
        description="Minimum share of images that became samples (the tiny random models find "
        "subjects only where the corpus provides annotations).",
    )


# Checks of a partitioned asset are partitioned the same way: each corpus is checked on its own,
# and the training asset reads the latest result of every corpus's blocking checks. (Dagster 1.13
# flags partitioned checks as a preview feature; the warning would repeat in every run's log.)
warnings.filterwarnings("ignore", message="Specifying a partitions_def on an AssetCheckSpec")
PER_CORPUS = {"partitions_def": corpus_partitions}


@dg.asset_check(asset=corpus_images, **PER_CORPUS, description="most corpus files decode as images (warning only)")
def readable_images(
    context: dg.AssetCheckExecutionContext, config: ReadableRateConfig, store: DatasetStore
) -> dg.AssetCheckResult:
    return evaluate_readable_rate(read_parquet(store.path(context.partition_key, IMAGES)), config.min_rate)


@dg.asset_check(asset=captions, blocking=True, **PER_CORPUS, description="readable images have non-empty captions")
def caption_non_empty_rate(
    context: dg.AssetCheckExecutionContext, config: CaptionRateConfig, store: DatasetStore
) -> dg.AssetCheckResult:
    return evaluate_caption_rate(read_parquet(store.path(context.partition_key, CAPTIONS)), config.min_rate)


@dg.asset_check(
    asset=training_shards, blocking=True, **PER_CORPUS, description="every shard sample reads back with webdataset"
)
def shards_readable(context: dg.AssetCheckExecutionContext, store: DatasetStore) -> dg.AssetCheckResult:
    return evaluate_shards_readable(store.path(context.partition_key, SHARDS))


@dg.asset_check(asset=training_shards, blocking=True, **PER_CORPUS, description="samples carry at least one subject")
def samples_with_subjects(
    context: dg.AssetCheckExecutionContext, config: SubjectRateConfig, store: DatasetStore
) -> dg.AssetCheckResult:
    return evaluate_subject_rate(store.path(context.partition_key, SHARDS), config.min_rate)


@dg.asset_check(
    asset=training_shards, blocking=True, **PER_CORPUS, description="few images fail by error; enough become samples"
)
def failure_rate(
    context: dg.AssetCheckExecutionContext, config: FailureRateConfig, store: DatasetStore
) -> dg.AssetCheckResult:
    corpus = context.partition_key
    ledger = read_parquet(store.path(corpus, SHARDS) / "failures.parquet")
    return evaluate_failure_rate(
        read_parquet(store.path(corpus, IMAGES)), ledger, config.max_error_rate, config.min_yield
    )


SHARD_CHECKS = [shards_readable, samples_with_subjects, failure_rate]


def _evaluations(instance: dg.DagsterInstance, run_id: str) -> list[dg.AssetCheckEvaluation]:
    """The check evaluations a run recorded."""
    records = instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION).records
    return [record.event_log_entry.dagster_event.asset_check_evaluation_data for record in records]


def failed_shard_checks(instance: dg.DagsterInstance, corpora: list[str]) -> dict[str, dict[str, str]]:
    """``{corpus: {check name: why}}`` of the blocking shard checks that did not pass on a corpus's
    latest ``training_shards`` (only corpora with a problem). ``why`` is ``failed`` or
    ``not run on the latest shards`` (never run, in progress, or run on an older materialisation).

    An evaluation counts when it targets the latest materialisation: one of the run that
    materialised it, or the check's latest evaluation if that was for this corpus (a check
    re-executed on its own)."""
    keys = [next(iter(check.check_keys)) for check in SHARD_CHECKS]
    latest = {key: instance.get_latest_asset_check_evaluation_record(key) for key in keys}
    problems: dict[str, dict[str, str]] = {}
    for corpus in corpora:
        records = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=training_shards.key, asset_partitions=[corpus]), limit=1
        ).records
        found: dict[str, dg.AssetCheckEvaluation] = {}
        if records:
            shards = records[0]
            extra = [r.event.dagster_event.asset_check_evaluation_data for r in latest.values() if r and r.event]
            for evaluation in _evaluations(instance, shards.run_id) + extra:  # later ones win
                target = evaluation.target_materialization_data
                if evaluation.partition == corpus and target and target.storage_id == shards.storage_id:
                    found[evaluation.check_name] = evaluation
        for key in keys:
            evaluation = found.get(key.name)
            if evaluation is None:
                problems.setdefault(corpus, {})[key.name] = "not run on the latest shards"
            elif not evaluation.passed:
                problems.setdefault(corpus, {})[key.name] = "failed"
    return problems
