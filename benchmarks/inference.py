"""Inference cost of FastComposer (paper §5: 2 s / 6 GB per image, fine-tuning 789–2500 s).

Prints one line of ratios, all on the same components, device, steps and size:

* time and peak memory per image of FastComposer (2 subjects, α = 0.7) over
  ``StableDiffusionPipeline`` (text only) — runs alternate side by side, medians are compared —
  plain and with each generation speed option asked for (``--variants``): the UNet in
  channels-last memory format, float16 / bfloat16 weights, model CPU offload, ``torch.compile``
  of the UNet (timed in steady state, after a warm-up image compiled it);
* personalisation by the paper's protocol: DreamBooth with prior preservation as the diffusers
  DreamBooth example runs it — ``--num_class_images`` (default 100) class images generated first
  (``--sample_batch_size`` 4), then ``--max_train_steps=800`` fine-tuning steps (batch 1 instance +
  1 class image, AdamW lr 5e-6 constant, prior loss weight 1), then one image — over one
  FastComposer image. ``--dreambooth measure`` runs all of it; ``derive`` times one batch of class
  images and a few fine-tuning steps and extrapolates (labelled "derived").

Peak memory = parameter bytes of the modules a pipeline keeps on the device + the peak its
generation adds (``torch.cuda.max_memory_allocated`` on CUDA, live tensor storage on the CPU).
``--size paper`` builds SD 1.5 + CLIP ViT-L/14 from their configs with random weights.

    python benchmarks/inference.py                     # tiny, CPU, 64 px, 50 steps, measured DreamBooth
    python benchmarks/inference.py --size paper --resolution 256 --steps 10 --repeats 3 --variants channels-last
    python benchmarks/inference.py --size paper --device cuda --dtype bfloat16 --variants all   # see gpu.sh
    python benchmarks/inference.py --dry-run           # every code path on tiny sizes, seconds
"""

from __future__ import annotations

import argparse
import copy
import statistics
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from common import (  # benchmarks/common.py
    DTYPES,
    SIZES,
    alternate,
    benchmark_components,
    parameter_bytes,
    seconds,
    timed,
    transient_peak_bytes,
    write_result,
)
from diffusers import StableDiffusionPipeline

from fc_pipeline.cli.generation import apply_speed_options
from fc_pipeline.images import load_image
from fc_pipeline.model.components import load_components
from fc_pipeline.pipeline import FastComposerPipeline

FACES = Path(__file__).resolve().parents[2] / "shared" / "testdata" / "faces" / "subjects"
DEFAULT_SUBJECTS = [FACES / "paul_rudd" / "1.jpg", FACES / "kate_siegel" / "1.jpg"]
FASTCOMPOSER_PROMPT = "a man <|image|> and a woman <|image|> walking on the beach"
TEXT_PROMPT = "a man and a woman walking on the beach"
# diffusers examples/dreambooth: train_dreambooth.py defaults and the README's prior-preservation run
DREAMBOOTH_STEPS = 800
DREAMBOOTH_LR = 5e-6
DREAMBOOTH_PROMPT = "a photo of sks man"
CLASS_PROMPT = "a photo of man"
NUM_CLASS_IMAGES = 100
SAMPLE_BATCH_SIZE = 4
PRIOR_LOSS_WEIGHT = 1.0
DERIVE_STEPS = 3  # timed fine-tuning steps of --dreambooth derive (after one warm-up step)
# in-place options first, each undone before the next; compile last (it stays)
VARIANTS = ("channels-last", "float16", "bfloat16", "offload", "compile")


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


