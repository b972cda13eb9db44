"""The benchmark runner end to end on the tiny pipeline, and the report's tables."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from fc_pipeline.evaluation.prompt_consistency import RANDOM_SCORER_NOTE
from fc_pipeline.evaluation.report import comparison, markdown_table, parse_markdown_table, summarise
from fc_pipeline.evaluation.runner import TEXT_ONLY_METHOD, EvaluationConfig, run_evaluation


def _row(**changes):
    row = dict(
        checkpoint="a",
        setting="multi",
        method="FastComposer",
        alpha=0.7,
        identity=0.5,
        identity_hungarian=0.6,
        prompt_consistency=20.0,
        n_faces=2,
        margin=0.2,
        seconds_per_image=1.0,
        peak_memory_mb=100.0,
    )
    return {**row, **changes}


def test_summary_numbers():
    rows = [
        _row(),
        _row(identity=0.3, margin=-0.1, n_faces=0, peak_memory_mb=300.0),
        _row(alpha=0.0, method=TEXT_ONLY_METHOD),
    ]
    summary = summarise(rows)
    assert [r["alpha"] for r in summary] == [0.0, 0.7]
    main = summary[1]
    assert main["images"] == 2
    assert main["identity_pct"] == pytest.approx(40.0)
    assert main["identity_hungarian_pct"] == pytest.approx(60.0)
    assert main["face_found_pct"] == pytest.approx(50.0)
    assert main["margin"] == pytest.approx(0.05) and main["blended_pct"] == pytest.approx(50.0)
    assert main["peak_memory_mb"] == 300.0
    other = summarise([_row(checkpoint="b", identity=0.8)])
    compared = comparison(summary + other)
    row = next(r for r in compared if r["alpha"] == 0.7)
    assert row["identity_pct [a]"] == pytest.approx(40.0) and row["Δ identity_pct"] == pytest.approx(40.0)


def test_markdown_tables_round_trip():
    rows = [{"prompt": "a | b", "score": 0.5, "missing": None}]
    assert parse_markdown_table("# title\n\n" + markdown_table(rows)) == [
        {"prompt": "a | b", "score": "0.5", "missing": "–"}
    ]


def test_config_validation():
    with pytest.raises(ValueError, match="alphas"):
        EvaluationConfig(alphas=(1.5,))
    assert EvaluationConfig(alphas=(0.7, 0.2)).alpha_values == [0.0, 0.2, 0.7]
    assert EvaluationConfig(alphas=(0.7, 0.2)).main_alpha == 0.7


@pytest.fixture(scope="module")
def evaluation(tiny_pipeline, demo_subjects, face_scorer, prompt_scorer, tmp_path_factory):
    out = tmp_path_factory.mktemp("evaluation")
    config = EvaluationConfig(
        prompt_sets=("single", "multi"),
        images_per_prompt=1,
        alphas=(1.0,),
        num_inference_steps=1,
        guidance_scale=1.0,
        height=32,
        width=32,
        max_prompts=1,
    )
    # Two labels for the same model: a checkpoint comparison whose deltas must be exactly zero.
    result = run_evaluation(
        {"ckpt_a": tiny_pipeline, "ckpt_b": tiny_pipeline},
        demo_subjects,
        out,
        config,
        faces=face_scorer,
        prompt_scorer=prompt_scorer,
    )
    return out, result


def test_report_files_exist_and_tables_parse(evaluation):
    out, result = evaluation
    for name in (
        "scores.parquet",
        "summary.json",
        "report.md",
        "report.html",
        "alpha_sweep.png",
        "grids/ckpt_a.png",
        "grids/ckpt_b.png",
    ):
        assert (out / name).is_file(), name
    assert len(list((out / "attention" / "ckpt_a").glob("*.png"))) == 1  # the one multi-subject case
    scores = pq.read_table(out / "scores.parquet").to_pylist()
    # 2 checkpoints × (2 single + 1 multi case) × (α = 0 baseline, α = 1) × 1 image
    assert len(scores) == 12 == result["images"]
    assert {(r["method"], r["alpha"]) for r in scores} == {(TEXT_ONLY_METHOD, 0.0), ("FastComposer", 1.0)}
    for row in scores:
        assert (out / row["image"]).is_file()
        assert 0.0 <= row["identity"] <= 1.0 and row["seconds_per_image"] > 0 and row["peak_memory_mb"] > 0
    multi = [r for r in scores if r["setting"] == "multi"]
    assert all(r["subjects"] == ["eileen_collins", "grace_hopper"] for r in multi)
    assert all(r["prompt"].startswith("a woman <|image|> and a woman <|image|>") for r in multi)

    markdown = (out / "report.md").read_text()
    summary = parse_markdown_table(markdown.split("## Summary", 1)[1])
    assert len(summary) == 8  # 2 checkpoints × 2 settings × 2 α
    assert {r["method"] for r in summary} == {TEXT_ONLY_METHOD, "FastComposer"}
    compared = parse_markdown_table(markdown.split("## Checkpoint comparison", 1)[1])
    # the tiny profile's CLIP is random: its columns are marked
    assert len(compared) == 4 and all(float(r[f"Δ prompt_consistency ({RANDOM_SCORER_NOTE})"]) == 0 for r in compared)
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 5  # sweep, 2 grids, 2 attention figures
    assert 'src="http' not in html and "grids/" not in html  # self-contained
    saved = json.loads((out / "summary.json").read_text())
    assert saved["summary"] == result["summary"] and set(saved["headline"]) == {"single", "multi"}


def test_same_seed_same_image_across_checkpoint_labels(evaluation):
    out, _ = evaluation
    rows = pq.read_table(out / "scores.parquet").to_pylist()
    a = next(r for r in rows if r["checkpoint"] == "ckpt_a" and r["alpha"] == 1.0)
    b = next(r for r in rows if r["checkpoint"] == "ckpt_b" and r["case_id"] == a["case_id"] and r["alpha"] == 1.0)
    np.testing.assert_array_equal(np.asarray(Image.open(out / a["image"])), np.asarray(Image.open(out / b["image"])))
    assert a["prompt_consistency"] == b["prompt_consistency"]
