"""Asset checks of the dataset chain; the blocking ones guard everything downstream (training).

Each check is an ``evaluate_*`` function on the data (usable and testable without a run) plus a
thin ``@asset_check`` that points it at the corpus's files. Thresholds are check config.
"""

import pyarrow as pa
import dagster as dg
from pydantic import Field

from fc_pipeline.storage import read_parquet

from .dataset import CAPTIONS, IMAGES, captions, corpus_images
from .metadata import failure_counts
from .resources import DatasetStore

# Ledger reasons the captioning step itself gives (others are carried from the corpus scan).
CAPTION_ERRORS = ("empty_caption", "caption_failed")


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
    rows = [r for r in table.to_pylist() if r["error"] is None or r["error"] in CAPTION_ERRORS]
    non_empty = sum(bool(r["caption"] and r["caption"].strip()) and r["error"] is None for r in rows)
    rate = _rate(non_empty, len(rows))
    return dg.AssetCheckResult(
        passed=bool(rows) and rate >= min_rate,
        metadata={"non_empty_rate": rate, "min_rate": min_rate, "readable_images": len(rows), "captioned": non_empty},
    )


class ReadableRateConfig(dg.Config):
    min_rate: float = Field(default=0.8, description="Minimum share of corpus files that decode.")


class CaptionRateConfig(dg.Config):
    min_rate: float = Field(default=0.9, description="Minimum share of readable images with a caption.")


@dg.asset_check(asset=corpus_images, description="most corpus files decode as images (warning only)")
def readable_images(config: ReadableRateConfig, store: DatasetStore) -> dg.AssetCheckResult:
    return evaluate_readable_rate(read_parquet(store.path(IMAGES)), config.min_rate)


@dg.asset_check(asset=captions, blocking=True, description="readable images have non-empty captions")
def caption_non_empty_rate(config: CaptionRateConfig, store: DatasetStore) -> dg.AssetCheckResult:
    return evaluate_caption_rate(read_parquet(store.path(CAPTIONS)), config.min_rate)
