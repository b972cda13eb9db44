"""Training cost of FastComposer over plain Stable Diffusion fine-tuning (paper §4.2).

Prints one line with the time and peak-memory ratios of one optimiser step, same batch, same
VAE / text encoder / UNet weights, same device and precision:

* FastComposer: CLIP image encoder (last blocks trained) + fuser -> subject-augmented text,
  cross-attention capture on the localisation layers, ``L_noise`` (masked for half of the
  samples) + λ·``L_loc``; AdamW over UNet + fuser + trained vision blocks
  (:func:`fc_pipeline.model.objective.compute_losses`, as ``fc_pipeline.training.train`` runs it);
* plain SD fine-tuning: text embeddings only, epsilon MSE; AdamW over the UNet.

Both train the same modules in turn (after a warm-up each), and the medians are compared: one
AdamW holds the moments (a parameter without a gradient is skipped, so the plain step updates the
UNet only), and the UNet's attention processors are switched per step (plain SD runs diffusers'
own). With ``--mixed-precision bf16`` both run under ``torch.autocast`` with fp32 master
weights, as ``accelerate`` does for the training loop.

Peak memory = resident state (parameter bytes of the modules a step runs + AdamW moments of its
trained parameters) + the transient peak during a step: on CUDA ``max_memory_allocated`` above
what was allocated when the step began; on the CPU the peak of live tensor storage created during
the step (activations kept for backward, gradients, temporaries).

    python benchmarks/train_step.py                          # tiny profile, 64 px, batch 4, CPU
    python benchmarks/train_step.py --size paper --resolution 256 --batch-size 1 --repeats 3   # SD 1.5 sizes, CPU
    python benchmarks/train_step.py --size paper --resolution 512 --batch-size 16 --mixed-precision bf16  # a GPU
    python benchmarks/train_step.py --dry-run
"""

from __future__ import annotations

import argparse
import contextlib

import numpy as np
import torch
from common import (  # benchmarks/common.py
    DTYPES,
    SIZES,
    alternate,
    benchmark_components,
    parameter_bytes,
    transient_peak_bytes,
    write_result,
)
from PIL import Image

from fc_pipeline.model.attention import install_attention_capture
from fc_pipeline.model.components import set_trainable
from fc_pipeline.model.objective import compute_losses
from fc_pipeline.training.samples import SamplingConfig, collate_samples, prepare_sample

CAPTION = "a man and a woman in a park"
SUBJECTS = [
    {"phrase": "a man", "start": 0, "end": 5, "segment_id": 1},
    {"phrase": "a woman", "start": 10, "end": 17, "segment_id": 2},
]


