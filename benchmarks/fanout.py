"""Fan-out inside one corpus: the dataset chain with K local workers vs one.

Builds the same drawn corpus twice through Dagster's ``build_dataset`` job with the multiprocess
executor (:func:`assets.instance.build_corpus`, as ``fc-pipeline corpus backfill`` does): once with
1 chunk and 1 concurrent step, once with ``--workers`` chunks and as many concurrent steps (each
chunk a step of its own, as each would be a pod on Kubernetes). A worker is one core: every step
process computes with ``--threads`` threads (default 1; as one chunk is one GPU), so both builds
compute in the same float order and their shards can be compared byte for byte (with other thread
counts, scores differ in the 6th decimal; without ``OMP_NUM_THREADS`` the chunk steps share the
cores out themselves, :func:`assets.chunked.share_cores`). Each build runs in a fresh process (the executor's
forkserver lives as long as its process and keeps the thread setting it started with). Prints one
line: both wall times and the speedup, the same for the chunk phases alone (first chunk start to last chunk end of each
step, summed: the per-image work, without the fixed cost of starting the run and its ~26 step
processes), and whether the shards are byte-identical (same samples, metadata and split).

    python benchmarks/fanout.py                  # 2 000 images, 2 workers (tiny profile)
    python benchmarks/fanout.py --dry-run        # small and quick: checks the code path
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("FC_PIPELINE_EXECUTOR", "multiprocess")  # read when the code location loads, here and in steps

import dagster as dg  # noqa: E402

from assets.instance import build_corpus  # noqa: E402
from fc_pipeline.data.demo_corpus import make_demo_corpus  # noqa: E402

CORPUS = "bench"


def chunk_phases(instance: dg.DagsterInstance, run_id: str) -> float:
    """Seconds of the chunk phases of a run: per step, first chunk start to last chunk end, summed."""
    spans: dict[str, list[float]] = {}
    for entry in instance.all_logs(run_id):
        event = entry.dagster_event
        if event and "_chunk[" in (event.step_key or "") and event.event_type_value in ("STEP_START", "STEP_SUCCESS"):
            spans.setdefault(event.step_key.split(".")[0], []).append(entry.timestamp)
    return sum(max(times) - min(times) for times in spans.values())


def build(source: Path, root: Path, workers: int) -> tuple[float, float]:
    """(run, chunk phases) seconds of one ``build_dataset`` run of ``source`` into ``root`` with
    ``workers`` chunks and as many steps at once (in this process: run it in a fresh one)."""
    run_config = {
        "ops": {"corpus_images": {"config": {"source": str(source)}}},
        "resources": {"store": {"config": {"data_root": str(root)}}},
    }
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("corpus", [CORPUS])
        started = time.perf_counter()
        result = build_corpus(instance, CORPUS, chunks=workers, workers=workers, run_config=run_config)
        seconds = time.perf_counter() - started
        assert result.success
        return seconds, chunk_phases(instance, result.run_id)


def shard_digests(root: Path) -> dict[str, list[str]]:
    """sha256 of every shard tar and sidecar, per split (tar members carry no time, so equal data is equal bytes)."""
    shards = root / "datasets" / CORPUS / "shards"
    return {
        split.name: [hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(split.glob("[0-9]*.*"))]
        for split in sorted(shards.iterdir())
        if split.is_dir()
    }


def build_in_a_fresh_process(source: Path, root: Path, workers: int, threads: int) -> tuple[float, float]:
    """:func:`build` in a new interpreter whose step processes compute with ``threads`` threads."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    command = [sys.executable, __file__, "--build", str(workers), "--source", str(source), "--root", str(root)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"the {workers}-worker build failed:\n{done.stderr[-3000:]}")
    seconds, chunks = json.loads(done.stdout.strip().splitlines()[-1])
    return seconds, chunks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="threads of each step process (default 1)")
    parser.add_argument("--dry-run", action="store_true", help="small sizes, same code paths")
    parser.add_argument("--build", type=int, help=argparse.SUPPRESS)  # one build, in the process the main one starts
    parser.add_argument("--source", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build:
        print(json.dumps(build(args.source, args.root, args.build)))
        return
    if args.dry_run:
        args.images = 24
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "corpus"
        make_demo_corpus(source, n=args.images)
        one, one_chunks = build_in_a_fresh_process(source, Path(tmp) / "one", 1, args.threads)
        many, many_chunks = build_in_a_fresh_process(source, Path(tmp) / "many", args.workers, args.threads)
        same = shard_digests(Path(tmp) / "one") == shard_digests(Path(tmp) / "many")
        samples = sum(len(v) for v in shard_digests(Path(tmp) / "one").values()) // 2
    print(
        f"fan-out [tiny, CPU, {cores} cores, {args.threads} thread(s) per step]: chain on {args.images} images: "
        f"1 worker {one:.1f} s, "
        f"{args.workers} workers {many:.1f} s ({one / many:.2f}× faster); chunk phases {one_chunks:.1f} s vs "
        f"{many_chunks:.1f} s ({one_chunks / many_chunks:.2f}×); "
        f"shards identical: {'yes' if same else 'NO'} ({samples} shard(s))"
    )


if __name__ == "__main__":
    main()
