"""Orchestration and I/O overhead of the dataset chain, and the throughput of its models and loader.

Prints one line:

* chain ÷ bare forwards: the wall time of ``fc_pipeline.data.build.build_dataset`` (scan ->
  captions -> segments -> phrases -> matches -> shards, one process, models built beforehand) on
  a drawn demo corpus, over the time of the bare model calls that run made — BLIP-2
  ``generate``, Mask2Former ``forward``, OpenCLIP ``encode_image``/``encode_text``, SBERT
  ``encode`` and spaCy ``pipe`` — replayed on the very same inputs and batches. Chain runs (each
  into a fresh folder) and replays alternate, medians are compared. Everything else (image
  decoding and resizing, pre- and post-processing, crops, tables, PNG and tar writing) is the
  overhead; also images/s of every step;
* captioner and segmenter images/s at two batch sizes (``--size paper``: BLIP-2 OPT-6.7b and
  Mask2Former Swin-L architectures with random weights);
* training loader samples/s: ``TrainingSamples`` + ``DataLoader`` over the chain's shards.

    python benchmarks/dataset_chain.py                   # tiny models, 200 images, CPU
    python benchmarks/dataset_chain.py --size paper --device cuda --dtype bfloat16 --batch-sizes 8,32
    python benchmarks/dataset_chain.py --dry-run
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from common import DTYPES, SIZES, alternate, seconds, write_result  # benchmarks/common.py

from fc_pipeline.data.build import build_dataset
from fc_pipeline.data.captioning import Captioner
from fc_pipeline.data.demo_corpus import demo_scenes, draw_scene, make_demo_corpus
from fc_pipeline.data.matching import SubjectMatcher
from fc_pipeline.data.phrases import load_spacy
from fc_pipeline.data.segmentation import Segmenter
from fc_pipeline.data.shards import shard_urls
from fc_pipeline.profiles import TINY_CONFIGS, clip_tokenizer, get_profile, paper_config
from fc_pipeline.training.samples import SamplingConfig, TrainingSamples, collate_samples


def paper_dataset_configs() -> dict:
    """The paper's captioner and segmenter architectures (``fc_pipeline/configs/paper``: BLIP-2
    OPT-6.7b, Mask2Former Swin-L) in the form the random-model builders of the tiny profile take."""
    captioner, segmenter = paper_config("captioner"), paper_config("segmenter")
    preprocessor = segmenter.pop("_preprocessor")
    text = {k: v for k, v in captioner["text_config"].items() if not k.endswith(("_token_id", "vocab_size"))}
    return {
        "captioner": {
            "image_size": captioner["vision_config"]["image_size"],
            "num_query_tokens": captioner["num_query_tokens"],
            "vision_config": captioner["vision_config"],
            "qformer_config": captioner["qformer_config"],
            "text_config": text,  # the builder sizes the vocabulary to its offline tokenizer
        },
        "segmenter": {
            **{
                k: v
                for k, v in segmenter.items()
                if k not in ("architectures", "model_type", "id2label", "use_pretrained_backbone")
            },
            "labels": tuple(segmenter["id2label"].values()),
            "shortest_edge": preprocessor["shortest_edge"],
            "longest_edge": preprocessor["longest_edge"],
        },
    }


class Recorder:
    """Wraps the bare model calls of the chain's models, records their inputs, and replays them."""

    def __init__(self):
        self.calls: list[tuple] = []

    def wrap(self, owner, attribute: str) -> None:
        original = getattr(owner, attribute)

        def recorded(*args, **kwargs):
            args = tuple(list(a) if isinstance(a, Iterator) else a for a in args)  # spaCy gets a generator
            self.calls.append((original, args, kwargs))
            return original(*args, **kwargs)

        setattr(owner, attribute, recorded)

    def replay(self) -> None:
        with torch.inference_mode():
            for function, args, kwargs in self.calls:
                result = function(*args, **kwargs)
                if isinstance(result, Iterator):
                    list(result)


def chain_models(profile, device: str, dtype, recorder: Recorder) -> dict:
    """The chain's models, built once, their bare calls recorded."""
    captioner = Captioner(profile, device, dtype)
    segmenter = Segmenter(profile, device, dtype=dtype)
    matcher = SubjectMatcher(profile, device, dtype)
    recorder.wrap(captioner.model, "generate")
    recorder.wrap(segmenter.model, "forward")
    recorder.wrap(matcher.clip, "encode_image")
    recorder.wrap(matcher.clip, "encode_text")
    recorder.wrap(matcher.sbert, "encode")
    recorder.wrap(load_spacy(profile.spacy), "pipe")  # the process-wide spaCy that phrase_corpus loads
    return {"captioner": captioner, "segmenter": segmenter, "matcher": matcher}


def chain_overhead(args, work: Path) -> tuple[dict, Path]:
    """Chain and replay medians, images/s per step; and the shard folder of the last run."""
    profile = get_profile("tiny")
    corpus = make_demo_corpus(work / "corpus", args.images)
    recorder = Recorder()
    models = chain_models(profile, args.device, DTYPES[args.dtype], recorder)
    runs: list[dict] = []

    def chain():
        recorder.calls.clear()
        runs.append(build_dataset(corpus, work / f"run{len(runs)}", profile, device=args.device, **models))

    times = alternate({"chain": chain, "bare": recorder.replay}, args.repeats, args.device)
    step_seconds = {step: statistics.median(run["seconds"][step] for run in runs) for step in runs[0]["seconds"]}
    figures = {
        "images": args.images,
        "chain_s": times["chain"],
        "bare_forwards_s": times["bare"],
        "overhead_ratio": times["chain"] / times["bare"],
        "images_per_s": {step: args.images / max(value, 1e-9) for step, value in step_seconds.items()},
    }
    return figures, work / f"run{len(runs) - 1}" / "shards"


