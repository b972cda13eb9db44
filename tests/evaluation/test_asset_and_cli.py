"""The Dagster asset in-process on the tiny profile, and the ``evaluate`` command."""

import dagster as dg
import pyarrow.parquet as pq
import pytest

from assets.evaluation import EvaluationReportConfig, IdentityFloorConfig, evaluation_report, identity_floor
from assets.resources import DatasetStore, EvaluatorResource
from fc_pipeline.cli import main


def test_evaluation_report_materialises_with_its_check(tiny_checkpoint, tmp_path):
    @dg.asset(key="fastcomposer_checkpoint")
    def trained_checkpoint() -> dg.MaterializeResult:
        return dg.MaterializeResult(metadata={"checkpoint": dg.MetadataValue.path(str(tiny_checkpoint))})

    result = dg.materialize(
        [trained_checkpoint, evaluation_report, identity_floor],
        resources={"store": DatasetStore(data_root=str(tmp_path)), "evaluator": EvaluatorResource()},
        run_config=dg.RunConfig(
            {
                "evaluation_report": EvaluationReportConfig(
                    num_inference_steps=1, guidance_scale=1.0, resolution=32, max_prompts=1, max_subject_groups=1
                ),
                "evaluation_report_identity_floor": IdentityFloorConfig(floor_pct=0.0),
            }
        ),
    )
    assert result.success
    metadata = result.asset_materializations_for_node("evaluation_report")[0].metadata
    assert metadata["summary"].value.startswith("| checkpoint | setting | method | alpha |")
    assert metadata["alpha_tradeoff"].value.startswith("![alpha sweep](data:image/png;base64,")
    # the report folder is named after the run (the checkpoint's parent folder) and the checkpoint
    report = tmp_path / "evaluation" / tiny_checkpoint.parent.name / "tiny-ckpt" / "report.html"
    assert metadata["report"].value == str(report) and report.is_file()
    assert metadata["images"].value == 4  # (1 single + 1 multi case) × (baseline + α = 0.7)
    assert set(metadata["headline"].value) == {"single", "multi"}
    (check,) = result.get_asset_check_evaluations()
    assert check.passed  # a floor of 0 % always holds
    assert check.metadata["floor_pct"].value == 0.0


def test_identity_floor_flags_a_low_score():
    instance = dg.DagsterInstance.ephemeral()
    instance.report_runless_asset_event(
        dg.AssetMaterialization(
            "evaluation_report", metadata={"headline": dg.MetadataValue.json({"single": {"identity_pct": 12.5}})}
        )
    )
    context = dg.build_asset_check_context(instance=instance)
    flagged = identity_floor(context, IdentityFloorConfig(floor_pct=30.0))
    assert not flagged.passed and flagged.severity == dg.AssetCheckSeverity.WARN
    assert flagged.metadata["below_floor"].value == {"single": 12.5}
    assert identity_floor(context, IdentityFloorConfig(floor_pct=10.0)).passed


def test_cli_evaluate(tiny_checkpoint, demo_subjects, tmp_path, capsys):
    out = tmp_path / "report"
    code = main(
        [
            "evaluate",
            "--checkpoint",
            str(tiny_checkpoint),
            "--subjects",
            str(demo_subjects),
            "--out",
            str(out),
            "--multi",
            "--alpha",
            "0.6",
            "--images-per-prompt",
            "2",
            "--steps",
            "2",
            "--max-prompts",
            "1",
            "--resolution",
            "32",
        ]
    )
    assert code == 0
    rows = pq.read_table(out / "scores.parquet").to_pylist()
    assert len(rows) == 4 and {r["alpha"] for r in rows} == {0.0, 0.6} and {r["seed"] for r in rows} == {0, 1}
    assert "multi: identity" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="not a FastComposer checkpoint"):
        main(["evaluate", "--checkpoint", str(tmp_path), "--subjects", str(demo_subjects), "--out", str(out)])
