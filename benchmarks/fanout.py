"""Fan-out inside one corpus: the dataset chain with K local workers vs one.

Builds the same drawn corpus twice through Dagster's ``build_dataset`` job with the multiprocess
executor: once with 1 chunk and 1 concurrent step, once with ``--workers`` chunks and as many
concurrent steps (each chunk a step of its own, as each would be a pod on Kubernetes). The CPU
cores are shared out (``OMP_NUM_THREADS`` = cores / workers per step process). Prints one line:
both wall times, the speedup, and whether the shards are byte-identical (same samples, metadata
and split).

    python benchmarks/fanout.py                  # 2 000 images, 2 workers (tiny profile)
    python benchmarks/fanout.py --dry-run        # small and quick: checks the code path
"""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("FC_PIPELINE_EXECUTOR", "multiprocess")  # read when the code location loads, here and in steps

import dagster as dg  # noqa: E402

import assets  # noqa: E402
from fc_pipeline.data.demo_corpus import make_demo_corpus  # noqa: E402

CORPUS = "bench"


def build_dataset_job() -> dg.JobDefinition:
    """The code location's ``build_dataset`` job (reconstructable: every step process loads it again)."""
    return assets.defs.resolve_job_def("build_dataset")


def build(source: Path, root: Path, workers: int, cores: int) -> float:
    """Seconds of one ``build_dataset`` run of ``source`` into ``root`` with ``workers`` chunks and steps at once."""
    os.environ["OMP_NUM_THREADS"] = str(max(1, cores // workers))  # each step process's share of the cores
    run_config = {
        "ops": {"corpus_images": {"config": {"source": str(source)}}},
        "resources": {"store": {"config": {"data_root": str(root), "chunks": workers}}},
        "execution": {"config": {"max_concurrent": workers}},  # forkserver start: assets.deployment
    }
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("corpus", [CORPUS])
        started = time.perf_counter()
        result = dg.execute_job(
            dg.reconstructable(build_dataset_job),
            instance,
            run_config=run_config,
            tags={"dagster/partition": CORPUS},
            raise_on_error=True,
        )
        seconds = time.perf_counter() - started
    assert result.success
    return seconds


def shard_digests(root: Path) -> dict[str, list[str]]:
    """sha256 of every shard tar and sidecar, per split (tar members carry no time, so equal data is equal bytes)."""
    shards = root / "datasets" / CORPUS / "shards"
    return {
        split.name: [hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(split.glob("[0-9]*.*"))]
        for split in sorted(shards.iterdir())
        if split.is_dir()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--dry-run", action="store_true", help="small sizes, same code paths")
    args = parser.parse_args()
    if args.dry_run:
        args.images = 24
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "corpus"
        make_demo_corpus(source, n=args.images)
        one = build(source, Path(tmp) / "one", 1, cores)
        many = build(source, Path(tmp) / "many", args.workers, cores)
        same = shard_digests(Path(tmp) / "one") == shard_digests(Path(tmp) / "many")
        samples = sum(len(v) for v in shard_digests(Path(tmp) / "one").values()) // 2
    print(
        f"fan-out [tiny, CPU, {cores} cores]: dataset chain on {args.images} images: 1 worker {one:.1f} s, "
        f"{args.workers} workers {many:.1f} s ({one / many:.2f}× faster); "
        f"shards identical: {'yes' if same else 'NO'} ({samples} shard(s))"
    )


if __name__ == "__main__":
    main()
