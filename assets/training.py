"""Training asset (paper §4.2): a FastComposer checkpoint trained on the corpus's shards.

``fastcomposer_checkpoint`` writes the run's :class:`fc_pipeline.train.TrainConfig` as JSON and
launches ``python -m fc_pipeline.train`` (``accelerate launch`` for several processes) through
Dagster Pipes: the child streams its log lines and reports steps, final losses and the
checkpoint path; this side adds the loss curve and the data version of the shards it trained on.

A run's directory is ``<data_root>/<corpus>/checkpoints/run-<id>``, ``<id>`` a hash of everything
that shapes the trajectory (hyper-parameters and shards' data version, not ``max_steps``), so
re-materialising the same settings resumes the run (or returns at once when it is complete), and
raising ``max_steps`` continues it.
"""

import dataclasses
import hashlib
import io
import json
import os
import sys
from pathlib import Path

import dagster as dg
from PIL import Image
from pydantic import Field

from fc_pipeline.storage import write_json

from .dataset import SHARDS, step_fingerprint
from .metadata import save_preview
from .resources import DatasetStore

SHARDS_ASSET = dg.AssetKey("training_shards")
DATA_VERSION_TAG = "dagster/data_version"
CHECKPOINTS = "checkpoints"
# settings that do not change what a step computes: a run that differs only in these resumes
RUN_INDEPENDENT = ("output_dir", "max_steps", "checkpoint_every", "keep_checkpoints", "num_workers", "resume", "progress")


class TrainingConfig(dg.Config):
    """Hyper-parameters of the run. Defaults: the CPU demo (``TrainConfig.tiny``); paper values in
    each description (8 GPUs × batch 16, 150k steps)."""

    shards: str = Field(default="", description="Dataset dir with train/*.tar; empty: the store's shards dir.")
    profile: str = Field(default="tiny", description="Model profile: tiny (random, offline) or paper (SD 1.5 + CLIP-L/14).")
    pretrained: str = Field(default="", description="Start from this FastComposer checkpoint; empty: the profile's weights.")
    resolution: int = Field(default=64, description="Training image size in px; 0: the profile's (paper 512).")
    train_batch_size: int = Field(default=4, description="Per-process batch (paper 16 per GPU).")
    gradient_accumulation_steps: int = Field(default=1, description="Micro-batches per optimiser step (paper 1).")
    max_steps: int = Field(default=30, description="Optimiser steps (paper 150,000).")
    learning_rate: float = Field(default=1e-5, description="AdamW learning rate, constant (paper 1e-5).")
    weight_decay: float = Field(default=0.01, description="AdamW weight decay (paper 0.01).")
    max_grad_norm: float = Field(default=1.0, description="Gradient clipping norm (paper 1.0).")
    localization_weight: float = Field(default=1e-3, description="λ of L_loc (paper 0.001); 0 turns L_loc off.")
    mask_loss_prob: float = Field(default=0.5, description="Share of samples whose L_noise is masked to the subjects (paper 0.5).")
    localization_layers: list[str] = Field(default=[], description="UNet attn2 module prefixes for L_loc; empty: the profile's.")
    image_encoder_trainable_blocks: int = Field(default=2, description="Last CLIP vision blocks trained (paper 2).")
    max_subjects: int = Field(default=4, description="Subjects per image at most (paper 4).")
    unconditional_prob: float = Field(default=0.1, description="Share of samples with an empty caption (paper 0.1).")
    text_only_prob: float = Field(default=0.1, description="Share of samples without subject augmentation (paper 0.1).")
    subject_drop_prob: float = Field(default=0.1, description="Probability of dropping each subject (paper 0.1).")
    mixed_precision: str = Field(default="auto", description="auto (bf16 on GPU, fp32 on CPU), no, fp16 or bf16.")
    gradient_checkpointing: bool = Field(default=False, description="Trade compute for UNet activation memory.")
    checkpoint_every: int = Field(default=15, description="Save a checkpoint every N steps (and at the end).")
    keep_checkpoints: int = Field(default=2, description="Newest checkpoints kept.")
    seed: int = Field(default=42, description="Seed of the model's noise and of the data stream.")
    num_workers: int = Field(default=0, description="DataLoader worker processes.")
    resume: bool = Field(default=True, description="Resume the run's newest checkpoint, if any.")
    num_processes: int = Field(default=0, description="Training processes; 0: one per visible GPU, else 1 (paper 8).")


