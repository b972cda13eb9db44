"""The Dagster asset in-process on the tiny profile, and the ``evaluate`` command."""

import dagster as dg
import pyarrow.parquet as pq
import pytest

from assets.demo_run import summarize
from assets.evaluation import EvaluationReportConfig, IdentityFloorConfig, evaluation_report, identity_floor
from assets.resources import DatasetStore, EvaluatorResource
from fc_pipeline.cli import main
from fc_pipeline.evaluation.prompt_consistency import RANDOM_SCORER_NOTE
from fc_pipeline.evaluation.runner import BASELINE_LABEL, TEXT_ONLY_METHOD


def test_evaluation_report_materialises_with_its_check(tiny_checkpoint, tmp_path):
    @dg.asset(key="fastcomposer_checkpoint")
    def trained_checkpoint() -> dg.MaterializeResult:
        return dg.MaterializeResult(metadata={"checkpoint": dg.MetadataValue.path(str(tiny_checkpoint))})

    result = dg.materialize(
        [trained_checkpoint, evaluation_report, identity_floor],
        resources={"store": DatasetStore(data_root=str(tmp_path)), "evaluator": EvaluatorResource(profile="tiny")},
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
    # offline tiny profile: prompt consistency comes from a random CLIP and says so
    assert f"prompt_consistency ({RANDOM_SCORER_NOTE})" in metadata["summary"].value
    assert metadata["single/prompt_consistency_note"].value == RANDOM_SCORER_NOTE
    assert RANDOM_SCORER_NOTE in metadata["scorers"].value["prompt_consistency"]
    # ... and the demo's summary line says so too
    described = summarize(result, tmp_path).describe()
    assert f"prompt consistency scored by: random tiny CLIP (seed 0) — {RANDOM_SCORER_NOTE}" in described
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
    args = ["evaluate", "--checkpoint", str(tiny_checkpoint), "--subjects", str(demo_subjects), "--out", str(out)]
    run = ["--multi", "--alpha", "0.6", "--images-per-prompt", "2", "--steps", "2", "--max-prompts", "1"]
    run += ["--resolution", "32", "--profile", "tiny", "--baseline-checkpoint", str(tiny_checkpoint)]
    assert main(args + run) == 0
    rows = pq.read_table(out / "scores.parquet").to_pylist()
    ours = [r for r in rows if r["checkpoint"] == tiny_checkpoint.name]
    assert len(ours) == 4 and {r["alpha"] for r in ours} == {0.0, 0.6} and {r["seed"] for r in ours} == {0, 1}
    # the plain SD row: text only, once per case, from the checkpoint's own SD components here, so it
    # matches the checkpoint's text-only row image for image
    plain = [r for r in rows if r["checkpoint"] == BASELINE_LABEL]
    text_only = [r for r in ours if r["alpha"] == 0.0]
    assert [r["method"] for r in plain] == ["plain Stable Diffusion"] * 2 and {r["alpha"] for r in plain} == {0.0}
    assert [r["method"] for r in text_only] == [TEXT_ONLY_METHOD] * 2
    for sd, own in zip(plain, text_only):
        assert sd["seed"] == own["seed"] and sd["prompt_consistency"] == pytest.approx(own["prompt_consistency"])
        assert sd["identity"] == own["identity"]
    printed = capsys.readouterr().out
    assert "prompt consistency " in printed and f"({RANDOM_SCORER_NOTE}) (α = 0.6)" in printed
    with pytest.raises(SystemExit, match="not a FastComposer checkpoint"):
        main(
            [
                "evaluate",
                "--checkpoint",
                str(tmp_path),
                "--subjects",
                str(demo_subjects),
                "--out",
                str(out),
                "--profile",
                "tiny",
            ]
        )


def test_cli_evaluate_defaults_to_the_paper_scorers(tiny_checkpoint, demo_subjects, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no vggface2 weights there
    args = ["evaluate", "--checkpoint", str(tiny_checkpoint), "--subjects", str(demo_subjects), "--out", str(tmp_path)]
    with pytest.raises(SystemExit, match="vggface2 weights not found"):
        main(args)
    with pytest.raises(SystemExit, match="hf download fc-pipeline-tests/no-such-clip"):
        main(args + ["--facenet", "casia-webface-opencv", "--prompt-clip", "fc-pipeline-tests/no-such-clip"])
    assert not (tmp_path / "scores.parquet").exists()  # nothing was generated or scored
