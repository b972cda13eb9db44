"""Per-run Dagster work that should not grow with what is unchanged.

Prints one line: the seconds of one ``corpus_sensor`` tick over a corpus folder of ``--files``
files when nothing changed (and, for scale, the full stat walk a tick used to do), and the
seconds of a no-change re-materialisation of the six dataset assets and their checks on a
drawn corpus of ``--images`` images (every step ``cached``), next to the first build.

    python benchmarks/orchestration.py                 # 100 000 files, 10 000 images (tiny profile)
    python benchmarks/orchestration.py --dry-run       # small and quick: checks the code path
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import dagster as dg

import assets
from assets import checks, dataset
from assets.automation import corpus_sensor
from assets.resources import DatasetStore
from fc_pipeline.data.corpora import corpus_signature

DATASET = dataset.CHAIN
CHECKS = [checks.readable_images, checks.caption_non_empty_rate, checks.shards_readable, checks.samples_with_subjects]


def tick(store: DatasetStore, instance: dg.DagsterInstance, cursor: str | None):
    with dg.build_sensor_context(instance=instance, cursor=cursor, resources={"store": store}) as context:
        return corpus_sensor(context)


def sensor_seconds(root: Path, files: int) -> tuple[float, float, float]:
    """(first tick, idle tick, full stat walk) seconds over one corpus folder of ``files`` files."""
    store = DatasetStore(data_root=str(root))
    folder = store.corpora_dir / "big"
    folder.mkdir(parents=True)
    for number in range(files):
        (folder / f"{number:07d}.jpg").touch()
    with dg.instance_for_test() as instance:
        started = time.perf_counter()
        first = tick(store, instance, None)
        first_s = time.perf_counter() - started
        instance.add_dynamic_partitions("corpus", ["big"])
        started = time.perf_counter()
        idle = tick(store, instance, first.cursor)
        idle_s = time.perf_counter() - started
        assert not idle.run_requests, "an unchanged corpus must not request a run"
    started = time.perf_counter()
    corpus_signature(folder)
    return first_s, idle_s, time.perf_counter() - started


def materialize_seconds(root: Path, images: int) -> tuple[float, float, list[str]]:
    """(first build, no-change re-run) seconds of the dataset chain on a drawn corpus, and the statuses."""
    resources = {**assets.defs.resources, "store": DatasetStore(data_root=str(root))}
    run_config = {"ops": {"corpus_images": {"config": {"demo_images": images}}}}
    seconds, statuses = [], []
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("corpus", ["demo"])
        for _ in range(2):
            started = time.perf_counter()
            result = dg.materialize(
                DATASET + CHECKS, resources=resources, instance=instance, partition_key="demo", run_config=run_config
            )
            seconds.append(time.perf_counter() - started)
            assert result.success
        for asset in DATASET:
            (event,) = result.asset_materializations_for_node(asset.key.path[-1])
            status = event.metadata.get("status") or event.metadata.get("mode")
            statuses.append(f"{asset.key.path[-1]}={getattr(status, 'value', status)}")
    return seconds[0], seconds[1], statuses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--dry-run", action="store_true", help="small sizes, same code paths")
    args = parser.parse_args()
    if args.dry_run:
        args.files, args.images = 2_000, 8
    with tempfile.TemporaryDirectory() as tmp:
        first_tick, idle_tick, walk = sensor_seconds(Path(tmp) / "sensor", args.files)
        build, rerun, statuses = materialize_seconds(Path(tmp) / "chain", args.images)
    print(
        f"orchestration [tiny, CPU]: sensor tick over {args.files} files: idle {idle_tick * 1000:.1f} ms "
        f"(first {first_tick:.2f} s; a full stat walk {walk:.2f} s); "
        f"{args.images}-image partition: no-change re-materialisation {rerun:.1f} s vs first build {build:.1f} s "
        f"({rerun / build:.3f}×; {', '.join(statuses)})"
    )


if __name__ == "__main__":
    main()