def shards_data_version(context: dg.AssetExecutionContext, shards_dir: Path) -> str:
    """The data version ``training_shards`` last recorded, else the fingerprint it would record."""
    event = context.instance.get_latest_materialization_event(SHARDS_ASSET)
    recorded = event.asset_materialization.tags.get(DATA_VERSION_TAG) if event and event.asset_materialization else None
    return recorded or step_fingerprint(sorted(shards_dir.glob("*/[0-9]*.parquet")), {})[:16]


def train_config(config: TrainingConfig, shards: Path, runs_dir: Path, data_version: str):
    """The library's ``TrainConfig`` of the asset config, in the run's own directory."""
    from fc_pipeline.train import TrainConfig

    options = config.model_dump(exclude={"shards", "num_processes"})
    options.update(
        pretrained=config.pretrained or None,
        resolution=config.resolution or None,
        localization_layers=config.localization_layers or None,
        progress=False,
    )
    identity = {k: v for k, v in options.items() if k not in RUN_INDEPENDENT} | {"shards": data_version}
    run_id = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    return TrainConfig(shards=str(shards), output_dir=str(runs_dir / f"run-{run_id}"), **options)


def launch_command(config_path: Path, num_processes: int) -> list[str]:
    """``python -m fc_pipeline.train`` for one process, ``accelerate launch`` for several."""
    if num_processes <= 1:
        return [sys.executable, "-m", "fc_pipeline.train", "--config", str(config_path)]
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes)]
    return [*launcher, "-m", "fc_pipeline.train", "--config", str(config_path)]


def loss_curve(metrics_path: Path, out_path: Path) -> str:
    """Plot loss, L_noise and L_loc per step from ``metrics.jsonl``; save a PNG, return inline markdown."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    steps = [r["step"] for r in rows]
    figure, (noise_axis, loc_axis) = plt.subplots(1, 2, figsize=(8, 3), dpi=100)
    noise_axis.plot(steps, [r["loss"] for r in rows], label="loss")
    noise_axis.plot(steps, [r["l_noise"] for r in rows], label="L_noise", linestyle="--")
    noise_axis.set(xlabel="step", title="loss = L_noise + λ·L_loc")
    noise_axis.legend()
    loc_axis.plot(steps, [r["l_loc"] for r in rows], color="tab:red")
    loc_axis.set(xlabel="step", title="L_loc")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return save_preview(Image.open(buffer), out_path)


@dg.asset(deps=[SHARDS_ASSET], group_name="training", pool="gpu", kinds={"pytorch", "safetensors"})
def fastcomposer_checkpoint(
    context: dg.AssetExecutionContext,
    config: TrainingConfig,
    store: DatasetStore,
    pipes_subprocess_client: dg.PipesSubprocessClient,
) -> dg.MaterializeResult:
    """FastComposer (fuser, UNet, last CLIP vision blocks) trained with L_noise + λ·L_loc; a
    diffusers checkpoint directory (``FastComposerPipeline.from_pretrained``)."""
    import torch

    shards = Path(config.shards) if config.shards else store.path(SHARDS)
    if not (shards / "train").is_dir():
        raise dg.Failure(f"no training shards in {shards}/train; materialise training_shards first")
    data_version = shards_data_version(context, shards)
    run = train_config(config, shards, store.path(CHECKPOINTS), data_version)
    run_dir = Path(run.output_dir)
    config_path = run_dir / "train_config.json"
    write_json(dataclasses.asdict(run), config_path)
    processes = config.num_processes or max(1, torch.cuda.device_count())
    command = launch_command(config_path, processes)
    context.log.info(f"training in {run_dir}: {' '.join(command)}")
    # On CPU one OpenMP thread is fastest for these models: two threads on a busy machine spin.
    env = {} if torch.cuda.is_available() else {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    reported = pipes_subprocess_client.run(command=command, context=context, env=env).get_materialize_result()

    curve_path = run_dir / "loss_curve.png"
    return dg.MaterializeResult(
        metadata={
            **(reported.metadata or {}),
            "loss_curve": dg.MetadataValue.md(loss_curve(run_dir / "metrics.jsonl", curve_path)),
            "loss_curve_path": dg.MetadataValue.path(str(curve_path)),
            "run_dir": dg.MetadataValue.path(str(run_dir)),
            "train_config": dg.MetadataValue.path(str(config_path)),
            "shards": dg.MetadataValue.path(str(shards)),
            "shards_data_version": data_version,
            "num_processes": processes,
        },
        check_results=reported.check_results,
        tags=reported.tags,
    )
