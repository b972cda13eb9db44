"""Inference cost of FastComposer (paper §5: 2 s / 6 GB per image, fine-tuning 789–2500 s).

Prints one line with three ratios, all on the same components, device, steps and size:

* time and peak memory per image of FastComposer (2 subjects, α = 0.7) over
  ``StableDiffusionPipeline`` (text only) — runs alternate side by side, medians are compared;
* personalisation: a DreamBooth-style fine-tune of the same UNet (the diffusers DreamBooth
  example: ``--max_train_steps=400``, batch 1, AdamW lr 5e-6 constant) plus one generation, over
  one FastComposer generation.

Peak memory = parameter bytes of the modules a pipeline runs + the peak of live tensor storage
during one generation (tracked per operator, so it is the same measure on CPU and GPU).

    python benchmarks/inference.py                      # tiny profile, CPU
    python benchmarks/inference.py --checkpoint DIR --device cuda --dtype float16
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import weakref
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from fc_pipeline.images import load_image
from fc_pipeline.model.components import load_components
from fc_pipeline.pipeline import FastComposerPipeline
from fc_pipeline.profiles import get_profile

FACES = Path(__file__).resolve().parents[2] / "shared" / "testdata" / "faces" / "subjects"
DEFAULT_SUBJECTS = [FACES / "paul_rudd" / "1.jpg", FACES / "kate_siegel" / "1.jpg"]
FASTCOMPOSER_PROMPT = "a man <|image|> and a woman <|image|> walking on the beach"
TEXT_PROMPT = "a man and a woman walking on the beach"
# diffusers examples/dreambooth/README.md ("Dog toy example"): the reference DreamBooth run
DREAMBOOTH_STEPS = 400
DREAMBOOTH_LR = 5e-6
DREAMBOOTH_PROMPT = "a photo of sks man"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class PeakTensorMemory(TorchDispatchMode):
    """Peak bytes of tensor storage created and still alive while the mode is active."""

    def __init__(self):
        super().__init__()
        self.live = WeakIdKeyDictionary()
        self.current = 0
        self.peak = 0

    def _free(self, nbytes: int) -> None:
        self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.untyped_storage() not in self.live:
                storage = tensor.untyped_storage()
                self.live[storage] = storage.nbytes()
                self.current += storage.nbytes()
                self.peak = max(self.peak, self.current)
                weakref.finalize(storage, self._free, storage.nbytes())
        return out


def parameter_bytes(*modules: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for module in modules for p in module.parameters())


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def stable_diffusion_pipeline(components: dict) -> StableDiffusionPipeline:
    """``StableDiffusionPipeline`` over the SD part of the components (no safety checker)."""
    pipe = StableDiffusionPipeline(
        **{k: components[k] for k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")},
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def dreambooth_finetune(components: dict, photo, steps: int, resolution: int, device: str) -> tuple[float, dict]:
    """Seconds to fine-tune a copy of the UNet on one subject photo, DreamBooth style, and the
    components with the fine-tuned UNet."""
    unet = copy.deepcopy(components["unet"]).train().requires_grad_(True)
    vae, text_encoder, scheduler = components["vae"], components["text_encoder"], components["scheduler"]
    optimizer = torch.optim.AdamW(unet.parameters(), lr=DREAMBOOTH_LR)
    pixels = np.asarray(photo.resize((resolution, resolution)), dtype=np.float32) / 127.5 - 1.0
    pixels = torch.from_numpy(pixels).permute(2, 0, 1)[None].to(device, vae.dtype)
    input_ids = components["tokenizer"](
        DREAMBOOTH_PROMPT,
        padding="max_length",
        max_length=components["tokenizer"].model_max_length,
        return_tensors="pt",
    ).input_ids.to(device)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        with torch.no_grad():  # as train_dreambooth.py: frozen VAE and text encoder run every step
            latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
            text_embeds = text_encoder(input_ids)[0]
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (1,), device=device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        loss = F.mse_loss(unet(noisy, timesteps, text_embeds).sample.float(), noise.float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    synchronize(device)
    components_after = {**components, "unet": unet.eval().requires_grad_(False)}
    return time.perf_counter() - start, components_after


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="tiny", help="model profile when no --checkpoint is given [tiny]")
    parser.add_argument("--checkpoint", default=None, help="a FastComposer checkpoint directory")
    parser.add_argument("--subjects", nargs=2, type=Path, default=DEFAULT_SUBJECTS, help="two reference photos")
    parser.add_argument("--steps", type=int, default=50, help="denoising steps [50]")
    parser.add_argument("--alpha", type=float, default=0.7)
    parser.add_argument("--repeats", type=int, default=5, help="timed generations per pipeline [5]")
    parser.add_argument("--dreambooth-steps", type=int, default=DREAMBOOTH_STEPS)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    args = parser.parse_args()

    profile = get_profile(args.profile)
    components = load_components(profile, pretrained=args.checkpoint, torch_dtype=DTYPES[args.dtype])
    for module in ("vae", "text_encoder", "unet", "image_encoder", "fuser"):
        components[module].to(args.device)
    resolution = profile.resolution
    photos = [load_image(path) for path in args.subjects]
    fastcomposer = FastComposerPipeline.from_components(components)
    fastcomposer.set_progress_bar_config(disable=True)
    stable_diffusion = stable_diffusion_pipeline(components)
    common = dict(num_inference_steps=args.steps, guidance_scale=5.0, height=resolution, width=resolution)

    def run_fastcomposer():
        generator = torch.Generator("cpu").manual_seed(0)
        return fastcomposer(FASTCOMPOSER_PROMPT, subject_images=photos, alpha=args.alpha, generator=generator, **common)

    def run_stable_diffusion(pipe=stable_diffusion):
        return pipe(TEXT_PROMPT, generator=torch.Generator("cpu").manual_seed(0), **common)

    def seconds(run) -> float:
        synchronize(args.device)
        start = time.perf_counter()
        run()
        synchronize(args.device)
        return time.perf_counter() - start

    def peak_bytes(run, modules) -> int:
        with PeakTensorMemory() as memory:
            run()
        return parameter_bytes(*modules) + memory.peak

    run_fastcomposer(), run_stable_diffusion()  # warm-up
    times = {"fc": [], "sd": []}
    for _ in range(args.repeats):  # alternate, so load changes hit both alike
        times["fc"].append(seconds(run_fastcomposer))
        times["sd"].append(seconds(run_stable_diffusion))
    fc_time, sd_time = statistics.median(times["fc"]), statistics.median(times["sd"])
    sd_modules = [components[k] for k in ("vae", "text_encoder", "unet")]
    fc_memory = peak_bytes(run_fastcomposer, sd_modules + [components["image_encoder"], components["fuser"]])
    sd_memory = peak_bytes(run_stable_diffusion, sd_modules)

    finetune_time, tuned = dreambooth_finetune(components, photos[0], args.dreambooth_steps, resolution, args.device)
    dreambooth_time = finetune_time + seconds(lambda: run_stable_diffusion(stable_diffusion_pipeline(tuned)))

    print(
        f"inference [{args.checkpoint or profile.name}, {args.device} {args.dtype}, {resolution}px, "
        f"{args.steps} steps, "
        f"2 subjects, alpha={args.alpha}, median of {args.repeats}]: "
        f"time/image {fc_time / sd_time:.3f}x SD ({fc_time:.2f} s vs {sd_time:.2f} s); "
        f"peak memory {fc_memory / sd_memory:.3f}x SD ({fc_memory / 2**20:.1f} MiB vs {sd_memory / 2**20:.1f} MiB); "
        f"personalisation {dreambooth_time / fc_time:.0f}x (DreamBooth {args.dreambooth_steps} steps + 1 image "
        f"{dreambooth_time:.1f} s vs FastComposer {fc_time:.2f} s)"
    )


if __name__ == "__main__":
    main()
