"""Training cost of FastComposer over plain Stable Diffusion fine-tuning (paper §4.2).

Prints one line with the time and peak-memory ratios of one optimiser step, same batch, same
VAE / text encoder / UNet weights, same device and precision:

* FastComposer: CLIP image encoder (last blocks trained) + fuser -> subject-augmented text,
  cross-attention capture on the localisation layers, ``L_noise`` (masked for half of the
  samples) + λ·``L_loc``; AdamW over UNet + fuser + trained vision blocks
  (:func:`fc_pipeline.model.objective.compute_losses`, as ``fc_pipeline.training.train`` runs it);
* plain SD fine-tuning: text embeddings only, epsilon MSE; AdamW over the UNet.

The two steps alternate (after a warm-up each), and the medians are compared.

Peak memory = resident state (parameter bytes of the modules a step runs + AdamW moments of the
trained parameters) + the transient peak during a step: on CUDA ``max_memory_allocated`` above
what was allocated when the step began; on CPU the peak of live tensor storage created during the
step (``PeakTensorMemory`` of ``benchmarks/inference.py``: activations kept for backward,
gradients, temporaries).

    python benchmarks/train_step.py                          # tiny profile, 64 px, batch 4, CPU
    python benchmarks/train_step.py --profile paper --resolution 512 --batch-size 16 --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from inference import PeakTensorMemory, parameter_bytes, synchronize  # benchmarks/inference.py
from PIL import Image

from fc_pipeline.model.attention import install_attention_capture
from fc_pipeline.model.components import load_components, set_trainable
from fc_pipeline.model.objective import compute_losses
from fc_pipeline.profiles import get_profile
from fc_pipeline.training.samples import SamplingConfig, collate_samples, prepare_sample

CAPTION = "a man and a woman in a park"
SUBJECTS = [
    {"phrase": "a man", "start": 0, "end": 5, "segment_id": 1},
    {"phrase": "a woman", "start": 10, "end": 17, "segment_id": 2},
]


def synthetic_batch(tokenizer, resolution: int, batch_size: int, seed: int = 0) -> dict:
    """A collated training batch of two-subject pictures, through the real sample preparation."""
    rng = np.random.default_rng(seed)
    config = SamplingConfig(resolution=resolution, unconditional_prob=0, text_only_prob=0, subject_drop_prob=0)
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
    """One optimiser step of a model set: FastComposer (``fastcomposer=True``) or plain SD."""

    def __init__(self, profile, fastcomposer: bool, device: str, localization_weight: float):
        self.models = load_components(profile)
        for name in ("vae", "text_encoder", "unet", "image_encoder", "fuser"):
            self.models[name].to(device)
        self.fastcomposer, self.localization_weight = fastcomposer, localization_weight
        if fastcomposer:
            trainable = set_trainable(self.models)
            self.capture = install_attention_capture(self.models["unet"], profile.localization_layers)
            self.modules = [self.models[k] for k in ("vae", "text_encoder", "unet", "image_encoder", "fuser")]
        else:
            set_trainable(self.models)  # freezes the rest
            trainable = list(self.models["unet"].parameters())
            self.capture = None
            self.modules = [self.models[k] for k in ("vae", "text_encoder", "unet")]
        self.trainable = trainable
        self.optimizer = torch.optim.AdamW(trainable, lr=1e-5, weight_decay=0.01)
        for module in self.modules:
            module.train() if any(p.requires_grad for p in module.parameters()) else module.eval()

    def __call__(self, batch: dict) -> None:
        losses = compute_losses(
            self.models,
            batch,
            self.capture,
            localization_weight=self.localization_weight if self.fastcomposer else 0.0,
            mask_loss_prob=0.5 if self.fastcomposer else 0.0,
            use_subjects=self.fastcomposer,
        )
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(self.trainable, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def resident_bytes(self) -> int:
        """Parameters of the modules the step runs + the optimiser's moment buffers."""
        moments = sum(
            t.numel() * t.element_size()
            for s in self.optimizer.state.values()
            for t in s.values()
            if torch.is_tensor(t)
        )
        return parameter_bytes(*self.modules) + moments


def seconds(step: Step, batch: dict, device: str) -> float:
    synchronize(device)
    start = time.perf_counter()
    step(batch)
    synchronize(device)
    return time.perf_counter() - start


def peak_bytes(step: Step, batch: dict, device: str) -> int:
    """Resident state + transient peak of one step (see the module docstring)."""
    if device.startswith("cuda"):
        synchronize(device)
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(batch)
        synchronize(device)
        return step.resident_bytes() + torch.cuda.max_memory_allocated() - before
    with PeakTensorMemory() as memory:
        step(batch)
    return step.resident_bytes() + memory.peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="tiny", help="model profile [tiny]")
    parser.add_argument("--resolution", type=int, default=64, help="image size in px [64; paper 512]")
    parser.add_argument("--batch-size", type=int, default=4, help="batch size [4; paper 16 per GPU]")
    parser.add_argument("--localization-weight", type=float, default=1e-3, help="λ [0.001]")
    parser.add_argument("--repeats", type=int, default=7, help="timed steps per method [7]")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads [1: tiny models run fastest on one]")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    profile = get_profile(args.profile)
    fastcomposer = Step(profile, True, args.device, args.localization_weight)
    plain = Step(profile, False, args.device, args.localization_weight)
    batch = synthetic_batch(fastcomposer.models["tokenizer"], args.resolution, args.batch_size)

    fastcomposer(batch), plain(batch)  # warm-up (also allocates the AdamW moments)
    times = {"fc": [], "sd": []}
    for _ in range(args.repeats):  # alternate, so load changes hit both alike
        times["fc"].append(seconds(fastcomposer, batch, args.device))
        times["sd"].append(seconds(plain, batch, args.device))
    fc_time, sd_time = statistics.median(times["fc"]), statistics.median(times["sd"])
    fc_memory, sd_memory = peak_bytes(fastcomposer, batch, args.device), peak_bytes(plain, batch, args.device)
    print(
        f"train step [{profile.name}, {args.device} ({args.threads} CPU thread(s)), {args.resolution}px, "
        f"batch {args.batch_size}, 2 subjects/image, "
        f"λ={args.localization_weight}, median of {args.repeats}]: "
        f"time {fc_time / sd_time:.3f}x plain SD fine-tuning ({fc_time * 1000:.0f} ms vs {sd_time * 1000:.0f} ms); "
        f"peak memory {fc_memory / sd_memory:.3f}x ({fc_memory / 2**20:.1f} MiB vs {sd_memory / 2**20:.1f} MiB)"
    )


if __name__ == "__main__":
    main()
