"""``fc-pipeline demo``: materialise every asset of the Dagster code location on the demo corpus.

The run goes through a real :class:`dagster.DagsterInstance` at ``DAGSTER_HOME`` (default
``<repo>/.dagster_home``, seeded with the repo's ``dagster.yaml``), with the ``demo`` corpus
registered as a partition, so ``dagster dev`` shows the run, its logs and the assets' metadata
afterwards. Dagster is imported lazily: the rest of the library never needs it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fc_pipeline.data.demo_corpus import DEMO_CORPUS

from .instance import prepare_dagster_home, register_corpora


@dataclass
class DemoSummary:
    """What the demo run produced, read back from the materialisation metadata Dagster recorded."""

    run_id: str
    success: bool
    dagster_home: Path
    shards: str | None = None
    images_in: int | None = None
    samples_out: dict[str, int] = field(default_factory=dict)
    subjects_per_sample: dict[str, int] = field(default_factory=dict)
    failures_by_reason: dict[str, int] = field(default_factory=dict)
    failed_steps: list[str] = field(default_factory=list)
    materialized: list[str] = field(default_factory=list)
    checkpoint: str | None = None
    generated: list[Path] = field(default_factory=list)
    report: str | None = None
    report_scorers: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        """A few human-readable lines for the terminal."""
        lines = [
            f"Dagster run {self.run_id}: {'success' if self.success else 'FAILED'} (DAGSTER_HOME={self.dagster_home})",
            f"  assets materialised: {', '.join(self.materialized) or 'none'}",
        ]
        if self.failed_steps:
            lines.append(f"  failed steps: {', '.join(self.failed_steps)}")
        if self.shards:
            samples = sum(self.samples_out.values())
            histogram = ", ".join(f"{k} subject(s): {n}" for k, n in self.subjects_per_sample.items())
            lines += [
                f"  shards: {self.shards}",
                f"  images in: {self.images_in}   samples out: {samples} "
                + "("
                + ", ".join(f"{split} {n}" for split, n in self.samples_out.items())
                + ")",
                f"  subjects per sample: {histogram or 'n/a'}",
                f"  failures by reason: {json.dumps(self.failures_by_reason) if self.failures_by_reason else 'none'}",
            ]
        if self.checkpoint:
            lines.append(f"  checkpoint: {self.checkpoint}")
        for path in self.generated:
            lines.append(f"  generated: {path}")
        if self.report:
            lines.append(f"  evaluation report: {self.report}")
        for metric, scorer in self.report_scorers.items():
            lines.append(f"  {metric.replace('_', ' ')} scored by: {scorer}")
        lines.append(f"  open the UI: DAGSTER_HOME={self.dagster_home} dagster dev -h 127.0.0.1 -w workspace.yaml")
        return "\n".join(lines)


def run_demo(
    data_root: str | Path | None = None,
    dagster_home: str | Path | None = None,
    demo_images: int | None = None,
    selection: list[str] | None = None,
) -> DemoSummary:
    """Materialise every asset in ``assets.defs`` (or the ``selection`` of asset keys) in one run.

    Assets other than the dataset chain (training, evaluation) run with their own config
    defaults, which are the tiny profile's.
    """
    import dagster as dg

    from assets import defs

    home = prepare_dagster_home(dagster_home)
    register_corpora([DEMO_CORPUS], home)
    # step-level DEBUG events stay in the instance (and the UI); the terminal gets INFO
    run_config: dict[str, Any] = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}
    # the demo scores offline: the real FaceNet and a random CLIP, whose numbers the report marks
    run_config["resources"] = {"evaluator": {"config": {"profile": "tiny"}}}
    if data_root is not None:
        run_config["resources"]["store"] = {"config": {"data_root": str(Path(data_root).resolve())}}
    if demo_images is not None:
        run_config["ops"] = {"corpus_images": {"config": {"demo_images": demo_images}}}
    job = defs.resolve_implicit_global_asset_job_def()
    if selection:
        job = job.get_subset(asset_selection={dg.AssetKey(key) for key in selection})
    with dg.DagsterInstance.from_config(str(home)) as instance:
        result = job.execute_in_process(
            instance=instance, run_config=run_config, partition_key=DEMO_CORPUS, raise_on_error=False
        )
    summary = summarize(result, home)
    if summary.checkpoint:
        summary.generated = generate_demo_images(
            summary.checkpoint, Path(summary.checkpoint).parent / "demo_generation"
        )
    return summary


DEMO_PROMPT = "a woman <|image|> and a woman <|image|> walking on the beach"


def generate_demo_images(checkpoint: str | Path, out_dir: Path) -> list[Path]:
    """Two subjects, one photo each, through the freshly trained checkpoint (paper §4.3), with
    the subject tokens' attention maps beside the image. Random tiny weights: the path is the point."""
    from fc_pipeline.cli.generation import load_pipeline, load_subject_images, make_job, run_job
    from fc_pipeline.evaluation.subjects import load_subjects, write_demo_subjects

    subjects = load_subjects(write_demo_subjects(out_dir / "subjects"))
    pipeline = load_pipeline(checkpoint)
    job = make_job(
        {
            "prompt": DEMO_PROMPT,
            "subjects": [s.references[0] for s in subjects[:2]],
            "out": out_dir / "beach.png",
            "steps": 20,
            "seed": 0,
            "save_attention": True,
        }
    )
    return run_job(pipeline, job, load_subject_images(job, pipeline))


def summarize(result, dagster_home: Path) -> DemoSummary:
    """A :class:`DemoSummary` from an ``ExecuteInProcessResult`` of the asset job."""
    materialized = {}
    for event in result.get_asset_materialization_events():
        materialization = event.event_specific_data.materialization
        materialized[materialization.asset_key.to_user_string()] = {
            key: getattr(value, "value", value) for key, value in materialization.metadata.items()
        }
    summary = DemoSummary(
        run_id=result.run_id,
        success=result.success,
        dagster_home=dagster_home,
        failed_steps=[event.step_key for event in result.get_step_failure_events()],
        materialized=list(materialized),
    )
    checkpoint = materialized.get("fastcomposer_checkpoint", {}).get("checkpoint")
    summary.checkpoint = str(checkpoint) if checkpoint else None
    report = materialized.get("evaluation_report", {})
    summary.report = str(report["report"]) if "report" in report else None
    summary.report_scorers = dict(report.get("scorers", {}))
    shards = materialized.get("training_shards")
    if shards:
        summary.shards = str(shards["path"])
        summary.images_in = int(shards["images_in"])
        summary.samples_out = dict(shards["samples_out"])
        summary.subjects_per_sample = dict(shards["subjects_per_sample"])
        summary.failures_by_reason = dict(shards["failures_by_reason"])
    return summary