def model_throughput(args) -> dict:
    """Images/s of the captioner and the segmenter at each batch size (median of repeats)."""
    profile = get_profile("tiny")
    if args.size == "paper":
        profile = profile.override(tiny_configs={**TINY_CONFIGS, **paper_dataset_configs()})
    dtype = DTYPES[args.dtype]
    with torch.device(args.device):  # random weights initialise on the device (fast for 7B parameters)
        models = {
            "captioner": Captioner(profile, args.device, dtype),
            "segmenter": Segmenter(profile, args.device, dtype=dtype),
        }
    scenes = demo_scenes(max(args.batch_sizes) + 1)
    images = [draw_scene(scene, seed=k)[0] for k, scene in enumerate(scenes)]
    figures = {}
    for name, model in models.items():
        run = model.caption if name == "captioner" else model.segment
        for batch_size in args.batch_sizes:
            batch = images[:batch_size]
            run(batch)  # warm-up
            timings = [seconds(lambda run=run, batch=batch: run(batch), args.device) for _ in range(args.repeats)]
            median = statistics.median(timings)
            figures[f"{name}_b{batch_size}_images_per_s"] = batch_size / median
    del models
    return figures


def loader_throughput(args, shards: Path) -> dict:
    """Samples/s of the training loader over the chain's shards (after its first batch)."""
    dataset = TrainingSamples(
        shard_urls(shards, "train"),
        clip_tokenizer(get_profile("tiny")),
        SamplingConfig(resolution=args.loader_resolution, latent_scale=8 if args.loader_resolution >= 256 else 2),
    )
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=args.loader_batch_size, collate_fn=collate_samples, num_workers=args.loader_workers
    )
    batches = iter(loader)
    next(batches)  # worker start-up
    elapsed = seconds(lambda: [next(batches) for _ in range(args.loader_batches)], "cpu")
    return {"loader_samples_per_s": args.loader_batches * args.loader_batch_size / elapsed}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=200, help="demo corpus size for the chain [200]")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds [3]")
    parser.add_argument("--size", default="tiny", choices=SIZES, help="captioner/segmenter sizes [tiny]")
    parser.add_argument("--batch-sizes", default="4,16", help="captioner/segmenter batch sizes [4,16]")
    parser.add_argument("--loader-resolution", type=int, default=64, help="[64; the paper: 512]")
    parser.add_argument("--loader-batch-size", type=int, default=16, help="[16]")
    parser.add_argument("--loader-workers", type=int, default=0, help="DataLoader workers [0]")
    parser.add_argument("--loader-batches", type=int, default=10, help="timed batches [10]")
    parser.add_argument("--skip-chain", action="store_true", help="throughput only (the chain uses tiny models)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--threads", type=int, default=1, help="CPU threads [1]")
    parser.add_argument("--json", default=None, help="also merge the figures into this JSON file")
    parser.add_argument("--dry-run", action="store_true", help="12 images, batch sizes 1,2, one repeat")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.images, args.repeats, args.size, args.batch_sizes = 12, 1, "tiny", "1,2"
        args.loader_batch_size, args.loader_batches = 2, 2
    try:
        args.batch_sizes = sorted({int(size) for size in args.batch_sizes.split(",")})
    except ValueError:
        parser.error(f"--batch-sizes: expected comma-separated integers, got {args.batch_sizes!r}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    figures: dict = {"size": args.size, "device": args.device, "dtype": args.dtype}
    parts = []
    with tempfile.TemporaryDirectory(prefix="fc-chain-") as work:
        work = Path(work)
        if not args.skip_chain:
            chain, shards = chain_overhead(args, work)
            figures["chain"] = chain
            rates = ", ".join(f"{step} {rate:.0f}" for step, rate in chain["images_per_s"].items())
            parts.append(
                f"chain [{args.images} demo images, tiny models, {args.device}, {args.threads} thread(s), median of "
                f"{args.repeats}]: {chain['overhead_ratio']:.2f}x the bare model forwards ({chain['chain_s']:.2f} s "
                f"vs {chain['bare_forwards_s']:.2f} s); images/s: {rates}"
            )
            figures.update(loader_throughput(args, shards))
            parts.append(
                f"loader {figures['loader_samples_per_s']:.0f} samples/s ({args.loader_resolution}px, batch "
                f"{args.loader_batch_size}, {args.loader_workers} workers)"
            )
        throughput = model_throughput(args)
        figures["throughput"] = throughput
        parts.append(
            f"{args.size} captioner/segmenter [{args.device} {args.dtype}] images/s: "
            + ", ".join(f"{key.removesuffix('_images_per_s')} {value:.1f}" for key, value in throughput.items())
        )
    write_result(args.json, f"dataset_chain-{args.size}", "; ".join(parts), figures)


if __name__ == "__main__":
    main()
