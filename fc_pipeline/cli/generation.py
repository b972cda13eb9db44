"""Generation jobs: what ``fc-pipeline generate`` runs, one job per prompt (or per jsonl line).

A job is validated completely (checkpoint, prompt markers, reference photos, settings) before
any image is generated, so a bad line of a batch file costs nothing; outputs are written
atomically, with the subject tokens' attention maps beside the image when asked for.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from matplotlib import colormaps

from fc_pipeline.images import ImageError, load_image
from fc_pipeline.model.components import COMPONENT_NAMES
from fc_pipeline.pretrained import MemoryPlanError, check_checkpoint_memory
from fc_pipeline.schedulers import scheduler_class, with_scheduler
from fc_pipeline.settings import SettingError, setting, torch_dtype, validate
from fc_pipeline.storage import atomic_write

IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


class JobError(ValueError):
    """A job that cannot run as written (the user's input, not a bug): say what to fix."""


@dataclass(frozen=True)
class GenerationJob:
    """One prompt with its reference photos and sampling settings; each setting declared once here
    (the ``generate`` flags and the jsonl fields derive from these fields)."""

    prompt: str = setting(help="The prompt; mark each subject with <|image|> right after its noun.")
    out: Path = setting(help="Output image (.png/.jpg/.webp); several images get _0, _1, ...")
    subjects: tuple[Path, ...] = setting((), "Reference photos, one per marker, in order.")
    seed: int = setting(0, "Random seed.", min=0)
    alpha: float = setting(
        0.7, "Fraction of the steps, at the end, conditioned on the subjects.", paper="0.6–0.8", min=0, max=1
    )
    steps: int = setting(50, "Denoising steps.", paper=50, min=1)
    guidance_scale: float = setting(5.0, "Classifier-free guidance scale.", paper=5.0, min=0)
    negative_prompt: str | None = setting(None, "What the image should not show.")
    num_images: int = setting(1, "Images per prompt.", min=1)
    height: int | None = setting(None, "Image height; empty: the model's resolution.", min=8)
    width: int | None = setting(None, "Image width; empty: the model's resolution.", min=8)
    save_attention: bool = setting(False, "Also write <out>.attention.png/.npy: the subject tokens' attention maps.")
    truncate: bool = setting(
        False, "Cut a prompt over the text encoder's 77 tokens (with a warning) instead of failing."
    )

    def __post_init__(self):
        validate(self)

    def output_paths(self) -> list[Path]:
        """``out`` itself for one image, else ``<stem>_<k><suffix>`` per image."""
        if self.num_images == 1:
            return [self.out]
        return [self.out.with_name(f"{self.out.stem}_{k}{self.out.suffix}") for k in range(self.num_images)]


JOB_FIELDS = {f.name for f in dataclasses.fields(GenerationJob)}


def make_job(fields: dict[str, Any], base_dir: Path | None = None, where: str = "job") -> GenerationJob:
    """A validated job from a dict of ``GenerationJob`` fields; relative paths resolve against ``base_dir``."""
    unknown = sorted(set(fields) - JOB_FIELDS)
    if unknown:
        raise JobError(f"{where}: unknown field(s) {unknown}; known fields are {sorted(JOB_FIELDS)}")
    for required in ("prompt", "out"):
        if not fields.get(required):
            raise JobError(f"{where}: the field {required!r} is required")
    if not isinstance(fields["prompt"], str):
        raise JobError(f"{where}: 'prompt' must be a string")
    subjects = fields.get("subjects") or ()
    if isinstance(subjects, (str, Path)) or not all(isinstance(s, (str, Path)) for s in subjects):
        raise JobError(f"{where}: 'subjects' must be a list of image paths")

    def resolve(path: str | Path) -> Path:
        path = Path(path).expanduser()
        return path if path.is_absolute() or base_dir is None else base_dir / path

    try:
        job = GenerationJob(
            **{**fields, "out": resolve(fields["out"]), "subjects": tuple(resolve(s) for s in subjects)}
        )
    except (TypeError, SettingError) as exc:
        raise JobError(f"{where}: {exc}") from None
    if job.out.suffix.lower() not in IMAGE_FORMATS:
        raise JobError(f"{where}: output {job.out} must end in one of {sorted(IMAGE_FORMATS)}")
    return job


def read_jobs(path: str | Path, defaults: dict[str, Any]) -> list[GenerationJob]:
    """Jobs of a jsonl file (one JSON object per line; blank lines skipped). Fields missing from a
    line come from ``defaults``; relative paths are relative to the jsonl file's folder."""
    path = Path(path)
    if not path.is_file():
        raise JobError(f"jobs file not found: {path}")
    jobs = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            fields = json.loads(line)
        except json.JSONDecodeError as exc:
            raise JobError(f"{where}: not valid JSON ({exc.msg})") from None
        if not isinstance(fields, dict):
            raise JobError(f"{where}: each line must be a JSON object")
        jobs.append(make_job({**defaults, **fields}, base_dir=path.parent, where=where))
    if not jobs:
        raise JobError(f"{path} holds no jobs")
    outputs = Counter(out for job in jobs for out in job.output_paths())
    clashes = sorted(str(out) for out, count in outputs.items() if count > 1)
    if clashes:
        raise JobError(f"{path}: several jobs write {clashes[0]}; give each job its own 'out'")
    return jobs


def load_pipeline(
    checkpoint: str | Path,
    device: str = "cpu",
    dtype: str = "float32",
    *,
    offload: bool = False,
    channels_last: bool = False,
    compile: bool = False,
    scheduler: str | None = None,
):
    """The ``FastComposerPipeline`` of a checkpoint directory, on ``device`` in ``dtype``, with the
    speed options of :func:`apply_speed_options` and, if named, another ``scheduler`` (see
    ``fc_pipeline.schedulers``)."""
    from fc_pipeline.pipeline import FastComposerPipeline

    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        raise JobError(f"checkpoint directory not found: {checkpoint}")
    missing = [name for name in ("model_index.json", *COMPONENT_NAMES) if not (checkpoint / name).exists()]
    if missing:
        raise JobError(f"{checkpoint} is not a FastComposer checkpoint (missing {', '.join(missing)})")
    try:
        weights_dtype = torch_dtype(dtype)
    except ValueError as exc:
        raise JobError(str(exc)) from None
    if scheduler is not None:
        try:
            scheduler_class(scheduler)
        except ValueError as exc:
            raise JobError(str(exc)) from None
    try:  # on CUDA: refuse up front when the checkpoint cannot fit, instead of running out after loading
        check_checkpoint_memory("generate", checkpoint, device, weights_dtype)
    except MemoryPlanError as exc:
        raise JobError(str(exc)) from None
    pipeline = with_scheduler(FastComposerPipeline.from_pretrained(checkpoint, dtype=weights_dtype), scheduler)
    return apply_speed_options(pipeline, device, offload=offload, channels_last=channels_last, compile=compile)


def apply_speed_options(
    pipeline, device: str, *, offload: bool = False, channels_last: bool = False, compile: bool = False
):
    """diffusers' generation speed options, applied in place: model CPU offload (each model moves
    to ``device`` only while it runs; otherwise the whole pipeline moves there), the UNet in
    channels-last memory format, and ``torch.compile`` of the UNet (the first image compiles it)."""
    if offload:
        pipeline.enable_model_cpu_offload(device=device)
    else:
        pipeline.to(device)
    if channels_last:
        pipeline.unet.to(memory_format=torch.channels_last)
    if compile:
        pipeline.unet.compile()
    return pipeline


def load_subject_images(job: GenerationJob, pipeline) -> list[PIL.Image.Image]:
    """The job's reference photos, after checking the job against the pipeline (markers, α, sizes)."""
    try:
        images = [load_image(path) for path in job.subjects]
    except ImageError as exc:
        raise JobError(f"subject image: {exc}") from None
    subject_lists = [images] if images else None
    height = job.height or pipeline.unet.config.sample_size * pipeline.vae_scale_factor
    width = job.width or pipeline.unet.config.sample_size * pipeline.vae_scale_factor
    try:
        pipeline.check_inputs(
            job.prompt,
            subject_lists,
            job.alpha,
            job.steps,
            height,
            width,
            job.negative_prompt,
            job.num_images,
            job.save_attention,
            truncate=job.truncate,
        )
    except ValueError as exc:
        raise JobError(str(exc)) from None
    check_writable(job.output_paths())
    return images


def check_writable(paths: list[Path]) -> None:
    """Raise ``JobError`` unless every output path can be written (probed in its nearest existing folder)."""
    for path in paths:
        if path.is_dir():
            raise JobError(f"output {path} is a directory; give an image file name")
        folder = path.parent
        while not folder.exists():
            folder = folder.parent
        try:
            if not folder.is_dir():
                raise NotADirectoryError(f"{folder} is not a directory")
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as exc:
            raise JobError(f"cannot write output {path}: {exc}") from None


def run_job(pipeline, job: GenerationJob, subject_images: list[PIL.Image.Image]) -> list[Path]:
    """Generate the job's images and write them (and their attention maps); returns the paths."""
    output = pipeline(
        job.prompt,
        subject_images=subject_images or None,
        alpha=job.alpha,
        num_inference_steps=job.steps,
        guidance_scale=job.guidance_scale,
        negative_prompt=job.negative_prompt,
        height=job.height,
        width=job.width,
        num_images_per_prompt=job.num_images,
        generator=torch.Generator("cpu").manual_seed(job.seed),
        return_attention_maps=job.save_attention,
        truncate=job.truncate,
    )
    written = []
    for k, (image, path) in enumerate(zip(output.images, job.output_paths())):
        save_image(image, path)
        written.append(path)
        if output.attention_maps is not None:
            stem = path.with_suffix("")
            save_image(overlay_attention_maps(image, output.attention_maps[k]), Path(f"{stem}.attention.png"))
            with atomic_write(Path(f"{stem}.attention.npy")) as handle:
                np.save(handle, output.attention_maps[k])
    return written


def save_image(image: PIL.Image.Image, path: Path) -> None:
    """Write an image atomically, in the format its suffix names."""
    with atomic_write(path) as handle:
        image.save(handle, format=IMAGE_FORMATS[path.suffix.lower()])


def overlay_attention_maps(image: PIL.Image.Image, maps: np.ndarray, opacity: float = 0.5) -> PIL.Image.Image:
    """The image followed by one heat-map overlay per subject token, side by side.

    ``maps`` is ``[num_subjects, h, w]`` at any resolution; each map is stretched to its own
    min–max range and upsampled bilinearly to the image size.
    """
    image = image.convert("RGB")
    panels = [image]
    for attention in np.asarray(maps, dtype=np.float32):
        low, high = float(attention.min()), float(attention.max())
        normalised = (attention - low) / (high - low) if high > low else np.zeros_like(attention)
        heat = PIL.Image.fromarray(np.uint8(np.round(normalised * 255))).resize(image.size, PIL.Image.BILINEAR)
        colored = colormaps["jet"](np.asarray(heat) / 255.0)[..., :3]
        panels.append(PIL.Image.blend(image, PIL.Image.fromarray(np.uint8(np.round(colored * 255))), opacity))
    grid = PIL.Image.new("RGB", (image.width * len(panels), image.height))
    for k, panel in enumerate(panels):
        grid.paste(panel, (k * image.width, 0))
    return grid
