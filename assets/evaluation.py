"""Evaluation asset (paper §5): score the trained checkpoint and publish the report.

``evaluation_report`` runs :func:`fc_pipeline.evaluation.run_evaluation` on the checkpoint that
``fastcomposer_checkpoint`` last materialised (its ``checkpoint`` path metadata; ``Config.checkpoint``
overrides it) and shows the summary table and the α trade-off plot in the UI. The check
``identity_floor`` warns when identity preservation falls below a configured floor.
"""

import base64
from pathlib import Path

import dagster as dg
from pydantic import Field

from assets.deployment import GPU_OP_TAGS
from assets.resources import GPU_POOL, DatasetStore, EvaluatorResource
from assets.settings import STEP_CONFIGS, check_run_config, config_class, to_settings
from fc_pipeline.evaluation.report import SUMMARY_COLUMNS, markdown_table
from fc_pipeline.evaluation.runner import EvaluationConfig, run_evaluation
from fc_pipeline.evaluation.subjects import write_demo_subjects
from fc_pipeline.settings import release_memory

CHECKPOINT_ASSET = dg.AssetKey("fastcomposer_checkpoint")
# Metadata keys under which the training asset may record its checkpoint directory.
CHECKPOINT_METADATA_KEYS = ("checkpoint", "checkpoint_dir", "path")


# the tiny demo takes about a minute on a laptop CPU with these; everything else is the library's default
DEMO_DEFAULTS = dict(
    prompt_sets=("single", "multi"), images_per_prompt=1, num_inference_steps=10, max_prompts=2, max_subject_groups=2
)
EvaluationSettings = config_class(
    EvaluationConfig,
    "EvaluationSettings",
    "The library's EvaluationConfig fields (fc_pipeline.evaluation.runner), demo defaults.",
    defaults=DEMO_DEFAULTS,
)


class EvaluationReportConfig(EvaluationSettings):
    """Benchmark settings: every field of the library's ``EvaluationConfig`` (demo defaults,
    ``DEMO_DEFAULTS``) plus what to evaluate."""

    checkpoint: str = Field(
        default="",
        description="Checkpoint directory, or package.module:factory building another pipeline to score under the "
        "same protocol; empty: the one the upstream fastcomposer_checkpoint recorded.",
    )
    subjects_dir: str = Field(
        default="", description="One sub-folder of reference photos per identity; empty: a bundled two-identity set."
    )
    resolution: int | None = Field(default=None, description="Image size in px (sets height and width).")


def checkpoint_path(context: dg.AssetExecutionContext, configured: str) -> Path:
    """The configured checkpoint, else the path recorded by the latest ``fastcomposer_checkpoint``."""
    if configured:
        return Path(configured)
    event = context.instance.get_latest_materialization_event(CHECKPOINT_ASSET)
    if event is None or event.asset_materialization is None:
        raise dg.Failure(
            f"{CHECKPOINT_ASSET.to_user_string()} has never been materialised; train first or set config.checkpoint"
        )
    metadata = event.asset_materialization.metadata
    for key in CHECKPOINT_METADATA_KEYS:
        if key in metadata:
            value = metadata[key].value
            return Path(value.path if hasattr(value, "path") else value)
    raise dg.Failure(
        f"{CHECKPOINT_ASSET.to_user_string()} recorded none of the metadata keys {CHECKPOINT_METADATA_KEYS}"
    )


@dg.asset(
    deps=[CHECKPOINT_ASSET], group_name="evaluation", pool=GPU_POOL, op_tags=GPU_OP_TAGS, kinds={"pytorch", "parquet"}
)
def evaluation_report(
    context: dg.AssetExecutionContext, config: EvaluationReportConfig, store: DatasetStore, evaluator: EvaluatorResource
) -> dg.MaterializeResult:
    """Identity preservation and prompt consistency of the checkpoint, with α sweep and report."""
    check_run_config(context)
    checkpoint = checkpoint_path(context, config.checkpoint)
    # a checkpoint is <run>/checkpoint-N: both names, so runs never overwrite each other's report
    out_dir = store.root / "evaluation" / checkpoint.parent.name / checkpoint.name
    subjects_dir = (
        Path(config.subjects_dir)
        if config.subjects_dir
        else write_demo_subjects(store.root / "evaluation" / "demo_subjects")
    )
    size = {"height": config.resolution, "width": config.resolution} if config.resolution else {}
    settings = to_settings(EvaluationConfig, config, **size)
    context.log.info(f"evaluating {checkpoint} on {subjects_dir} -> {out_dir}")
    try:
        result = run_evaluation(
            checkpoint,
            subjects_dir,
            out_dir,
            settings,
            profile=evaluator.profile,
            faces=evaluator.face_scorer(),
            prompt_scorer=evaluator.prompt_scorer(),
            progress=context.log.info,
        )
    finally:  # the scorers lived for this call only: hand their CUDA memory back, as the model resources do
        release_memory()
    plot = Path(result["paths"]["alpha_sweep"])
    headline = {
        f"{setting}/{metric}": value
        for setting, metrics in result["headline"].items()
        for metric, value in metrics.items()
        if value is not None
    }
    return dg.MaterializeResult(
        metadata={
            # a random scorer's columns are marked "random scorer — not meaningful" (tiny profile)
            "summary": dg.MetadataValue.md(markdown_table(result["summary"], SUMMARY_COLUMNS, result["notes"])),
            "scorers": dg.MetadataValue.json(result["scorers"]),
            "alpha_tradeoff": dg.MetadataValue.md(
                f"![alpha sweep](data:image/png;base64,{base64.b64encode(plot.read_bytes()).decode()})"
            ),
            "report": dg.MetadataValue.path(result["paths"]["html"]),
            "report_md": dg.MetadataValue.path(result["paths"]["report"]),
            "scores": dg.MetadataValue.path(result["paths"]["scores"]),
            "checkpoint": dg.MetadataValue.path(str(checkpoint)),
            "images": result["images"],
            "headline": dg.MetadataValue.json(result["headline"]),
            **headline,
        }
    )


STEP_CONFIGS[evaluation_report.op.name] = EvaluationReportConfig


class IdentityFloorConfig(dg.Config):
    """Identity preservation (%) below which a checkpoint is flagged (paper: 51.41 single, 43.11 multi)."""

    floor_pct: float = 30.0


@dg.asset_check(asset=evaluation_report, description="identity preservation at the main α is above the floor")
def identity_floor(context: dg.AssetCheckExecutionContext, config: IdentityFloorConfig) -> dg.AssetCheckResult:
    """Warn when any setting's identity score at the main α is below ``floor_pct``."""
    event = context.instance.get_latest_materialization_event(evaluation_report.key)
    headline = event.asset_materialization.metadata["headline"].value if event else {}
    scores = {setting: (m.get("identity_pct") or 0.0) for setting, m in headline.items()}
    below = {s: v for s, v in scores.items() if v < config.floor_pct}
    return dg.AssetCheckResult(
        passed=bool(scores) and not below,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "floor_pct": config.floor_pct,
            "identity_pct": dg.MetadataValue.json(scores),
            "below_floor": dg.MetadataValue.json(below or {}),
        },
        description=None if scores else "no evaluation scores recorded",
    )