def synthetic_batch(tokenizer, resolution: int, batch_size: int, latent_scale: int = 8, seed: int = 0) -> dict:
    """A collated training batch of two-subject pictures, through the real sample preparation."""
    rng = np.random.default_rng(seed)
    config = SamplingConfig(
        resolution=resolution, latent_scale=latent_scale, unconditional_prob=0, text_only_prob=0, subject_drop_prob=0
    )
    samples = []
    for number in range(batch_size):
        size = resolution
        image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        seg = np.zeros((size, size), np.uint16)
        seg[size // 8 :, size // 8 : size // 2 - 2] = 1
        seg[size // 6 :, size // 2 + 2 : size - size // 8] = 2
        meta = {
            "caption": CAPTION,
            "subjects": SUBJECTS,
            "segments": [{"id": 1, "label": "person"}, {"id": 2, "label": "person"}],
        }
        sample = {"id": str(number), "image": Image.fromarray(image), "meta": meta, "seg": seg}
        samples.append(prepare_sample(sample, tokenizer, config, rng))
    return collate_samples(samples)


class Step:
    """One optimiser step of FastComposer (``fastcomposer=True``) or of plain SD fine-tuning over
    shared ``models``, ``optimizer`` and attention processors (see the module docstring)."""

    def __init__(self, models: dict, fastcomposer: bool, trainable: list, optimizer, processors: dict, args):
        self.models, self.fastcomposer, self.trainable = models, fastcomposer, trainable
        self.optimizer, self.processors, self.args = optimizer, processors, args
        self.capture = processors.get("capture")
        names = ("vae", "text_encoder", "unet") + (("image_encoder", "fuser") if fastcomposer else ())
        self.modules = [models[name] for name in names]

    def __call__(self, batch: dict) -> None:
        self.models["unet"].set_attn_processor(dict(self.processors["unet"]))
        autocast = (
            torch.autocast(self.args.device.split(":")[0], dtype=torch.bfloat16)
            if self.args.mixed_precision == "bf16"
            else contextlib.nullcontext()
        )
        with autocast:
            losses = compute_losses(
                self.models,
                batch,
                self.capture,
                localization_weight=self.args.localization_weight if self.fastcomposer else 0.0,
                mask_loss_prob=0.5 if self.fastcomposer else 0.0,
                use_subjects=self.fastcomposer,
            )
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(self.trainable, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def resident_bytes(self) -> int:
        """Parameters of the modules the step runs + the optimiser's moments of what it trains."""
        moments = sum(
            t.numel() * t.element_size()
            for p in self.trainable
            for t in self.optimizer.state.get(p, {}).values()
            if torch.is_tensor(t) and t.dim() > 0
        )
        return parameter_bytes(*self.modules) + moments


def make_steps(size: str, args) -> tuple[Step, Step]:
    """The FastComposer step and the plain SD step over one set of components."""
    profile, models = benchmark_components(size, args.device, DTYPES[args.dtype])
    plain_processors = models["unet"].attn_processors
    trainable = set_trainable(models)
    capture = install_attention_capture(models["unet"], profile.localization_layers)
    fc_processors = models["unet"].attn_processors
    if args.gradient_checkpointing:
        models["unet"].enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(trainable, lr=1e-5, weight_decay=0.01)
    for name in ("vae", "text_encoder"):
        models[name].eval()
    for name in ("unet", "image_encoder", "fuser"):
        models[name].train()
    unet_parameters = list(models["unet"].parameters())
    fastcomposer = Step(models, True, trainable, optimizer, {"unet": fc_processors, "capture": capture}, args)
    plain = Step(models, False, unet_parameters, optimizer, {"unet": plain_processors}, args)
    return fastcomposer, plain


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="tiny", choices=SIZES, help="model sizes [tiny]; paper = SD 1.5 sizes")
    parser.add_argument("--resolution", type=int, default=None, help="image size in px [tiny 64, paper 512]")
    parser.add_argument("--batch-size", type=int, default=4, help="batch size [4; paper 16 per GPU]")
    parser.add_argument("--localization-weight", type=float, default=1e-3, help="λ [0.001]")
    parser.add_argument("--repeats", type=int, default=7, help="timed steps per method [7]")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--mixed-precision", choices=("no", "bf16"), default="no", help="[no]; the paper: bf16")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=sorted(DTYPES),
        help="weight dtype [float32]; bfloat16 halves a CPU's load",
    )
    parser.add_argument("--gradient-checkpointing", action="store_true", help="recompute UNet activations")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads [1: tiny models run fastest on one]")
    parser.add_argument("--json", default=None, help="also merge the figures into this JSON file")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes, 32 px, batch 2, one repeat")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.size, args.resolution, args.batch_size, args.repeats, args.threads = "tiny", 32, 2, 1, 1
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # random paper-size weights make denormals, which crawl on a CPU
    torch.manual_seed(0)
    fastcomposer, plain = make_steps(args.size, args)
    models = fastcomposer.models
    resolution = args.resolution or (64 if args.size == "tiny" else 512)
    latent_scale = 2 ** (len(models["vae"].config.block_out_channels) - 1)
    batch = synthetic_batch(models["tokenizer"], resolution, args.batch_size, latent_scale)

    times = alternate({"fc": lambda: fastcomposer(batch), "sd": lambda: plain(batch)}, args.repeats, args.device)
    memory = {
        name: step.resident_bytes() + transient_peak_bytes(lambda step=step: step(batch), args.device)
        for name, step in (("fc", fastcomposer), ("sd", plain))
    }
    figures = {
        "size": args.size,
        "device": args.device,
        "mixed_precision": args.mixed_precision,
        "dtype": args.dtype,
        "resolution": resolution,
        "batch_size": args.batch_size,
        "gradient_checkpointing": args.gradient_checkpointing,
        "fc_s": times["fc"],
        "sd_s": times["sd"],
        "time_ratio": times["fc"] / times["sd"],
        "fc_bytes": memory["fc"],
        "sd_bytes": memory["sd"],
        "memory_ratio": memory["fc"] / memory["sd"],
    }
    where = f"{args.device} ({args.threads} CPU thread(s))" if args.device == "cpu" else args.device
    line = (
        f"train step [{args.size} sizes, {where}, {args.dtype} weights, {args.mixed_precision} mixed precision, "
        f"{resolution}px, "
        f"batch {args.batch_size}, 2 subjects/image, λ={args.localization_weight}, "
        f"{'gradient checkpointing, ' if args.gradient_checkpointing else ''}median of {args.repeats}]: "
        f"time {figures['time_ratio']:.3f}x plain SD fine-tuning ({times['fc'] * 1000:.0f} ms vs "
        f"{times['sd'] * 1000:.0f} ms); peak memory {figures['memory_ratio']:.3f}x "
        f"({memory['fc'] / 2**20:.1f} MiB vs {memory['sd'] / 2**20:.1f} MiB)"
    )
    write_result(args.json, f"train_step-{args.size}", line, figures)


if __name__ == "__main__":
    main()