def fastcomposer_pipeline(components: dict) -> FastComposerPipeline:
    pipe = FastComposerPipeline.from_components(components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class Contest:
    """FastComposer against Stable Diffusion at one setting: time and memory per image."""

    def __init__(self, args: argparse.Namespace, photos: list, resolution: int):
        self.args, self.photos = args, photos
        self.common = dict(num_inference_steps=args.steps, guidance_scale=5.0, height=resolution, width=resolution)

    def runs(self, fastcomposer: FastComposerPipeline, stable_diffusion: StableDiffusionPipeline) -> dict:
        def fc():
            generator = torch.Generator("cpu").manual_seed(0)
            return fastcomposer(
                FASTCOMPOSER_PROMPT,
                subject_images=self.photos,
                alpha=self.args.alpha,
                generator=generator,
                **self.common,
            )

        def sd():
            return stable_diffusion(TEXT_PROMPT, generator=torch.Generator("cpu").manual_seed(0), **self.common)

        return {"fc": fc, "sd": sd}

    def measure(self, fastcomposer, stable_diffusion, resident: bool = True, memory: bool = True) -> dict:
        """Median seconds per image of both, their ratio, and (``memory``) peak bytes and ratio.
        ``resident=False``: the weights do not stay on the device (offload), only the peak counts."""
        runs = self.runs(fastcomposer, stable_diffusion)
        times = alternate(runs, self.args.repeats, self.args.device)
        figures = {"fc_s": times["fc"], "sd_s": times["sd"], "time_ratio": times["fc"] / times["sd"]}
        if memory:
            modules = {"fc": fastcomposer.components, "sd": stable_diffusion.components}
            for name, run in runs.items():
                weights = [m for m in modules[name].values() if isinstance(m, torch.nn.Module)]
                base = parameter_bytes(*weights) if resident else 0
                figures[f"{name}_bytes"] = base + transient_peak_bytes(run, self.args.device)
            figures["memory_ratio"] = figures["fc_bytes"] / figures["sd_bytes"]
        return figures


def measure_variants(components: dict, contest: Contest, args: argparse.Namespace) -> dict[str, dict]:
    """Each speed option of ``args.variants`` alone."""
    device, dtype = args.device, DTYPES[args.dtype]
    models = ("vae", "text_encoder", "unet", "image_encoder", "fuser")
    fc, sd = fastcomposer_pipeline(components), stable_diffusion_pipeline(components)
    results = {}
    for variant in VARIANTS:
        if variant not in args.variants or DTYPES.get(variant) == dtype:  # a dtype variant of the base dtype is it
            continue
        if variant == "channels-last":
            apply_speed_options(fc, device, channels_last=True)  # the UNet is shared: both pipelines have it
            results[variant] = contest.measure(fc, sd)
            components["unet"].to(memory_format=torch.contiguous_format)
        elif variant in DTYPES:
            for name in models:
                components[name].to(DTYPES[variant])
            results[variant] = contest.measure(fc, sd)
            for name in models:
                components[name].to(dtype)
        elif variant == "offload":  # hooks sit on the modules: Stable Diffusion gets its own copies
            own = {**components, **{k: copy.deepcopy(components[k]) for k in ("vae", "text_encoder", "unet")}}
            fc_offload, sd_offload = fastcomposer_pipeline(components), stable_diffusion_pipeline(own)
            for pipe in (fc_offload, sd_offload):
                apply_speed_options(pipe, device, offload=True)
            results[variant] = contest.measure(fc_offload, sd_offload, resident=False)
            fc_offload.remove_all_hooks()
            del own, sd_offload
            fc.to(device)
        elif variant == "compile":
            apply_speed_options(fc, device, compile=True)  # shared UNet
            # the CPU memory count dispatches every operator in Python, which compiled code does not
            results[variant] = contest.measure(fc, sd, memory=device.startswith("cuda"))
    return results


def class_images(pipe: StableDiffusionPipeline, count: int, common: dict) -> list:
    """DreamBooth's prior-preservation images: ``count`` images of the class prompt, generated in
    batches of ``SAMPLE_BATCH_SIZE`` as train_dreambooth.py does."""
    images = []
    for start in range(0, count, SAMPLE_BATCH_SIZE):
        size = min(SAMPLE_BATCH_SIZE, count - start)
        generator = torch.Generator("cpu").manual_seed(start)
        images += pipe([CLASS_PROMPT] * size, generator=generator, **common).images
    return images


def to_pixels(image, resolution: int, like: torch.Tensor) -> torch.Tensor:
    pixels = np.asarray(image.convert("RGB").resize((resolution, resolution)), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(pixels).permute(2, 0, 1)[None].to(like.device, like.dtype)


def dreambooth_steps(components: dict, unet, photo, prior: list, steps: int, resolution: int, device: str) -> list:
    """Seconds of each DreamBooth fine-tuning step of ``unet`` on one subject photo with prior
    preservation (each batch: the photo + one class image; loss = instance MSE + prior MSE)."""
    vae, text_encoder, scheduler, tokenizer = (components[k] for k in ("vae", "text_encoder", "scheduler", "tokenizer"))
    unet.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=DREAMBOOTH_LR)
    instance = to_pixels(photo, resolution, next(vae.parameters()))
    prior_pixels = [to_pixels(image, resolution, instance) for image in prior]
    input_ids = tokenizer(
        [DREAMBOOTH_PROMPT, CLASS_PROMPT],
        padding="max_length",
        max_length=tokenizer.model_max_length,
        return_tensors="pt",
    ).input_ids.to(device)

    def step(number: int) -> None:
        pixels = torch.cat([instance, prior_pixels[number % len(prior_pixels)]])
        with torch.no_grad():  # as train_dreambooth.py: frozen VAE and text encoder run every step
            latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
            text_embeds = text_encoder(input_ids)[0]
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (2,), device=device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        prediction = unet(noisy, timesteps, text_embeds).sample.float()
        instance_loss, prior_loss = (F.mse_loss(p, n) for p, n in zip(prediction.chunk(2), noise.float().chunk(2)))
        (instance_loss + PRIOR_LOSS_WEIGHT * prior_loss).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times = [seconds(lambda n=n: step(n), device) for n in range(steps)]
    unet.eval().requires_grad_(False)
    return times


def personalisation(components: dict, contest: Contest, args: argparse.Namespace, baseline: dict) -> dict:
    """DreamBooth (class images + fine-tuning + one image) over one FastComposer image."""
    photo, resolution, device = contest.photos[0], contest.common["height"], args.device
    fc_seconds, sd_seconds = baseline["fc_s"], baseline["sd_s"]
    sd = stable_diffusion_pipeline(components)
    if args.dreambooth == "measure":
        unet = copy.deepcopy(components["unet"])
        prior_seconds, prior = timed(lambda: class_images(sd, args.class_images, contest.common), device)
        step_seconds = sum(dreambooth_steps(components, unet, photo, prior, args.dreambooth_steps, resolution, device))
        tuned = stable_diffusion_pipeline({**components, "unet": unet})
        image_seconds = seconds(contest.runs(fastcomposer_pipeline(components), tuned)["sd"], device)
        total = prior_seconds + step_seconds + image_seconds
    else:  # derive: the UNet trains in place (no copy: the paper-size UNet, its gradients and moments fill a CPU)
        batch = min(SAMPLE_BATCH_SIZE, args.class_images)
        prior_seconds, prior = timed(lambda: class_images(sd, batch, contest.common), device)
        prior_seconds /= batch
        times = dreambooth_steps(components, components["unet"], photo, prior, 1 + DERIVE_STEPS, resolution, device)
        step_seconds = statistics.median(times[1:])
        image_seconds = sd_seconds  # fine-tuning changes the weights, not the cost of an image
        total = args.class_images * prior_seconds + args.dreambooth_steps * step_seconds + image_seconds
        prior_seconds *= args.class_images
        step_seconds *= args.dreambooth_steps
    return {
        "mode": args.dreambooth,
        "class_images": args.class_images,
        "steps": args.dreambooth_steps,
        "class_images_s": prior_seconds,
        "finetune_s": step_seconds,
        "image_s": image_seconds,
        "dreambooth_s": total,
        "fastcomposer_s": fc_seconds,
        "ratio": total / fc_seconds,
    }


def summary(args, results: dict, resolution: int, label: str) -> str:
    base = results["variants"]["baseline"]
    mib = 2**20
    parts = [
        f"inference [{label}, {args.device} {args.dtype}, {resolution}px, {args.steps} steps, 2 subjects, "
        f"alpha={args.alpha}, median of {args.repeats}]: "
        f"time/image {base['time_ratio']:.3f}x SD ({base['fc_s']:.2f} s vs {base['sd_s']:.2f} s); "
        f"peak memory {base['memory_ratio']:.3f}x SD ({base['fc_bytes'] / mib:.1f} MiB vs "
        f"{base['sd_bytes'] / mib:.1f} MiB)"
    ]
    for name, figures in results["variants"].items():
        if name != "baseline":
            memory = f", memory {figures['memory_ratio']:.3f}x" if "memory_ratio" in figures else ""
            parts.append(f"{name}: time {figures['time_ratio']:.3f}x{memory} ({figures['fc_s']:.2f} s)")
    db = results.get("personalisation")
    if db:
        derived = ", derived from measured per-image and per-step costs" if db["mode"] == "derive" else ""
        parts.append(
            f"personalisation {db['ratio']:.0f}x{derived} (DreamBooth: {db['class_images']} class images "
            f"{db['class_images_s']:.1f} s + {db['steps']} steps {db['finetune_s']:.1f} s + 1 image "
            f"{db['image_s']:.2f} s = {db['dreambooth_s']:.1f} s vs FastComposer {db['fastcomposer_s']:.2f} s)"
        )
    return "; ".join(parts)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="tiny", choices=SIZES, help="model sizes [tiny]; paper = SD 1.5 sizes")
    parser.add_argument("--checkpoint", default=None, help="a FastComposer checkpoint directory instead of --size")
    parser.add_argument("--subjects", nargs=2, type=Path, default=DEFAULT_SUBJECTS, help="two reference photos")
    parser.add_argument("--resolution", type=int, default=None, help="image size [tiny 64, paper 512]")
    parser.add_argument("--steps", type=int, default=50, help="denoising steps [50]")
    parser.add_argument("--alpha", type=float, default=0.7)
    parser.add_argument("--repeats", type=int, default=5, help="timed generations per pipeline and setting [5]")
    parser.add_argument(
        "--variants", default="", help=f"comma list of speed options to measure too: {','.join(VARIANTS)} or all"
    )
    parser.add_argument(
        "--dreambooth", choices=("measure", "derive", "off"), default=None, help="[tiny: measure, paper: derive]"
    )
    parser.add_argument("--class-images", type=int, default=NUM_CLASS_IMAGES, help="[100, train_dreambooth.py]")
    parser.add_argument("--dreambooth-steps", type=int, default=DREAMBOOTH_STEPS, help="[800]")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--threads", type=int, default=None, help="CPU threads [torch's default]")
    parser.add_argument("--json", default=None, help="also merge the figures into this JSON file")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes, 2 steps, every variant: a quick check")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.size, args.checkpoint, args.resolution, args.steps, args.repeats, args.threads = "tiny", None, 64, 2, 1, 1
        args.variants, args.dreambooth, args.class_images, args.dreambooth_steps = "all", "measure", 2, 2
    args.variants = set(VARIANTS if args.variants == "all" else filter(None, args.variants.split(",")))
    unknown = args.variants - set(VARIANTS)
    if unknown:
        parser.error(f"--variants: unknown {sorted(unknown)}; choose from {','.join(VARIANTS)} or all")
    args.dreambooth = args.dreambooth or ("measure" if args.size == "tiny" else "derive")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # random paper-size weights make denormals, which crawl on a CPU
    dtype = DTYPES[args.dtype]
    if args.checkpoint:
        components = load_components(pretrained=args.checkpoint, torch_dtype=dtype)
        for name in ("vae", "text_encoder", "unet", "image_encoder", "fuser"):
            components[name].to(args.device)
        resolution, label = args.resolution or components["unet"].config.sample_size * 8, args.checkpoint
    else:
        profile, components = benchmark_components(args.size, args.device, dtype)
        resolution = args.resolution or profile.resolution
        label = "tiny profile" if args.size == "tiny" else "paper sizes, random weights"
    contest = Contest(args, [load_image(path) for path in args.subjects], resolution)
    results = {
        "size": args.size,
        "device": args.device,
        "dtype": args.dtype,
        "resolution": resolution,
        "steps": args.steps,
        "repeats": args.repeats,
    }
    baseline = contest.measure(fastcomposer_pipeline(components), stable_diffusion_pipeline(components))
    if args.dreambooth != "off":  # before the variants: compile stays on the UNet
        results["personalisation"] = personalisation(components, contest, args, baseline)
    results["variants"] = {"baseline": baseline, **measure_variants(components, contest, args)}
    key = "-".join(["inference", args.size, *sorted(args.variants)])
    write_result(args.json, key, summary(args, results, resolution, label), results)


if __name__ == "__main__":
    main()
