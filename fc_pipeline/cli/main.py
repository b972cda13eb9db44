"""The ``fc-pipeline`` command: demo, instance, corpus, build-dataset, train, generate, evaluate.

Each sub-command is one ``_add_<name>`` (arguments) and one ``_run_<name>`` (a call into the
library). Heavy imports happen inside the run functions so ``--help`` stays instant.
"""

from __future__ import annotations

import argparse
import os
import sys

from fc_pipeline.checkpoints import UnsafeCheckpointError
from fc_pipeline.schedulers import SCHEDULERS
from fc_pipeline.settings import DTYPE_NAMES, SettingError, add_arguments, given, resolve_device


class _Parser(argparse.ArgumentParser):
    """A sub-command parser that adds its settings flags (``defer``) only when it is used: they come
    from settings dataclasses in modules that import torch, and ``fc-pipeline --help`` should not."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._deferred = []

    def defer(self, add) -> None:
        self._deferred.append(add)

    def _complete(self) -> None:
        while self._deferred:
            self._deferred.pop(0)(self)

    def parse_known_args(self, args=None, namespace=None):
        self._complete()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self._complete()
        return super().format_help()


# --- demo ---
def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="materialise the whole Dagster asset chain on the tiny profile")
    p.add_argument("--data-root", help="where corpora and datasets go (default: $FC_PIPELINE_DATA or <repo>/data)")
    p.add_argument("--dagster-home", help="Dagster instance directory (default: <repo>/.dagster_home)")
    p.add_argument("--images", type=int, help="size of the drawn demo corpus (default 24)")
    p.add_argument("--select", nargs="+", metavar="ASSET", help="materialise only these assets (default: all)")
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from assets.demo_run import run_demo

    summary = run_demo(args.data_root, args.dagster_home, demo_images=args.images, selection=args.select)
    print(summary.describe())
    return 0 if summary.success else 1


# --- instance ---
def _add_instance(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("instance", help="set up the Dagster instance dir (dagster.yaml, gpu pool = number of GPUs)")
    p.add_argument("--dagster-home", help="instance directory (default: $DAGSTER_HOME or <repo>/.dagster_home)")
    p.set_defaults(func=_run_instance)


def _run_instance(args: argparse.Namespace) -> int:
    from assets.instance import prepare_dagster_home

    print(prepare_dagster_home(args.dagster_home))
    return 0


# --- corpus ---
def _add_corpus(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("corpus", help="the registered corpora (Dagster `corpus` partitions) of an instance")
    p.add_argument(
        "action",
        choices=("add", "list", "failed", "backfill"),
        help="add NAME...: register corpora; list: all; failed: those whose last dataset build failed; "
        "backfill NAME...: build their datasets now (a build_dataset run each, in this process)",
    )
    p.add_argument("names", nargs="*", help="corpus names (for add and backfill)")
    p.add_argument("--dagster-home", help="instance directory (default: $DAGSTER_HOME or <repo>/.dagster_home)")
    p.add_argument("--sep", default=",", help="separator of the printed names (default ',' as `--partitions` takes)")
    p.add_argument(
        "--chunks",
        type=int,
        help="backfill: split each per-image step into this many chunks, each a step of its own (a GPU or pod "
        "each); default: the code location's ($FC_PIPELINE_CHUNKS or 1)",
    )
    p.add_argument(
        "--workers",
        type=int,
        help="backfill: run up to this many steps at once on this machine (one process each, sharing the "
        "cores; sets FC_PIPELINE_EXECUTOR=multiprocess unless it is set)",
    )
    p.set_defaults(func=_run_corpus)


def _run_corpus(args: argparse.Namespace) -> int:
    if args.action != "backfill" and (args.chunks is not None or args.workers is not None):
        raise SystemExit(f"corpus {args.action}: --chunks and --workers are for backfill")
    if args.action == "backfill":
        return _backfill(args)
    from assets.instance import failed_corpora, register_corpora, registered_corpora

    if args.action == "add":
        if not args.names:
            raise SystemExit("corpus add: name at least one corpus")
        try:
            new = register_corpora(args.names, args.dagster_home)
        except ValueError as exc:
            raise SystemExit(f"corpus add: {exc}") from None
        print(f"registered: {', '.join(new) or 'nothing new'}", file=sys.stderr)
        return 0
    if args.names:
        raise SystemExit(f"corpus {args.action}: takes no names")
    names = registered_corpora(args.dagster_home) if args.action == "list" else failed_corpora(args.dagster_home)
    print(args.sep.join(names))
    return 0


def _backfill(args: argparse.Namespace) -> int:
    if not args.names:
        raise SystemExit("corpus backfill: name at least one corpus")
    if args.workers is not None and args.workers < 1:
        raise SystemExit("corpus backfill: --workers must be at least 1")
    if args.workers is not None:
        os.environ.setdefault("FC_PIPELINE_EXECUTOR", "multiprocess")  # read when the code location loads
    import dagster as dg

    from assets.instance import GPU_POOL, build_corpus, dagster_home, register_corpora
    from fc_pipeline.data.chunks import check_chunks

    try:
        if args.chunks is not None:
            check_chunks(args.chunks)
        register_corpora(args.names, args.dagster_home)
    except ValueError as exc:
        raise SystemExit(f"corpus backfill: {exc}") from None
    failed = []
    with dg.DagsterInstance.from_config(str(dagster_home(args.dagster_home))) as instance:
        slots = instance.event_log_storage.get_concurrency_info(GPU_POOL).slot_count
        if (args.workers or 1) > slots:
            print(
                f"note: the {GPU_POOL!r} pool of this instance admits {slots} step(s) at a time, so the chunks of the "
                f"model steps wait for a slot (more: `dagster instance concurrency set {GPU_POOL} N`)",
                file=sys.stderr,
            )
        for corpus in dict.fromkeys(args.names):
            try:
                result = build_corpus(instance, corpus, chunks=args.chunks, workers=args.workers)
            except ValueError as exc:
                raise SystemExit(f"corpus backfill: {exc}") from None
            print(f"{corpus}: run {result.run_id} {'succeeded' if result.success else 'FAILED'}", file=sys.stderr)
            for event in result.get_asset_materialization_events():
                metadata = event.step_materialization_data.materialization.metadata
                counts = ", ".join(
                    f"{key} {metadata[key].value}"
                    for key in ("status", "rows", "computed", "chunks")
                    if key in metadata
                )
                print(f"  {event.asset_key.to_user_string()}: {counts}", file=sys.stderr)
            if not result.success:
                failed.append(corpus)
    if failed:
        print(
            f"failed: {', '.join(failed)} (the run's events: dagster UI, or `fc-pipeline corpus failed`)",
            file=sys.stderr,
        )
    return 1 if failed else 0


# --- build-dataset ---
def _add_build_dataset(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("build-dataset", help="corpus -> captions -> segments -> phrases -> matches -> shards")
    p.add_argument("source", help="corpus folder, or a parquet/jsonl manifest with a 'path' column")
    p.add_argument("--out", required=True, help="output folder (intermediate parquet files and shards/)")
    p.add_argument("--profile", default="tiny", help="model profile: tiny (offline, random) or paper")
    p.add_argument("--device", default="auto", help="torch device for the models (auto, cpu, cuda, cuda:1, ...)")
    p.add_argument("--dtype", choices=DTYPE_NAMES, help="model dtype (default float32)")
    p.defer(_add_dataset_settings)
    p.set_defaults(func=_run_build_dataset, parser=p)


def _add_dataset_settings(p: argparse.ArgumentParser) -> None:
    from fc_pipeline.data.settings import DatasetSettings

    p.set_defaults(flags=add_arguments(p, DatasetSettings))


def _run_build_dataset(args: argparse.Namespace) -> int:
    from fc_pipeline.data.build import build_dataset
    from fc_pipeline.data.settings import DatasetSettings
    from fc_pipeline.locks import WriterLockHeld

    settings = DatasetSettings(**given(args, DatasetSettings, args.flags))
    try:
        stats = build_dataset(
            args.source, args.out, args.profile, device=resolve_device(args.device), dtype=args.dtype, settings=settings
        )
    except (ValueError, FileNotFoundError) as exc:  # a bad corpus, manifest or option
        print(f"build-dataset: {exc}", file=sys.stderr)
        return 2
    except (WriterLockHeld, OSError) as exc:  # another writer, a full or read-only disk
        print(f"build-dataset: {exc}", file=sys.stderr)
        return 1
    splits = ", ".join(f"{name} {s['samples']} in {len(s['shards'])} shard(s)" for name, s in stats["splits"].items())
    print(f"images in: {stats['images']}  samples out: {stats['samples']} ({splits})")
    print(f"subjects per sample: {stats['subjects_histogram']}")
    print(f"failures by reason: {stats['failures'] or 'none'} (ledger: {stats['paths']['failures']})")
    print(f"shards: {stats['paths']['out_dir']}")
    return 0


# --- train ---
def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a FastComposer checkpoint from webdataset shards",
        description="Train (or resume) FastComposer. Options given on the command line override --config / --preset; "
        "the rest are the paper's defaults. One flag per fc_pipeline.training.train.TrainConfig field. "
        "Several GPUs: accelerate launch -m fc_pipeline.training.train --config cfg.json",
    )
    p.add_argument("--config", metavar="JSON", help="a JSON file of fc_pipeline.training.train.TrainConfig fields")
    p.add_argument(
        "--shards",
        metavar="DIR",
        nargs="+",
        help="dataset directories with train/*.tar (or .tar URLs); several train on all of them",
    )
    p.add_argument("--out", metavar="DIR", help="run directory: checkpoints, metrics.jsonl, metrics.json")
    p.defer(_add_train_settings)
    p.set_defaults(func=_run_train, parser=p)


def _add_train_settings(p: argparse.ArgumentParser) -> None:
    from fc_pipeline.training.train import TINY_PRESET, TrainConfig

    preset = ", ".join(f"{k} {v}" for k, v in TINY_PRESET.items())
    p.add_argument("--preset", choices=["tiny"], help=f"tiny: the CPU demo ({preset})")
    aliases = {"train_batch_size": "--batch-size", "learning_rate": "--lr"}
    p.set_defaults(flags=add_arguments(p, TrainConfig, exclude=("shards", "output_dir"), aliases=aliases))


def _run_train(args: argparse.Namespace) -> int:
    import dataclasses

    from fc_pipeline.locks import WriterLockHeld
    from fc_pipeline.training.train import TrainConfig, train

    overrides = given(args, TrainConfig, args.flags)
    if args.shards is not None:
        overrides["shards"] = args.shards[0] if len(args.shards) == 1 else args.shards
    if args.out is not None:
        overrides["output_dir"] = args.out
    if not args.config and ("shards" not in overrides or "output_dir" not in overrides):
        args.parser.error("give --shards and --out (or --config)")
    try:
        if args.config:
            config = dataclasses.replace(TrainConfig.from_json(args.config), **overrides)
        else:
            config = TrainConfig.tiny(**overrides) if args.preset == "tiny" else TrainConfig(**overrides)
        result = train(config, log=lambda message: print(message, file=sys.stderr, flush=True))
    except SettingError:
        raise
    except (ValueError, OSError, WriterLockHeld) as exc:  # bad input, a full or read-only disk, a held run folder
        raise SystemExit(f"train: {exc}") from None
    print(f"{result.steps} steps: loss {result.loss:.4f} (L_noise {result.l_noise:.4f}, L_loc {result.l_loc:.4g})")
    print(f"checkpoint: {result.checkpoint}")
    return 0


# --- generate ---
def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="generate images of several subjects, one photo each",
        description="Generate images from a FastComposer checkpoint. Mark each subject in the prompt with "
        "<|image|> right after its noun and give one --subject photo per marker, in the same order.",
        epilog='example: fc-pipeline generate --checkpoint ckpt --prompt "a man <|image|> and a woman <|image|> '
        'on the beach" --subject a.jpg --subject b.jpg --alpha 0.7 --steps 50 --seed 0 --out out.png\n'
        "batch: fc-pipeline generate --checkpoint ckpt --jobs jobs.jsonl   (one JSON object per line with "
        "prompt and out (both required), subjects, and any sampling setting below by its field name, e.g. "
        "guidance_scale; missing fields take the command-line values, paths are relative to the jsonl file)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--checkpoint", required=True, metavar="DIR", help="checkpoint directory (FastComposerPipeline.save_pretrained)"
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help='the prompt, e.g. "a man <|image|> and a woman <|image|> on the beach"')
    what.add_argument("--jobs", metavar="JSONL", help="a jsonl file of jobs to run with one loaded model")
    p.add_argument(
        "--subject",
        action="append",
        default=[],
        metavar="IMAGE",
        help="reference photo of the next subject (repeat per marker)",
    )
    p.add_argument(
        "--out", default="out.png", help="output image (.png/.jpg/.webp; several images get _0, _1, ...) [%(default)s]"
    )
    p.add_argument("--device", default=None, help="torch device [cuda if available, else cpu]")
    p.add_argument("--dtype", default="float32", choices=DTYPE_NAMES, help="model dtype [%(default)s]")
    p.add_argument("--offload", action="store_true", help="model CPU offload: each model on the GPU only while it runs")
    p.add_argument("--channels-last", action="store_true", help="UNet in channels-last memory format")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet (the first image pays for it)")
    p.add_argument(
        "--scheduler",
        metavar="NAME",
        help=f"sampler: {', '.join(SCHEDULERS)} or a diffusers scheduler class "
        "(default: the checkpoint's; checkpoints ship SD 1.5's PNDM)",
    )
    p.defer(_add_generation_settings)
    p.set_defaults(func=_run_generate)


def _add_generation_settings(p: argparse.ArgumentParser) -> None:
    from fc_pipeline.cli.generation import GenerationJob

    p.set_defaults(flags=add_arguments(p, GenerationJob, exclude=("prompt", "out", "subjects")))


def _run_generate(args: argparse.Namespace) -> int:
    from fc_pipeline.cli.generation import (
        GenerationJob,
        JobError,
        load_pipeline,
        load_subject_images,
        make_job,
        read_jobs,
        run_job,
    )

    settings = given(args, GenerationJob, args.flags)
    try:
        if args.jobs:
            if args.subject:
                raise JobError("--subject goes with --prompt; give each job's 'subjects' in the jsonl file")
            jobs = read_jobs(args.jobs, settings)
        else:
            jobs = [make_job({"prompt": args.prompt, "subjects": args.subject, "out": args.out, **settings})]
        device = resolve_device(args.device)
        pipeline = load_pipeline(
            args.checkpoint,
            device=device,
            dtype=args.dtype,
            offload=args.offload,
            channels_last=args.channels_last,
            compile=args.compile,
            scheduler=args.scheduler,
        )
        subject_images = [load_subject_images(job, pipeline) for job in jobs]
    except JobError as exc:
        print(f"fc-pipeline generate: error: {exc}", file=sys.stderr)
        return 2
    for number, (job, images) in enumerate(zip(jobs, subject_images), start=1):
        for path in run_job(pipeline, job, images):
            print(f"[{number}/{len(jobs)}] wrote {path}")
    return 0


# --- evaluate ---
def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="identity preservation and prompt consistency of a checkpoint")
    p.add_argument(
        "--checkpoint",
        required=True,
        action="append",
        metavar="DIR",
        help="checkpoint directory, or package.module:factory building another pipeline to score under the same "
        "protocol; repeat to compare (e.g. with and without L_loc)",
    )
    p.add_argument(
        "--subjects",
        metavar="DIR",
        help="one sub-folder of reference photos per identity "
        "(default: a two-identity set from package-bundled photos)",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="report directory")
    p.add_argument("--multi", action="store_true", help="two-subject prompts over all pairs of subjects")
    p.add_argument("--alpha-sweep", action="store_true", help="the paper's sweep: α = 0, 0.2, ..., 1")
    p.add_argument("--resolution", type=int, metavar="N", help="image size in pixels: --height and --width")
    p.defer(_add_evaluation_settings)
    p.add_argument(
        "--profile",
        default="paper",
        choices=["paper", "tiny"],
        help="scorers: paper (CLIP ViT-L/14 + vggface2 FaceNet, local files) or tiny (offline FaceNet and a random "
        "CLIP: prompt consistency marked 'random scorer — not meaningful') [%(default)s]",
    )
    p.add_argument("--prompt-clip", metavar="ID|DIR", help="prompt-consistency CLIP (default: the profile's)")
    p.add_argument(
        "--facenet",
        metavar="NAME|FILE",
        help="vggface2, casia-webface-opencv or a weights file (default: the profile's)",
    )
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.set_defaults(func=_run_evaluate, parser=p)


def _add_evaluation_settings(p: argparse.ArgumentParser) -> None:
    from fc_pipeline.evaluation import EvaluationConfig

    aliases = {"prompt_sets": "--prompt-set", "alphas": "--alpha", "num_inference_steps": "--steps"}
    p.set_defaults(flags=add_arguments(p, EvaluationConfig, aliases=aliases))
    p.add_argument(
        "--no-baseline", dest="text_only_baseline", action="store_false", help="same as --no-text-only-baseline"
    )


def _run_evaluate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fc_pipeline.evaluation import PAPER_ALPHA_SWEEP, EvaluationConfig, run_evaluation, write_demo_subjects
    from fc_pipeline.profiles import get_profile

    labels = [Path(c).name for c in args.checkpoint]
    if len(set(labels)) != len(labels):
        raise SystemExit(f"evaluate: checkpoints need distinct directory names to be told apart, got {labels}")
    options = given(args, EvaluationConfig, args.flags)
    if args.multi:
        options.setdefault("prompt_sets", ("multi",))
    if args.alpha_sweep:
        options["alphas"] = PAPER_ALPHA_SWEEP
    if args.resolution:
        options = {"height": args.resolution, "width": args.resolution, **options}
    config = EvaluationConfig(**options)
    subjects = args.subjects or write_demo_subjects(Path(args.out) / "demo_subjects")
    try:
        result = run_evaluation(
            dict(zip(labels, args.checkpoint)),
            subjects,
            args.out,
            config,
            profile=get_profile(args.profile, prompt_clip=args.prompt_clip, facenet=args.facenet),
            device=args.device,
            progress=print,
        )
    except (ValueError, FileNotFoundError) as exc:
        raise SystemExit(f"evaluate: {exc}") from None
    note = result["notes"].get("prompt_consistency")
    for setting, metrics in result["headline"].items():
        print(
            f"{setting}: identity {metrics['identity_pct']} %, prompt consistency {metrics['prompt_consistency']}"
            + (f" ({note})" if note else "")
            + f" (α = {result['main_alpha']})"
        )
    print(f"report: {result['paths']['html']}")
    return 0


# --- models ---
def _add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "models",
        help="the paper profile's pretrained models: download a store, check it, plan GPU memory",
        description="download --to DIR: fetch every paper model into a model store (needs the hub). "
        "check: list each model (present/missing, files, size, parameters, memory); exits 1 when one is missing. "
        "plan: the GPU memory each step needs; exits 1 when a step cannot fit the visible GPU.",
    )
    p.add_argument("action", choices=("download", "check", "plan"))
    p.add_argument("--profile", default="paper", help="model profile (paper) [%(default)s]")
    p.add_argument("--to", metavar="DIR", help="download: the model store to fill")
    p.add_argument(
        "--models", metavar="DIR", default=argparse.SUPPRESS, help="model store (default: $FC_PIPELINE_MODELS)"
    )
    p.add_argument("--device", default="cuda", help="plan: the device to fit [%(default)s]")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), help="plan: inference weights' dtype")
    p.add_argument("--batch", type=int, metavar="N", help="plan: batch of every step (default: each step's own)")
    p.add_argument("--resolution", type=int, metavar="PX", help="plan: image size (default: the profile's)")
    p.set_defaults(func=_run_models)


def _run_models(args: argparse.Namespace) -> int:
    from fc_pipeline import pretrained
    from fc_pipeline.profiles import get_profile

    if get_profile(args.profile, models_dir="").tiny:
        raise SystemExit(f"models: profile {args.profile!r} builds its models offline; use --profile paper")
    models_dir = getattr(args, "models", None)
    if args.action == "download":
        models_dir = args.to or models_dir or os.environ.get(pretrained.MODELS_ENV)
        if not models_dir:
            raise SystemExit(f"models download: give --to DIR (or set {pretrained.MODELS_ENV})")
        pretrained.download(args.profile, models_dir, log=lambda m: print(m, file=sys.stderr))
        args.action = "check"
    if args.action == "check":
        rows = pretrained.check(args.profile, models_dir)
        print(pretrained.format_check(rows))
        missing = [row["model"] for row in rows if not row["present"]]
        if missing:
            print(f"missing: {', '.join(missing)} (fc-pipeline models download --to DIR)", file=sys.stderr)
        return 1 if missing else 0
    return _plan(args)


def _plan(args: argparse.Namespace) -> int:
    import torch

    from fc_pipeline.pretrained import GIB, STEP_MODELS, MemoryPlanError, ensure_fits, plan_step

    on_gpu = args.device.startswith("cuda") and torch.cuda.is_available()
    if not on_gpu:
        print(f"{args.device}: no CUDA device visible; the needs below are not checked", file=sys.stderr)
    refused = []
    for step in STEP_MODELS:
        plan = plan_step(step, args.profile, dtype=args.dtype, batch=args.batch, resolution=args.resolution)
        verdict = ""
        if on_gpu:
            try:
                free, _ = ensure_fits(plan, args.device)
                verdict = f"  fits ({free / GIB:.1f} GiB free)"
            except MemoryPlanError:
                refused.append(step)
                verdict = "  DOES NOT FIT"
        print(plan.describe() + verdict)
    if refused:
        free, total = torch.cuda.mem_get_info(torch.device(args.device))
        print(f"{args.device}: {free / GIB:.1f} GiB free of {total / GIB:.1f} GiB; too small for {', '.join(refused)}")
    return 1 if refused else 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``fc-pipeline`` (all sub-commands)."""
    parser = argparse.ArgumentParser(
        prog="fc-pipeline",
        description="FastComposer: tuning-free multi-subject personalised text-to-image generation.",
    )
    parser.add_argument(
        "--models", metavar="DIR", help="model store of the paper profile (sets $FC_PIPELINE_MODELS; nothing downloads)"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    for add in (_add_demo, _add_instance, _add_corpus, _add_build_dataset, _add_train, _add_generate, _add_evaluate):
        add(sub)
    _add_models(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fc-pipeline`` console script."""
    args = build_parser().parse_args(argv)
    if args.models:  # every paper model of this process and its subprocesses loads from the store
        from fc_pipeline.pretrained import MODELS_ENV

        os.environ[MODELS_ENV] = args.models
    try:
        return int(args.func(args) or 0)
    except UnsafeCheckpointError as error:  # pickled weights: refused before anything is unpickled
        print(f"fc-pipeline {args.command}: error: {error}", file=sys.stderr)
        return 2
    except SettingError as error:  # a value out of range: exit 2 naming the flag, before any work
        flags = getattr(args, "flags", {})
        args.parser.error(f"{flags.get(error.option, error.option)} {error.problem}")
