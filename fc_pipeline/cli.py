"""The ``fc-pipeline`` command: build-dataset, train, generate, evaluate, demo.

Each sub-command is one ``_add_<name>`` (arguments) and one ``_run_<name>`` (a call into the
library). Heavy imports happen inside the run functions so ``--help`` stays instant.
"""

from __future__ import annotations

import argparse
import sys


# --- demo (owner: Dagster/demo) -------------------------------------------------------------
def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="materialise the whole Dagster asset chain on the tiny profile")
    p.add_argument("--data-root", help="where corpora and datasets go (default: $FC_PIPELINE_DATA or <repo>/data)")
    p.add_argument("--dagster-home", help="Dagster instance directory (default: <repo>/.dagster_home)")
    p.add_argument("--images", type=int, help="size of the drawn demo corpus (default 24)")
    p.add_argument("--select", nargs="+", metavar="ASSET", help="materialise only these assets (default: all)")
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from fc_pipeline.demo import run_demo

    summary = run_demo(args.data_root, args.dagster_home, demo_images=args.images, selection=args.select)
    print(summary.report())
    return 0 if summary.success else 1


# --- build-dataset (owner: data) ------------------------------------------------------------
def _add_build_dataset(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("build-dataset", help="corpus -> captions -> segments -> phrases -> matches -> shards")
    p.set_defaults(func=_run_build_dataset)


def _run_build_dataset(args: argparse.Namespace) -> int:
    raise SystemExit("build-dataset: not implemented yet")


# --- train (owner: model) -------------------------------------------------------------------
def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a FastComposer checkpoint from webdataset shards")
    p.set_defaults(func=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    raise SystemExit("train: not implemented yet")


# --- generate (owner: pipeline) -------------------------------------------------------------
def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="generate images of several subjects, one photo each",
        description="Generate images from a FastComposer checkpoint. Mark each subject in the prompt with "
        "<|image|> right after its noun and give one --subject photo per marker, in the same order.",
        epilog='example: fc-pipeline generate --checkpoint ckpt --prompt "a man <|image|> and a woman <|image|> '
        'on the beach" --subject a.jpg --subject b.jpg --alpha 0.7 --steps 50 --seed 0 --out out.png\n'
        "batch: fc-pipeline generate --checkpoint ckpt --jobs jobs.jsonl   (one JSON object per line with "
        "prompt, out (both required), subjects, seed, alpha, steps, guidance_scale, negative_prompt, num_images, height, width, "
        "save_attention; missing fields take the command-line values, paths are relative to the jsonl file)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="checkpoint directory (FastComposerPipeline.save_pretrained)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help='the prompt, e.g. "a man <|image|> and a woman <|image|> on the beach"')
    what.add_argument("--jobs", metavar="JSONL", help="a jsonl file of jobs to run with one loaded model")
    p.add_argument("--subject", action="append", default=[], metavar="IMAGE", help="reference photo of the next subject (repeat per marker)")
    p.add_argument("--out", default="out.png", help="output image (.png/.jpg/.webp; several images get _0, _1, ...) [%(default)s]")
    p.add_argument("--alpha", type=float, default=0.7, help="fraction of the steps, at the end, conditioned on the subjects [%(default)s]")
    p.add_argument("--steps", type=int, default=50, help="denoising steps [%(default)s]")
    p.add_argument("--guidance-scale", type=float, default=5.0, help="classifier-free guidance scale [%(default)s]")
    p.add_argument("--negative-prompt", default=None, help="what the image should not show")
    p.add_argument("--seed", type=int, default=0, help="random seed [%(default)s]")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt [%(default)s]")
    p.add_argument("--height", type=int, default=None, help="image height (default: the model's resolution)")
    p.add_argument("--width", type=int, default=None, help="image width (default: the model's resolution)")
    p.add_argument("--device", default=None, help="torch device [cuda if available, else cpu]")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="model dtype [%(default)s]")
    p.add_argument("--save-attention", action="store_true", help="also write <out>.attention.png/.npy: the subject tokens' attention maps")
    p.set_defaults(func=_run_generate)


def _run_generate(args: argparse.Namespace) -> int:
    import torch

    from fc_pipeline.generation import JobError, load_pipeline, load_subject_images, make_job, read_jobs, run_job

    settings = dict(
        seed=args.seed, alpha=args.alpha, steps=args.steps, guidance_scale=args.guidance_scale,
        negative_prompt=args.negative_prompt, num_images=args.num_images, height=args.height,
        width=args.width, save_attention=args.save_attention,
    )  # fmt: skip
    try:
        if args.jobs:
            if args.subject:
                raise JobError("--subject goes with --prompt; give each job's 'subjects' in the jsonl file")
            jobs = read_jobs(args.jobs, settings)
        else:
            jobs = [make_job({"prompt": args.prompt, "subjects": args.subject, "out": args.out, **settings})]
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        pipeline = load_pipeline(args.checkpoint, device=device, dtype=args.dtype)
        subject_images = [load_subject_images(job, pipeline) for job in jobs]
    except JobError as exc:
        print(f"fc-pipeline generate: error: {exc}", file=sys.stderr)
        return 2
    for number, (job, images) in enumerate(zip(jobs, subject_images), start=1):
        for path in run_job(pipeline, job, images):
            print(f"[{number}/{len(jobs)}] wrote {path}")
    return 0


# --- evaluate (owner: evaluation) -----------------------------------------------------------
def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="identity preservation and prompt consistency of a checkpoint")
    p.set_defaults(func=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> int:
    raise SystemExit("evaluate: not implemented yet")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``fc-pipeline`` (all sub-commands)."""
    parser = argparse.ArgumentParser(
        prog="fc-pipeline",
        description="FastComposer: tuning-free multi-subject personalised text-to-image generation.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_demo, _add_build_dataset, _add_train, _add_generate, _add_evaluate):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fc-pipeline`` console script."""
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
