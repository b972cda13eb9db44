"""The benchmarks run end to end: ``benchmarks/gpu.sh --dry-run`` runs every script's ``--dry-run``
(tiny sizes on the CPU, the GPU run's code paths) and writes one results JSON and README rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import inference  # noqa: E402  (benchmarks/ is a folder of scripts)
import rows  # noqa: E402


def test_dry_run_presets():
    args = inference.parse_args(["--dry-run", "--size", "paper", "--steps", "50"])
    assert (args.size, args.steps, args.repeats, args.dreambooth) == ("tiny", 2, 1, "measure")
    assert args.variants == set(inference.VARIANTS)
    assert inference.parse_args(["--size", "paper"]).dreambooth == "derive"
    with pytest.raises(SystemExit):
        inference.parse_args(["--variants", "turbo"])


def test_rows(tmp_path):
    entry = {"line": "train step [...]: time 1.000x", "machine": "NVIDIA H200", "date": "2026-12-01", "torch": "2.9"}
    (tmp_path / "r.json").write_text(json.dumps({"train_step-paper": entry}))
    assert rows.rows({"train_step-paper": entry}) == [
        "| `train_step-paper` | NVIDIA H200, 2026-12-01, torch 2.9 | train step [...]: time 1.000x |"
    ]


@pytest.mark.slow
def test_gpu_script_dry_run(tmp_path):
    env = {**os.environ, "BENCHMARK_RESULTS": str(tmp_path), "PYTHON": sys.executable}
    done = subprocess.run(
        ["bash", str(BENCHMARKS / "gpu.sh"), "--dry-run"], capture_output=True, text=True, env=env, timeout=1500
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (results,) = tmp_path.glob("dry-run-*.json")
    figures = json.loads(results.read_text())
    assert set(figures) == {
        "inference-tiny-" + "-".join(sorted(inference.VARIANTS)),
        "train_step-tiny",
        "dataset_chain-tiny",
    }
    run = figures["inference-tiny-" + "-".join(sorted(inference.VARIANTS))]
    assert set(run["variants"]) == {"baseline", *inference.VARIANTS}
    assert all(0.2 < v["time_ratio"] < 5 for v in run["variants"].values())
    assert run["personalisation"]["ratio"] > 1 and run["personalisation"]["mode"] == "measure"
    assert 1.0 < run["variants"]["baseline"]["memory_ratio"] < 1.2  # image encoder + fuser on top of SD
    train = figures["train_step-tiny"]
    assert train["fc_bytes"] > train["sd_bytes"] and 0.3 < train["time_ratio"] < 3
    chain = figures["dataset_chain-tiny"]
    assert chain["chain"]["overhead_ratio"] > 1 and chain["loader_samples_per_s"] > 0
    assert set(chain["throughput"]) == {f"{m}_b{b}_images_per_s" for m in ("captioner", "segmenter") for b in (1, 2)}
    printed = done.stdout.splitlines()
    assert "| benchmark | machine, date | measured |" in printed
    assert sum(line.startswith("| `") for line in printed) == 3


@pytest.mark.slow
@pytest.mark.parametrize("script", ["fanout.py", "orchestration.py"])
def test_dataset_scale_benchmarks_dry_run(script):
    """The fan-out and orchestration benchmarks on small sizes: one line, with what the README quotes."""
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--dry-run"], capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (line,) = [
        line
        for line in done.stdout.splitlines()
        if line.startswith(script.removesuffix(".py").replace("fanout", "fan-out"))
    ]
    if script == "fanout.py":
        assert "2 workers" in line and "shards identical: yes" in line
    else:
        assert "no-change re-materialisation" in line and "captions=cached" in line
