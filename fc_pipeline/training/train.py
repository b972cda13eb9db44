"""Train FastComposer on webdataset shards (paper §4.2), with ``accelerate``.

Read top to bottom: config -> data -> model (fresh or resumed) -> optimiser -> loop with
gradient accumulation, logging and checkpoints. The same entry point runs on a CPU, one GPU or
many (``accelerate launch -m fc_pipeline.training.train --config cfg.json``), and reports to Dagster when
launched through Dagster Pipes.

Output directory::

    checkpoint-0000200/   FastComposerPipeline.save_pretrained (diffusers layout, safetensors)
      training_state/     optimiser + RNG states (safetensors/JSON) + trainer_state.json (step, data position)
    metrics.jsonl         one line per optimiser step: step, loss, l_noise, l_loc, lr
    metrics.json          summary of the run (steps, final losses, checkpoint)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fc_pipeline.locks import remove_temp_files, writer_lock
from fc_pipeline.model.losses import LOCALIZATION_AVERAGES, MASKED_LOSS_FORMS
from fc_pipeline.model.references import REFERENCE_FILLS
from fc_pipeline.profiles import PROFILES
from fc_pipeline.settings import setting, validate
from fc_pipeline.storage import atomic_write, write_json

CHECKPOINT_PREFIX = "checkpoint-"
STATE_DIR = "training_state"
TRAINER_STATE = "trainer_state.json"
OOM_EXIT_CODE = 75  # EX_TEMPFAIL: the accelerator ran out of memory; a smaller batch may fit

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """All hyper-parameters of a run, each declared once: the ``train`` command's flags and the Dagster
    config of ``fastcomposer_checkpoint`` derive from these fields. Defaults are the paper's
    (per-device batch 16 × 8 GPUs); :data:`TINY_PRESET` is the CPU demo."""

    shards: str | list[str] = setting(help="Dataset directory (with train/*.tar) or one shard URL, or a list of them.")
    output_dir: str = setting(help="Run directory: checkpoints, metrics.jsonl, metrics.json.")
    profile: str = setting(
        "paper", "Model profile: tiny (random, offline) or paper (SD 1.5 + CLIP-L/14).", choices=PROFILES
    )
    pretrained: str | None = setting(None, "Start from this FastComposer checkpoint instead of the profile's weights.")
    resolution: int | None = setting(None, "Training image size in px; empty: the profile's.", paper=512, min=8)
    train_batch_size: int = setting(16, "Per-process batch.", paper="16 per GPU × 8 GPUs", min=1)
    gradient_accumulation_steps: int = setting(1, "Micro-batches per optimiser step.", paper=1, min=1)
    max_steps: int = setting(150_000, "Optimiser steps.", paper=150_000, min=1)
    learning_rate: float = setting(1e-5, "AdamW learning rate, constant.", paper=1e-5, above=0)
    weight_decay: float = setting(0.01, "AdamW weight decay.", paper=0.01, min=0)
    max_grad_norm: float = setting(1.0, "Gradient clipping norm.", paper=1.0, above=0)
    localization_weight: float = setting(
        1e-3, "λ of L_loc; 0 turns L_loc off (the paper's ablation).", paper=1e-3, min=0
    )
    mask_loss_prob: float = setting(
        0.5,
        "Probability that L_noise is masked to the subjects, per batch (per sample with masked_loss=sample).",
        paper=0.5,
        min=0,
        max=1,
    )
    masked_loss: str = setting(
        "batch",
        "Masked L_noise: batch (official: one draw per batch, prediction and target times the subject mask, "
        "mean over all elements) or sample (one draw per sample, mean over the mask area).",
        paper="batch",
        choices=MASKED_LOSS_FORMS,
    )
    localization_average: str = setting(
        "samples",
        "L_loc over subjects: samples (official: each sample's mean over its subjects, then the batch mean, "
        "samples without subjects counting 0) or subjects (the mean over all subjects of the batch).",
        paper="samples",
        choices=LOCALIZATION_AVERAGES,
    )
    augment: bool | None = setting(
        None,
        "The official training augmentations: references zoomed, rotated, colour-jittered, blurred, grey, "
        "flipped, elastic; the target flipped with its masks. Empty: the profile's (paper on, tiny off).",
        paper=True,
    )
    reference_fill: str = setting(
        "zeros",
        "Padding of a training reference to a square: zeros (official, as at inference) or noise (earlier form).",
        paper="zeros",
        choices=REFERENCE_FILLS,
    )
    localization_layers: list[str] | None = setting(
        None,
        "UNet attn2 module prefixes for L_loc; empty: the profile's.",
        paper="down_blocks.1/2, mid_block, up_blocks.1/2",
    )
    image_encoder_trainable_blocks: int = setting(2, "Last CLIP vision blocks trained.", paper=2, min=0)
    max_subjects: int = setting(4, "Subjects per image at most.", paper=4, min=1)
    unconditional_prob: float = setting(0.1, "Share of samples with an empty caption.", paper=0.1, min=0, max=1)
    text_only_prob: float = setting(0.1, "Share of samples without subject augmentation.", paper=0.1, min=0, max=1)
    subject_drop_prob: float = setting(0.1, "Probability of dropping each subject.", paper=0.1, min=0, max=1)
    mixed_precision: str = setting(
        "auto",
        "auto (bf16 on GPU, fp32 on CPU), no, fp16 or bf16.",
        paper="bf16",
        choices=("auto", "no", "fp16", "bf16"),
    )
    gradient_checkpointing: bool = setting(False, "Trade compute for UNet activation memory.")
    checkpoint_every: int = setting(200, "Save a checkpoint every N steps (and at the end).", min=1)
    keep_checkpoints: int = setting(2, "Newest checkpoints kept; 0 keeps all.", min=0)
    seed: int = setting(42, "Seed of the model's noise and of the data stream.")
    num_workers: int = setting(0, "DataLoader worker processes.", min=0)
    resume: bool = setting(True, "Resume the run's newest checkpoint, if any.")
    progress: bool = setting(True, "Show a progress bar.")

    def __post_init__(self):
        validate(self)

    @classmethod
    def tiny(cls, shards: str | list[str], output_dir: str, **overrides: Any) -> TrainConfig:
        """The CPU demo preset (:data:`TINY_PRESET`): tiny random models, 64 px, batch 4, 30 steps."""
        return cls(shards=shards, output_dir=output_dir, **{**TINY_PRESET, **overrides})

    @classmethod
    def from_json(cls, path: str | Path) -> TrainConfig:
        data = json.loads(Path(path).read_text())
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown training option(s) in {path}: {sorted(unknown)}")
        return cls(**data)


# the CPU demo: what `fc-pipeline train --preset tiny` and the Dagster asset use by default
TINY_PRESET = dict(profile="tiny", resolution=64, train_batch_size=4, max_steps=30, checkpoint_every=15)


@dataclass
class TrainResult:
    """What a run produced."""

    checkpoint: Path
    steps: int
    loss: float
    l_noise: float
    l_loc: float
    metrics_path: Path
    resumed_from: int = 0
    history: list[dict[str, float]] = field(default_factory=list, repr=False)

    def summary(self) -> dict[str, Any]:
        return {
            "checkpoint": str(self.checkpoint),
            "steps": self.steps,
            "loss": self.loss,
            "l_noise": self.l_noise,
            "l_loc": self.l_loc,
            "resumed_from": self.resumed_from,
            "metrics": str(self.metrics_path),
        }


def train_shard_urls(shards: str | list[str]) -> list[str]:
    """The train shard URLs of one dataset or several (``TrainConfig.shards``): each dataset's
    sorted by name, so that shards appended to a dataset join its stream, datasets in the given
    order. A dataset is a directory/URL with ``train/*.tar`` or one ``.tar`` shard URL."""
    from fc_pipeline.data.shards import shard_urls

    datasets = [shards] if isinstance(shards, (str, os.PathLike)) else list(shards)
    if not datasets:
        raise ValueError("no training dataset given (shards is empty)")
    urls, empty = [], []
    for dataset in datasets:
        found = [str(dataset)] if str(dataset).endswith(".tar") else shard_urls(dataset, "train")
        urls += found
        if not found:
            empty.append(f"{dataset}/train")
    if empty:
        raise FileNotFoundError(f"no training shards under {', '.join(empty)} (build the dataset first)")
    return urls


# --- checkpoints ------------------------------------------------------------------------------
# The training state is written without pickles (accelerate's save_state pickles the optimiser
# and RNG states): model weights are the checkpoint's safetensors, the AdamW state goes to
# safetensors + JSON, and the RNG states of every process to safetensors + JSON.
def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (incomplete ones are temp dirs, never listed)."""
    root = Path(output_dir)
    found = [p for p in root.glob(f"{CHECKPOINT_PREFIX}*") if (p / STATE_DIR / TRAINER_STATE).exists()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or ``None``."""
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def _save_optimizer(optimizer: torch.optim.Optimizer, directory: Path) -> None:
    from safetensors.torch import save_file

    state = optimizer.state_dict()
    tensors = {
        f"{index}.{key}": value.detach().cpu().contiguous()
        for index, slots in state["state"].items()
        for key, value in slots.items()
    }
    save_file(tensors, str(directory / "optimizer.safetensors"))
    write_json(state["param_groups"], directory / "optimizer_groups.json")


def _load_optimizer(optimizer: torch.optim.Optimizer, directory: Path) -> None:
    from safetensors.torch import load_file

    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in load_file(str(directory / "optimizer.safetensors")).items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    groups = json.loads((directory / "optimizer_groups.json").read_text())
    for group in groups:
        group["betas"] = tuple(group["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _save_rng(directory: Path, rank: int) -> None:
    import random

    import numpy as np
    from safetensors.torch import save_file

    numpy_state = np.random.get_state()
    tensors = {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(numpy_state[1].astype(np.int64))}
    if torch.cuda.is_available():
        tensors.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_file(tensors, str(directory / f"rng_{rank}.safetensors"))
    python_state = random.getstate()
    write_json(
        {"python": [python_state[0], list(python_state[1]), python_state[2]], "numpy": list(numpy_state[2:])},
        directory / f"rng_{rank}.json",
    )


def _load_rng(directory: Path, rank: int) -> None:
    import random

    import numpy as np
    from safetensors.torch import load_file

    tensors = load_file(str(directory / f"rng_{rank}.safetensors"))
    scalars = json.loads((directory / f"rng_{rank}.json").read_text())
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    np.random.set_state(("MT19937", tensors["numpy"].numpy().astype(np.uint32), *scalars["numpy"]))
    version, internal, gauss = scalars["python"]
    random.setstate((version, tuple(internal), gauss))


def _card_data(trainer_state: dict, processes: int) -> dict[str, Any]:
    """What a checkpoint's model card says about its base models, data and training run."""
    from fc_pipeline.profiles import get_profile

    config, step = trainer_state["config"], trainer_state["step"]
    profile = get_profile(config["profile"])
    tiny = "tiny random (test profile, not a real model)"
    shards = config["shards"] if isinstance(config["shards"], list) else [config["shards"]]
    batch = config["train_batch_size"] * config["gradient_accumulation_steps"] * processes
    return {
        "base_model": tiny if profile.tiny else profile.stable_diffusion,
        "image_encoder": tiny if profile.tiny else profile.image_encoder,
        "training_data": {
            "datasets": ", ".join(map(str, shards)),
            "samples seen": step * batch,
            "construction": "captions, panoptic segments and CLIP×SBERT-matched person subjects (fc-pipeline "
            "build-dataset)",
        },
        "training": {
            "initialised from": config.get("pretrained") or "the profile's pretrained models (fresh fuser)",
            "steps": step,
            "batch (all processes)": batch,
            "learning rate": config["learning_rate"],
            "localization weight λ": config["localization_weight"],
            "mixed precision": config["mixed_precision"],
        },
    }


def _save_checkpoint(
    accelerator, models: dict, optimizer, output_dir: Path, step: int, trainer_state: dict, keep: int
) -> Path:
    """Pipeline + training state into a temp dir, renamed into place; keeps the newest ``keep``."""
    from fc_pipeline.pipeline import FastComposerPipeline
    from fc_pipeline.schedulers import inference_scheduler

    final = output_dir / f"{CHECKPOINT_PREFIX}{step:07d}"
    temp = output_dir / f".tmp-{final.name}"
    state_dir = temp / STATE_DIR
    if accelerator.is_main_process:
        shutil.rmtree(temp, ignore_errors=True)
        parts = {
            name: accelerator.unwrap_model(part) if isinstance(part, torch.nn.Module) else part
            for name, part in models.items()
        }
        # the checkpoint ships SD 1.5's inference sampler over the training noise schedule
        parts["scheduler"] = inference_scheduler(parts["scheduler"].config)
        card = _card_data(trainer_state, accelerator.num_processes)
        FastComposerPipeline.from_components(parts).save_pretrained(temp, card_data=card)
        state_dir.mkdir(parents=True)
        _save_optimizer(optimizer, state_dir)
    accelerator.wait_for_everyone()
    _save_rng(state_dir, accelerator.process_index)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json(trainer_state, state_dir / TRAINER_STATE)  # written last: marks the state complete
        shutil.rmtree(final, ignore_errors=True)
        os.replace(temp, final)
        for old in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _truncate_metrics(path: Path, step: int) -> list[dict]:
    """Keep the log lines up to ``step`` (a resumed run rewrites what followed its checkpoint).

    A torn last line (power loss or a full disk in the middle of an append) is dropped with a
    warning; a bad line before the last raises ``ValueError`` naming the file and line.
    """
    if not path.exists():
        return []
    lines = [(number, line) for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1)]
    lines = [(number, line) for number, line in lines if line.strip()]
    rows = []
    for index, (number, line) in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if index < len(lines) - 1:
                raise ValueError(f"{path}:{number}: not a JSON line ({exc.msg}); repair it to resume") from None
            logger.warning("%s:%d: dropped a torn last line (an interrupted write): %.80r", path, number, line)
    rows = [r for r in rows if r["step"] <= step]
    with atomic_write(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return rows


# --- the run ----------------------------------------------------------------------------------
def train(config: TrainConfig, log: Callable[[str], None] | None = None) -> TrainResult:
    """Train (or resume) a FastComposer checkpoint; returns the last checkpoint and final losses.

    The main process holds the run folder's lock (:func:`fc_pipeline.locks.writer_lock`) for the
    whole run: a second run of the same ``output_dir`` is refused with
    :class:`~fc_pipeline.locks.WriterLockHeld`, and the holder removes what a killed run left half
    written (temp files, temp checkpoint folders).
    """
    if int(os.environ.get("RANK", "0")) != 0:  # the other processes of a distributed run
        return _train(config, log)
    with writer_lock(config.output_dir, what="training run"):
        output_dir = Path(config.output_dir)
        remove_temp_files(output_dir)
        for temp in output_dir.glob(f".tmp-{CHECKPOINT_PREFIX}*"):
            shutil.rmtree(temp, ignore_errors=True)
        return _train(config, log)


def _train(config: TrainConfig, log: Callable[[str], None] | None) -> TrainResult:
    """The run itself (:func:`train`), on every process."""
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.utils import gather_object, set_seed
    from tqdm.auto import tqdm

    from fc_pipeline.model.attention import install_attention_capture
    from fc_pipeline.model.components import load_components, set_trainable
    from fc_pipeline.model.objective import compute_losses
    from fc_pipeline.model.references import ReferenceAugmentation
    from fc_pipeline.pretrained import check_step_memory
    from fc_pipeline.profiles import get_profile
    from fc_pipeline.training.samples import (
        SamplingConfig,
        TrainingSamples,
        collate_samples,
        data_state,
        read_data_state,
    )

    log = log or (lambda message: None)
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    precision = config.mixed_precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() else "no"
    accelerator = Accelerator(
        mixed_precision=precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        # unconditional / text-only batches leave the fuser and image encoder without gradients
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    set_seed(config.seed, device_specific=True)

    # data
    profile = get_profile(config.profile)
    check_step_memory("train", profile, accelerator.device, batch=config.train_batch_size, resolution=config.resolution)
    urls = train_shard_urls(config.shards)
    resume_from = latest_checkpoint(output_dir) if config.resume else None
    step, positions, phase = 0, {}, 0  # each loader stream's last consumed sample; see TrainingSamples
    if resume_from is not None:
        saved = json.loads((resume_from / STATE_DIR / TRAINER_STATE).read_text())
        step, (positions, phase) = saved["step"], read_data_state(saved)
        log(f"resuming from {resume_from} (step {step})")
    # a resumed run takes every weight from its checkpoint (safetensors), the rest from the state
    components = load_components(profile, pretrained=resume_from or config.pretrained)
    augment = profile.augment if config.augment is None else config.augment
    sampling = SamplingConfig(
        resolution=config.resolution or profile.resolution,
        latent_scale=2 ** (len(components["vae"].config.block_out_channels) - 1),
        max_subjects=config.max_subjects,
        unconditional_prob=config.unconditional_prob,
        text_only_prob=config.text_only_prob,
        subject_drop_prob=config.subject_drop_prob,
        reference_size=components["image_encoder"].config.image_size,  # the size the pipeline feeds it
        reference_fill=config.reference_fill,
        augmentation=ReferenceAugmentation() if augment else None,
    )

    # model
    trainable = set_trainable(components, config.image_encoder_trainable_blocks)
    if config.gradient_checkpointing:
        components["unet"].enable_gradient_checkpointing()
    capture = None
    if config.localization_weight > 0:
        capture = install_attention_capture(
            components["unet"], config.localization_layers or profile.localization_layers
        )
    dataset = TrainingSamples(
        urls,
        components["tokenizer"],
        sampling,
        seed=config.seed,
        start=positions,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        phase=phase,
    )
    workers = max(config.num_workers, 1)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=config.train_batch_size,
        collate_fn=collate_samples,
        num_workers=config.num_workers,
        generator=torch.Generator().manual_seed(config.seed),  # keeps the global RNG (checkpointed) untouched
    )

    # optimiser: AdamW, constant learning rate
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
    unet, fuser, image_encoder, optimizer = accelerator.prepare(
        components["unet"], components["fuser"], components["image_encoder"], optimizer
    )
    for name in ("vae", "text_encoder"):
        components[name].to(accelerator.device).eval()
    models = {**components, "unet": unet, "fuser": fuser, "image_encoder": image_encoder}
    if resume_from is not None:
        _load_optimizer(optimizer, resume_from / STATE_DIR)
        _load_rng(resume_from / STATE_DIR, accelerator.process_index)
    unet.train(), fuser.train(), image_encoder.train()

    metrics_path = output_dir / "metrics.jsonl"
    history = _truncate_metrics(metrics_path, step) if accelerator.is_main_process else []
    resumed_from, checkpoint = step, resume_from
    progress = tqdm(
        total=config.max_steps,
        initial=step,
        disable=not (config.progress and accelerator.is_main_process),
        desc="train",
    )
    running = {"loss": 0.0, "l_noise": 0.0, "l_loc": 0.0}
    started = time.perf_counter()
    data = iter(loader)
    while step < config.max_steps:
        batch = next(data)
        with accelerator.accumulate(unet, fuser, image_encoder):
            losses = compute_losses(
                models,
                batch,
                capture,
                localization_weight=config.localization_weight,
                mask_loss_prob=config.mask_loss_prob,
                masked_loss=config.masked_loss,
                localization_average=config.localization_average,
            )
            accelerator.backward(losses["loss"])
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(trainable, config.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        for key in running:
            running[key] += losses[key].detach().float().item() / config.gradient_accumulation_steps
        positions[batch["stream"][-1]] = batch["position"][-1]  # a batch comes from one stream
        phase = (phase + 1) % workers  # DataLoader workers deliver batches in turn
        if not accelerator.sync_gradients:
            continue
        step += 1
        averaged = {
            k: accelerator.reduce(torch.tensor(v, device=accelerator.device), "mean").item() for k, v in running.items()
        }
        running = dict.fromkeys(running, 0.0)
        row = {
            "step": step,
            **averaged,
            "lr": config.learning_rate,
            "elapsed_s": round(time.perf_counter() - started, 3),
        }
        if not all(math.isfinite(v) for v in averaged.values()):
            raise FloatingPointError(f"non-finite loss at step {step}: {averaged}")
        if accelerator.is_main_process:
            history.append(row)
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
        progress.update(1)
        progress.set_postfix(loss=f"{averaged['loss']:.4f}", l_loc=f"{averaged['l_loc']:.4f}")
        if step % config.checkpoint_every == 0 or step == config.max_steps:
            every_rank = gather_object([positions]) if accelerator.num_processes > 1 else [positions]
            merged = {stream: position for ranks in every_rank for stream, position in ranks.items()}
            trainer_state = {"step": step, "data": data_state(merged, phase), "config": dataclasses.asdict(config)}
            checkpoint = _save_checkpoint(
                accelerator, models, optimizer, output_dir, step, trainer_state, config.keep_checkpoints
            )
            log(
                f"step {step}: loss {averaged['loss']:.4f} (noise {averaged['l_noise']:.4f}, "
                f"loc {averaged['l_loc']:.4f}); saved {checkpoint.name}"
            )
    progress.close()
    if capture is not None:
        capture.remove()
    if checkpoint is None:
        raise RuntimeError(f"nothing trained: max_steps={config.max_steps} and no checkpoint in {output_dir}")
    last = history[-1] if history else {"loss": math.nan, "l_noise": math.nan, "l_loc": math.nan}
    result = TrainResult(
        checkpoint=checkpoint,
        steps=step,
        loss=last["loss"],
        l_noise=last["l_noise"],
        l_loc=last["l_loc"],
        metrics_path=metrics_path,
        resumed_from=resumed_from,
        history=history,
    )
    if accelerator.is_main_process:
        write_json(result.summary(), output_dir / "metrics.json")
        if dataset.skipped:
            log(f"{len(dataset.skipped)} sample(s) skipped, e.g. {dataset.skipped[0]}")
    accelerator.end_training()
    return result


# --- command line / Dagster Pipes --------------------------------------------------------------
def _run_with_pipes(config: TrainConfig) -> TrainResult:
    """Train, streaming logs and the final materialisation to Dagster through Pipes."""
    from dagster_pipes import open_dagster_pipes

    with open_dagster_pipes() as pipes:
        result = train(config, log=pipes.log.info)
        pipes.report_asset_materialization(
            metadata={
                "steps": result.steps,
                "loss": result.loss,
                "l_noise": result.l_noise,
                "l_loc": result.l_loc,
                "resumed_from_step": result.resumed_from,
                "checkpoint": {"raw_value": str(result.checkpoint), "type": "path"},
                "metrics": {"raw_value": str(result.metrics_path), "type": "path"},
            }
        )
    return result


def main(argv: list[str] | None = None) -> int:
    """``python -m fc_pipeline.training.train --config cfg.json`` (also under ``accelerate launch``)."""
    parser = argparse.ArgumentParser(prog="fc_pipeline.training.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="JSON file with TrainConfig fields")
    args = parser.parse_args(argv)
    try:
        config = TrainConfig.from_json(args.config)
    except ValueError as error:  # an unknown or out-of-range option: exit 2 before any work
        parser.error(f"{args.config}: {error}")
    is_main = int(os.environ.get("RANK", "0")) == 0
    try:
        if is_main and "DAGSTER_PIPES_CONTEXT" in os.environ:
            result = _run_with_pipes(config)
        else:
            result = train(config, log=lambda message: print(message, file=sys.stderr, flush=True))
    except torch.OutOfMemoryError as error:
        print(f"out of accelerator memory at per-process batch {config.train_batch_size}: {error}", file=sys.stderr)
        return OOM_EXIT_CODE
    if is_main:
        print(json.dumps(result.summary()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
