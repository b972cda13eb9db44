"""``fc-pipeline generate``: single prompts, jsonl batches, outputs and user errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from fc_pipeline.cli import main
from fc_pipeline.cli.generation import GenerationJob, overlay_attention_maps
from fc_pipeline.pipeline import FastComposerPipeline
from fc_pipeline.schedulers import with_scheduler

PROMPT = "a man <|image|> and a woman <|image|> on the beach"


@pytest.fixture(scope="module")
def checkpoint(pipe, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "fc_pipeline.cli", "generate", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_jobs_file_in_a_subprocess(pipe, checkpoint, subject_paths, tmp_path):
    jobs = tmp_path / "jobs.jsonl"
    lines = [
        {
            "prompt": PROMPT,
            "subjects": [str(p) for p in subject_paths],
            "seed": 3,
            "out": "out/duo.png",
            "save_attention": True,
        },
        {"prompt": "a dog in the snow", "out": "out/dog.jpg", "num_images": 2, "alpha": 0.6},
    ]
    jobs.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    result = run_cli(
        "--checkpoint", str(checkpoint), "--jobs", str(jobs), "--steps", "2", "--height", "32", "--width", "32"
    )
    assert result.returncode == 0, result.stderr
    assert "[1/2] wrote" in result.stdout and "[2/2] wrote" in result.stdout

    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == [
        "dog_0.jpg",
        "dog_1.jpg",
        "duo.attention.npy",
        "duo.attention.png",
        "duo.png",
    ]
    expected = pipe(
        PROMPT,
        subject_images=subject_paths,
        num_inference_steps=2,
        height=32,
        width=32,
        generator=torch.Generator().manual_seed(3),
    ).images[0]
    assert np.array_equal(np.asarray(PIL.Image.open(out / "duo.png")), np.asarray(expected))
    assert np.load(out / "duo.attention.npy", allow_pickle=False).shape == (2, 16, 16)
    assert PIL.Image.open(out / "duo.attention.png").size == (96, 32)
    assert PIL.Image.open(out / "dog_1.jpg").size == (32, 32)


def test_missing_checkpoint_exits_2(tmp_path, capsys):
    assert main(["generate", "--checkpoint", str(tmp_path / "nope"), "--prompt", "a man"]) == 2
    assert "checkpoint directory not found" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["generate", "--checkpoint", str(tmp_path / "empty"), "--prompt", "a man"]) == 2
    assert "is not a FastComposer checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "jsonl", "message"),
    [
        (["--prompt", PROMPT, "--subject", "{man}"], None, "2 <|image|> marker(s) but 1 reference image"),
        (["--prompt", "a man <|image|>", "--subject", "{missing}"], None, "not_found"),
        (["--prompt", "a man <|image|>", "--subject", "{man}", "--alpha", "2"], None, "alpha"),
        (["--prompt", "a man", "--out", "out.gif"], None, "must end in one of"),
        (["--subject", "{man}"], '{"prompt": "a man", "out": "a.png"}', "--subject goes with --prompt"),
        ([], '{"prompt": "a man", "out": "a.png"}\n{"prompt": "a dog", "out": "a.png"}', "several jobs write"),
        ([], '{"prompt": "a man", "out": "a.png", "sed": 1}', "jobs.jsonl:1: unknown field"),
        ([], '{"prompt": "a man", "out": "a.png"}\n{"prompt": "a dog"', "jobs.jsonl:2: not valid JSON"),
        ([], '{"out": "a.png"}', "'prompt' is required"),
    ],
)
def test_user_errors_exit_2_with_a_message(checkpoint, subject_paths, tmp_path, capsys, args, jsonl, message):
    args = [a.format(man=subject_paths[0], missing=tmp_path / "missing.jpg") for a in args]
    if jsonl is not None:
        (tmp_path / "jobs.jsonl").write_text(jsonl)
        args += ["--jobs", str(tmp_path / "jobs.jsonl")]
    code = main(["generate", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "o.png"), *args])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o.png").exists() and not (tmp_path / "a.png").exists()


def test_output_paths_and_overlay():
    job = GenerationJob(prompt="x", out=Path("/o/img.png"), num_images=3)
    assert [p.name for p in job.output_paths()] == ["img_0.png", "img_1.png", "img_2.png"]
    image = PIL.Image.new("RGB", (40, 20), (10, 20, 30))
    maps = np.zeros((2, 5, 10), dtype=np.float32)
    maps[0, 0, 0] = 1.0
    grid = overlay_attention_maps(image, maps)
    assert grid.size == (120, 20)
    pixels = np.asarray(grid)
    assert (pixels[:, :40] == (10, 20, 30)).all()
    assert not np.array_equal(pixels[0, 40], pixels[19, 79]), "the hot corner stands out"


def test_unwritable_out_fails_before_any_image(checkpoint, tmp_path, capsys, monkeypatch):
    generated = []
    monkeypatch.setattr(FastComposerPipeline, "__call__", lambda *args, **kwargs: generated.append(1))
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    (tmp_path / "taken.png").mkdir()
    for out, message in [(blocker / "sub" / "o.png", "cannot write output"), (tmp_path / "taken.png", "directory")]:
        assert main(["generate", "--checkpoint", str(checkpoint), "--prompt", "a dog", "--out", str(out)]) == 2
        assert message in capsys.readouterr().err
    assert not generated


def test_long_prompt_needs_truncate(checkpoint, tmp_path, capsys):
    long = "a photo of a dog on the beach " + "in golden light " * 30
    args = ["generate", "--checkpoint", str(checkpoint), "--prompt", long, "--out", str(tmp_path / "o.png")]
    args += ["--steps", "1", "--height", "16", "--width", "16"]
    assert main(args) == 2
    assert "prompt too long" in capsys.readouterr().err and not (tmp_path / "o.png").exists()
    assert main([*args, "--truncate"]) == 0 and (tmp_path / "o.png").is_file()


def test_scheduler_flag_swaps_the_sampler(checkpoint, tmp_path):
    args = ["--steps", "2", "--height", "32", "--width", "32", "--seed", "1", "--out", str(tmp_path / "o.png")]
    assert main(["generate", "--checkpoint", str(checkpoint), "--prompt", "a dog", "--scheduler", "euler", *args]) == 0
    pipe = with_scheduler(FastComposerPipeline.from_pretrained(checkpoint), "euler")
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(
        "a dog", num_inference_steps=2, height=32, width=32, generator=torch.Generator().manual_seed(1)
    ).images[0]
    assert np.array_equal(np.asarray(PIL.Image.open(tmp_path / "o.png")), np.asarray(expected))
