"""Training loader throughput: does rank 0 keep its pace as the world grows?

Prints one line: rank 0's samples/s at simulated world sizes 1, 8 and 64 (the other ranks are
not run; rank 0 reads only what it owns) and their ratio to world size 1 (goal ≥ 0.9), the same
with fewer shards than streams (raw-member split), and the reader's samples/s ÷ the samples/s a
tiny-profile training step consumes (goal ≥ 10).

    python benchmarks/loader.py                  # 128 shards × 16 samples of 256×256 images
    python benchmarks/loader.py --dry-run        # small and quick: checks the code path
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from fc_pipeline.data.shards import shard_urls
from fc_pipeline.data.synthetic import write_synthetic_shards
from fc_pipeline.profiles import clip_tokenizer, get_profile
from fc_pipeline.training.samples import SamplingConfig, TrainingSamples
from fc_pipeline.training.train import TINY_PRESET, TrainConfig, train


def rank0_rate(urls: list[str], tokenizer, config: SamplingConfig, world_size: int, samples: int) -> float:
    """Samples per second rank 0 of ``world_size`` delivers (one process, no DataLoader workers)."""
    stream = iter(TrainingSamples(urls, tokenizer, config, rank=0, world_size=world_size))
    next(stream)  # open the first shard
    started = time.perf_counter()
    for _ in range(samples):
        next(stream)
    return samples / (time.perf_counter() - started)


def training_rate(directory: Path, steps: int) -> float:
    """Samples per second the tiny profile's training loop consumes (its preset batch, CPU)."""
    with tempfile.TemporaryDirectory() as out:
        config = TrainConfig.tiny(str(directory), out, max_steps=steps, checkpoint_every=steps, progress=False)
        history = train(config).history
    warm = len(history) // 3  # the first steps build caches
    seconds = history[-1]["elapsed_s"] - history[warm]["elapsed_s"]
    return (len(history) - 1 - warm) * TINY_PRESET["train_batch_size"] / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=128, help="shards of the whole-shard case (≥ 64)")
    parser.add_argument("--per-shard", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--samples", type=int, default=96, help="samples timed per world size")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train-steps", type=int, default=9)
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes, same code paths")
    args = parser.parse_args()
    if args.dry_run:
        args.shards, args.per_shard, args.image_size, args.samples, args.repeats, args.train_steps = 64, 2, 64, 8, 1, 3
    torch.set_num_threads(1)
    profile = get_profile("tiny")
    tokenizer = clip_tokenizer(profile)
    config = SamplingConfig(resolution=TINY_PRESET["resolution"])
    worlds = (1, 8, 64)
    with tempfile.TemporaryDirectory() as tmp:
        size = (args.image_size, args.image_size)
        many = write_synthetic_shards(Path(tmp) / "many", args.shards * args.per_shard, args.per_shard, size)
        # the same number of samples in 4 shards: fewer shards than 8 or 64 streams
        few = write_synthetic_shards(
            Path(tmp) / "few", args.shards * args.per_shard, -(-args.shards // 4) * args.per_shard, size
        )
        rates: dict[str, dict[int, list[float]]] = {
            "shards": {w: [] for w in worlds},
            "members": {w: [] for w in worlds},
        }
        for _ in range(args.repeats):  # interleaved, so drifting machine load hits every case alike
            for case, directory in (("shards", many), ("members", few)):
                for world in worlds:
                    urls = shard_urls(directory, "train")
                    rates[case][world].append(rank0_rate(urls, tokenizer, config, world, args.samples))
        consumed = training_rate(many, args.train_steps)
    median = {case: {w: statistics.median(r) for w, r in by_world.items()} for case, by_world in rates.items()}
    whole, members = median["shards"], median["members"]
    print(
        f"loader [tiny, CPU 1 thread, {args.shards}×{args.per_shard} samples of {args.image_size}px]: "
        f"rank 0 samples/s at world 1/8/64 = {whole[1]:.0f}/{whole[8]:.0f}/{whole[64]:.0f} "
        f"(ratio to world 1: {whole[8] / whole[1]:.2f}× at 8, {whole[64] / whole[1]:.2f}× at 64; goal ≥ 0.9); "
        f"4 shards (raw-member split): {members[1]:.0f}/{members[8]:.0f}/{members[64]:.0f} "
        f"({members[8] / members[1]:.2f}×, {members[64] / members[1]:.2f}×); "
        f"reader ÷ training consumption = {whole[1]:.0f} / {consumed:.1f} = {whole[1] / consumed:.0f}× (goal ≥ 10)"
    )


if __name__ == "__main__":
    main()
