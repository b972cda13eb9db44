"""Shared pieces of the reliability suite: a small annotated corpus, its uninterrupted build (the
reference every interrupted or contended build is compared with), and helpers to run the real
command in a subprocess, kill it, and compare datasets."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

SAMPLES_PER_SHARD = 2
# the command line of a build in a subprocess; DELAY seconds of sleep before each shard widen the
# window in which a second writer or a kill meets a build in the middle of its shards
BUILD_SCRIPT = """
import sys, time
import fc_pipeline.data.shards as shards
delay, write = float(sys.argv.pop(1)), shards._write_shard
shards._write_shard = lambda *args, **kwargs: (time.sleep(delay), write(*args, **kwargs))[1]
from fc_pipeline.cli import main
sys.exit(main(sys.argv[1:]))
"""


def subprocess_env() -> dict[str, str]:
    """The test session's environment (offline hubs), one thread per process on a shared machine."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def start_build(corpus: Path, out: Path, samples_per_shard: int = SAMPLES_PER_SHARD, delay: float = 0.0):
    """``fc-pipeline build-dataset`` in a subprocess (stdout/stderr piped)."""
    command = [sys.executable, "-c", BUILD_SCRIPT, str(delay), "build-dataset", str(corpus), "--out", str(out)]
    command += ["--samples-per-shard", str(samples_per_shard)]
    return subprocess.Popen(command, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def kill_when(process: subprocess.Popen, ready: Callable[[], bool], timeout: float = 120.0) -> bool:
    """SIGKILL ``process`` as soon as ``ready()`` holds; False when it exited first."""
    deadline = time.monotonic() + timeout
    while process.poll() is None:
        if ready():
            process.send_signal(signal.SIGKILL)
            process.wait()
            return True
        if time.monotonic() > deadline:
            process.kill()
            raise TimeoutError("the process never reached the kill point")
        time.sleep(0.005)
    return False


def temp_files(root: Path) -> list[Path]:
    """Leftovers of an interrupted write anywhere under ``root``."""
    return sorted(p for p in root.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".tmp-"))


def snapshot(out: Path) -> dict:
    """What a dataset folder holds, comparable between builds: each shard's bytes (sha256), each
    split's stats, the ledger rows (sorted) and every step table's ids."""
    import pyarrow.parquet as pq

    shards = out / "shards"
    return {
        "tars": {str(p.relative_to(shards)): _sha(p) for p in sorted(shards.glob("*/[0-9]*.tar"))},
        "sidecars": sorted(str(p.relative_to(shards)) for p in shards.glob("*/[0-9]*.parquet")),
        "stats": {p.parent.name: json.loads(p.read_text()) for p in sorted(shards.glob("*/_stats.json"))},
        "ledger": sorted(tuple(row.values()) for row in pq.read_table(shards / "failures.parquet").to_pylist()),
        "tables": {
            name: sorted(pq.read_table(out / f"{name}.parquet", columns=["id"]).column(0).to_pylist())
            for name in ("images", "captions", "segments", "phrases", "matches")
        },
    }


def sample_ids(out: Path) -> list[str]:
    """Every sample id in the shards of a dataset folder, in shard order (duplicates kept)."""
    import pyarrow.parquet as pq

    return [
        i for p in sorted((out / "shards").glob("*/[0-9]*.parquet")) for i in pq.read_table(p).column("id").to_pylist()
    ]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """The annotated scenes of the demo corpus (no captioner or segmenter needed), its corrupt file,
    a dangling symlink and a symlink loop named like images."""
    from fc_pipeline.data.demo_corpus import make_demo_corpus

    root = make_demo_corpus(tmp_path_factory.mktemp("corpus") / "c", n=24)
    for image in [p for p in root.iterdir() if p.suffix in (".jpg", ".png", ".webp") and ".panoptic" not in p.name]:
        if not image.with_name(image.stem + ".panoptic.json").exists() and image.name != "broken_upload.jpg":
            for path in root.glob(f"{image.stem}.*"):
                path.unlink()
    (root / "ghost.jpg").symlink_to(root / "deleted.jpg")
    (root / "loop_a.jpg").symlink_to(root / "loop_b.jpg")
    (root / "loop_b.jpg").symlink_to(root / "loop_a.jpg")
    return root


@pytest.fixture(scope="session")
def matcher():
    from fc_pipeline.data.matching import SubjectMatcher

    return SubjectMatcher("tiny")


@pytest.fixture(scope="session")
def reference(corpus, matcher, tmp_path_factory) -> tuple[Path, dict]:
    """An uninterrupted build of the corpus, alone: its folder and :func:`snapshot`."""
    from fc_pipeline.data.build import build_dataset

    out = tmp_path_factory.mktemp("reference")
    build_dataset(corpus, out, samples_per_shard=SAMPLES_PER_SHARD, matcher=matcher)
    return out, snapshot(out)


@pytest.fixture
def rebuild(corpus, matcher) -> Callable[[Path], dict]:
    """Build the corpus into ``out`` in this process, with the reference's settings."""
    from fc_pipeline.data.build import build_dataset

    return lambda out, **kw: build_dataset(corpus, out, samples_per_shard=SAMPLES_PER_SHARD, matcher=matcher, **kw)


@pytest.fixture
def one_thread():
    """Tiny models in this process on one thread (two spin on a shared 2-core machine)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
