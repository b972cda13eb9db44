"""Benchmark runner (paper §5): generate every case at every α, score it, write the report.

``run_evaluation(checkpoint, subjects_dir, out_dir)`` is the one call the CLI and the Dagster
asset make. α = 0 is the checkpoint's own text-only row (no subject images: exactly SD with the
checkpoint's components), generated in the same run with the same seeds, so every α row differs
only in conditioning. Several checkpoints (a mapping label → directory) are evaluated on identical
cases and compared. Besides checkpoint directories, any pipeline object that takes the protocol's
call (see :mod:`fc_pipeline.evaluation.baselines`) is scored by the same prompts, seeds and
metrics; ``baseline_checkpoint`` adds a plain Stable Diffusion row.
"""

from __future__ import annotations

import dataclasses
import gc
import importlib
import re
import resource
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch
from PIL import Image

from fc_pipeline.evaluation.baselines import PlainStableDiffusion
from fc_pipeline.evaluation.faces import MATCHERS, DetectedFaces, FaceScorer, default_face_scorer
from fc_pipeline.evaluation.prompt_consistency import PromptConsistency, default_prompt_scorer, strip_markers
from fc_pipeline.evaluation.prompts import BenchmarkCase, benchmark_cases, load_prompt_set
from fc_pipeline.evaluation.report import plot_alpha_sweep, plot_attention, plot_grid, summarise, write_report
from fc_pipeline.evaluation.subjects import DEFAULT_CLASS_WORD, load_subjects
from fc_pipeline.pretrained import check_checkpoint_memory
from fc_pipeline.profiles import ModelProfile
from fc_pipeline.schedulers import scheduler_class, with_scheduler
from fc_pipeline.settings import SettingError, resolve_device, setting, validate
from fc_pipeline.storage import atomic_write, write_json, write_parquet

PAPER_ALPHA_SWEEP = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
TEXT_ONLY_METHOD = "this checkpoint, text only"
BASELINE_LABEL = "plain-sd"
PIPELINE_REFERENCE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")  # "package.module:factory"


@dataclass(frozen=True)
class EvaluationConfig:
    """What to generate and how to score it, each setting declared once: the ``evaluate`` command's
    flags and the Dagster config of ``evaluation_report`` derive from these fields. Defaults follow
    the paper; the caps keep demos fast."""

    prompt_sets: tuple[str, ...] = setting(
        ("single",), "Prompt sets: single, multi or JSON files (see fc_pipeline.evaluation.prompts)."
    )
    images_per_prompt: int = setting(4, "Images generated per prompt and subject group.", min=1)
    alphas: tuple[float, ...] = setting(
        (0.7,),
        "Delayed-conditioning ratios α (share of the steps, at the end, conditioned on the subjects).",
        paper="0.7 (0.6–0.8)",
        min=0,
        max=1,
    )
    text_only_baseline: bool = setting(True, "Add α = 0: the checkpoint without subject images (plain SD).")
    num_inference_steps: int = setting(50, "Denoising steps.", paper=50, min=1)
    guidance_scale: float = setting(5.0, "Classifier-free guidance scale.", paper=5.0, min=0)
    seed: int = setting(0, "Seed of the first image of each prompt (image k uses seed + k).")
    height: int | None = setting(None, "Image height in px; empty: the model's.", min=8)
    width: int | None = setting(None, "Image width in px; empty: the model's.", min=8)
    max_prompts: int | None = setting(None, "Use only the first N prompts; empty: all.", min=1)
    max_subject_groups: int | None = setting(None, "Use only the first N subjects / pairs; empty: all.", min=1)
    class_word: str = setting(DEFAULT_CLASS_WORD, "Class word of subjects not in subjects.json.")
    matching: str = setting(
        "greedy", "Face-to-reference matching of multi-subject images.", paper="greedy", choices=MATCHERS
    )
    grid_samples: int = setting(4, "Cases shown in the report's image grids.", min=0)
    attention_samples: int = setting(2, "Multi-subject cases whose attention maps the report shows.", min=0)
    baseline_checkpoint: str | None = setting(None, "A diffusers directory: adds a plain Stable Diffusion row (α = 0).")
    scheduler: str | None = setting(
        None, "Sampler: pndm, ddim, dpm, euler, euler_a, lms, unipc, ... or a diffusers class; empty: the checkpoint's."
    )

    def __post_init__(self):
        validate(self)
        if self.scheduler is not None:
            try:
                scheduler_class(self.scheduler)
            except ValueError as exc:
                raise SettingError("scheduler", str(exc)) from None
        if not self.prompt_sets:
            raise SettingError("prompt_sets", "must name at least one prompt set ('single', 'multi' or a JSON file)")
        if not self.alphas:
            raise SettingError("alphas", "must name at least one α in [0, 1]")

    @property
    def alpha_values(self) -> list[float]:
        """The α values generated, ascending (0 = the text-only baseline)."""
        return sorted(set(map(float, self.alphas)) | ({0.0} if self.text_only_baseline else set()))

    @property
    def main_alpha(self) -> float:
        """The α whose images fill the grids and attention maps: the first positive configured α."""
        return next((float(a) for a in self.alphas if a > 0), max(self.alpha_values))


def _peak_memory_mb(device: torch.device) -> tuple[float, str]:
    """Peak memory so far: CUDA allocator peak on GPU, process peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process_peak_rss"


@dataclass
class _Generation:
    case: BenchmarkCase
    alpha: float
    images: list[Image.Image]
    image_paths: list[str]
    attention_maps: list | None


def evaluate_pipeline(
    pipe,
    cases: Sequence[BenchmarkCase],
    config: EvaluationConfig,
    out_dir: str | Path,
    label: str = "checkpoint",
    faces: FaceScorer | None = None,
    prompt_scorer: PromptConsistency | None = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[list[dict[str, Any]], list[_Generation]]:
    """Generate and score every case at every α with one pipeline; returns per-image rows and samples.

    ``pipe`` is a :class:`~fc_pipeline.pipeline.FastComposerPipeline` or any object taking the
    protocol's call (see :mod:`fc_pipeline.evaluation.baselines`); one with ``text_only = True`` is
    generated at α = 0 only.
    """
    faces = faces or default_face_scorer()
    prompt_scorer = prompt_scorer or default_prompt_scorer()
    out = Path(out_dir)
    device = torch.device(getattr(pipe, "device", "cpu"))
    method = _method_name(pipe)
    text_only_pipe = bool(getattr(pipe, "text_only", False))
    alphas = [0.0] if text_only_pipe else config.alpha_values
    reference_faces: dict[str, DetectedFaces] = {}
    rows: list[dict[str, Any]] = []
    samples: list[_Generation] = []
    attention_budget = config.attention_samples
    # One untimed step first, so one-time setup (kernels, allocator) is not billed to the first case.
    pipe(
        prompt="a photo",
        subject_images=[],
        alpha=0.0,
        num_images_per_prompt=1,
        generator=[torch.Generator("cpu").manual_seed(config.seed)],
        num_inference_steps=1,
        guidance_scale=config.guidance_scale,
        height=config.height,
        width=config.width,
    )
    for number, case in enumerate(cases, 1):
        references = [s.reference_image() for s in case.subjects]
        for subject, image in zip(case.subjects, references):
            if subject.name not in reference_faces:
                reference_faces[subject.name] = faces.faces(image)
        ref_faces = [reference_faces[s.name] for s in case.subjects]
        for alpha in alphas:
            text_only = alpha == 0.0
            want_attention = (
                not text_only and len(case.subjects) > 1 and attention_budget > 0 and alpha == config.main_alpha
            )
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            generators = [torch.Generator("cpu").manual_seed(config.seed + k) for k in range(config.images_per_prompt)]
            start = time.perf_counter()
            output = pipe(
                prompt=strip_markers(case.prompt) if text_only else case.prompt,
                subject_images=[] if text_only else references,
                alpha=alpha,
                num_inference_steps=config.num_inference_steps,
                guidance_scale=config.guidance_scale,
                height=config.height,
                width=config.width,
                num_images_per_prompt=config.images_per_prompt,
                generator=generators,
                return_attention_maps=want_attention,
            )
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = (time.perf_counter() - start) / config.images_per_prompt
            memory_mb, memory_kind = _peak_memory_mb(device)
            attention_budget -= int(want_attention)
            paths = []
            for k, image in enumerate(output.images):
                path = out / "images" / label / case.case_id / f"alpha{alpha:.2f}_{k}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                with atomic_write(path) as handle:
                    image.save(handle, format="PNG")
                paths.append(path.relative_to(out).as_posix())
            consistency = prompt_scorer.score(list(output.images), [case.prompt] * len(output.images))
            for k, image in enumerate(output.images):
                generated = faces.faces(image)
                row = {
                    "checkpoint": label,
                    "setting": "multi" if len(case.subjects) > 1 else "single",
                    "method": TEXT_ONLY_METHOD if text_only and not text_only_pipe else method,
                    "alpha": alpha,
                    "case_id": case.case_id,
                    "category": case.category,
                    "template": case.template,
                    "prompt": case.prompt,
                    "subjects": [s.name for s in case.subjects],
                    "seed": config.seed + k,
                    "image": paths[k],
                    "n_faces": len(generated),
                }
                row.update(_identity_columns(faces, ref_faces, generated, config.matching))
                row.update(
                    prompt_consistency=float(consistency[k]),
                    seconds_per_image=seconds,
                    peak_memory_mb=memory_mb,
                    memory_kind=memory_kind,
                )
                rows.append(row)
            samples.append(
                _Generation(case, alpha, list(output.images), paths, getattr(output, "attention_maps", None))
            )
        if progress:
            progress(f"[{label}] case {number}/{len(cases)} {case.case_id}")
    return rows, samples


def _identity_columns(
    faces: FaceScorer, references: list[DetectedFaces], generated: DetectedFaces, matching: str
) -> dict[str, Any]:
    if len(references) == 1:
        # the official single-subject protocol: the generated image's largest face, not the best match
        identity = faces.identity_score(references[0], generated)
        return {
            "identity": identity,
            "identity_hungarian": identity,
            "subject_identity": [identity],
            "other_similarity": None,
            "margin": None,
        }
    result = faces.multi_identity(references, generated, matching)
    return {
        "identity": result.score,
        "identity_hungarian": faces.multi_identity(references, generated, "hungarian").score,
        "subject_identity": [float(s) for s in result.scores],
        "other_similarity": max((o for o in result.other_similarity if o is not None), default=None),
        "margin": result.mean_margin,
    }


def _method_name(pipe) -> str:
    from fc_pipeline.pipeline import FastComposerPipeline

    if isinstance(pipe, FastComposerPipeline):
        return "FastComposer"
    return getattr(pipe, "method_name", type(pipe).__name__)


def load_pipeline_reference(reference: str):
    """The pipeline that ``"package.module:factory"`` builds: ``factory()`` (a function or class taking
    no arguments) must return an object taking the protocol's call. How the CLI and Dagster name one."""
    module, _, name = reference.partition(":")
    try:
        factory = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"pipeline {reference!r}: cannot import {name!r} from {module!r} ({exc})") from None
    return factory()


def _is_reference(source) -> bool:
    return isinstance(source, (str, Path)) and bool(PIPELINE_REFERENCE.match(str(source))) and not Path(source).exists()


def _load_pipeline(source, device: str | None, torch_dtype, baseline: bool = False):
    """A pipeline object as given or built by a ``module:factory`` reference, or one loaded from a
    checkpoint directory (``baseline``: plain SD)."""
    if _is_reference(source) and not baseline:
        source = load_pipeline_reference(str(source))
    if not isinstance(source, (str, Path)):
        if not callable(source):
            raise ValueError(f"cannot evaluate a {type(source).__name__}: give a checkpoint directory or a pipeline")
        return source
    path = Path(source)
    if baseline:
        pipe = PlainStableDiffusion.from_pretrained(path, torch_dtype=torch_dtype)
    else:
        from fc_pipeline.pipeline import FastComposerPipeline

        if not (path / "model_index.json").is_file():
            raise ValueError(f"{path} is not a FastComposer checkpoint (no model_index.json)")
        check_checkpoint_memory("evaluate", path, resolve_device(device), torch_dtype)
        pipe = FastComposerPipeline.from_pretrained(path, dtype=torch_dtype)
    return pipe.to(resolve_device(device))


def _label(checkpoint, index: int) -> str:
    if _is_reference(checkpoint):
        return str(checkpoint).rpartition(":")[2]
    return Path(checkpoint).name if isinstance(checkpoint, (str, Path)) else f"checkpoint{index}"


def run_evaluation(
    checkpoint,
    subjects_dir: str | Path,
    out_dir: str | Path,
    config: EvaluationConfig | None = None,
    *,
    profile: ModelProfile | str = "paper",
    device: str | None = None,
    torch_dtype: torch.dtype | None = None,
    faces: FaceScorer | None = None,
    prompt_scorer: PromptConsistency | None = None,
    progress: Callable[[str], None] | None = None,
    **config_overrides: Any,
) -> dict[str, Any]:
    """Evaluate one checkpoint (a directory, a pipeline object or a ``"package.module:factory"``
    reference to one), or several as ``{label: checkpoint}``.

    ``profile`` picks the scorers not passed in: ``paper`` (CLIP ViT-L/14 and vggface2 FaceNet, from
    local files; a clear error says how to get them) or ``tiny`` (the real offline FaceNet and a
    random CLIP, whose prompt consistency every output marks "random scorer — not meaningful").
    Writes ``scores.parquet`` (per image), ``summary.json``, ``alpha_sweep.png``, grids, attention
    maps, ``report.md`` and a self-contained ``report.html`` under ``out_dir``; returns the summary
    rows, the headline numbers at the main α, the scorers, the notes on their columns and the paths.
    """
    config = dataclasses.replace(config or EvaluationConfig(), **config_overrides)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    subjects = load_subjects(subjects_dir, class_word=config.class_word)
    cases = [
        case
        for name in config.prompt_sets
        for case in benchmark_cases(subjects, load_prompt_set(name), config.max_prompts, config.max_subject_groups)
    ]
    score_device = resolve_device(device)
    faces = faces or default_face_scorer(profile, score_device)
    prompt_scorer = prompt_scorer or default_prompt_scorer(profile, score_device)
    checkpoints = dict(checkpoint) if isinstance(checkpoint, Mapping) else {_label(checkpoint, 0): checkpoint}
    sources = [(label, source, False) for label, source in checkpoints.items()]
    if config.baseline_checkpoint:
        if BASELINE_LABEL in checkpoints:
            raise ValueError(f"the label {BASELINE_LABEL!r} is taken by the baseline checkpoint; rename the other one")
        sources.append((BASELINE_LABEL, config.baseline_checkpoint, True))
    notes = {"prompt_consistency": prompt_scorer.note} if prompt_scorer.note else {}

    started = time.perf_counter()
    rows, figures = [], {"Identity vs prompt consistency": [], "Reference | generated": [], "Attention maps": []}
    for label, source, baseline in sources:
        pipe = _load_pipeline(source, device, torch_dtype, baseline)
        if config.scheduler is not None and not hasattr(pipe, "scheduler"):
            raise ValueError(f"scheduler {config.scheduler!r}: the pipeline {label!r} has no .scheduler to swap")
        pipe = with_scheduler(pipe, config.scheduler)
        if hasattr(pipe, "set_progress_bar_config"):
            pipe.set_progress_bar_config(disable=True)
        label_rows, samples = evaluate_pipeline(pipe, cases, config, out, label, faces, prompt_scorer, progress)
        rows += label_rows
        figures["Reference | generated"].append(_grid_figure(samples, config, out / "grids" / f"{label}.png"))
        figures["Attention maps"] += _attention_figures(samples, out / "attention" / label)
        if pipe is not source:
            del pipe
            gc.collect()

    summary = summarise(rows)
    figures["Identity vs prompt consistency"].append(plot_alpha_sweep(summary, out / "alpha_sweep.png"))
    scores_path = write_parquet(pa.Table.from_pylist(rows), out / "scores.parquet")
    scorers = {
        "identity": f"MTCNN + FaceNet {faces.embedder.name}",
        "prompt_consistency": prompt_scorer.description,
    }
    settings = {
        "checkpoints": ", ".join(f"{k}={v if isinstance(v, (str, Path)) else type(v).__name__}" for k, v, _ in sources),
        "subjects": f"{len(subjects)} from {subjects_dir}",
        "cases": len(cases),
        **{f"{metric} scorer": text for metric, text in scorers.items()},
        **dataclasses.asdict(config),
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    report = write_report(out, summary, figures, settings, notes)
    first = next(iter(checkpoints))
    headline = {
        r["setting"]: {
            "identity_pct": r["identity_pct"],
            "prompt_consistency": r["prompt_consistency"],
            "margin": r["margin"],
            **{f"{metric}_note": note for metric, note in notes.items()},
        }
        for r in summary
        if r["checkpoint"] == first and r["alpha"] == config.main_alpha
    }
    result = {
        "summary": summary,
        "headline": headline,  # first checkpoint at the main α, per setting
        "main_alpha": config.main_alpha,
        "scorers": scorers,
        "notes": notes,  # metric -> why its numbers are not meaningful (the tiny profile's random CLIP)
        "images": len(rows),
        "paths": {
            "scores": str(scores_path),
            "report": str(report["markdown"]),
            "html": str(report["html"]),
            "alpha_sweep": str(out / "alpha_sweep.png"),
        },
    }
    write_json(result, out / "summary.json")
    return result


def _grid_figure(samples: Sequence[_Generation], config: EvaluationConfig, path: Path) -> Path:
    by_case: dict[str, dict[str, Any]] = {}
    for sample in samples:
        entry = by_case.setdefault(
            sample.case.case_id,
            {
                "title": sample.case.prompt,
                "references": [(s.name, s.reference_image()) for s in sample.case.subjects],
                "generated": [],
            },
        )
        entry["generated"].append(("text only" if sample.alpha == 0 else f"α={sample.alpha:g}", sample.images[0]))
    return plot_grid(list(by_case.values())[: config.grid_samples], path)


def _attention_figures(samples: Sequence[_Generation], folder: Path) -> list[Path]:
    paths = []
    for sample in samples:
        if sample.attention_maps is None:
            continue
        names = [s.name for s in sample.case.subjects]
        path = folder / f"{sample.case.case_id}_alpha{sample.alpha:.2f}.png"
        paths.append(plot_attention(sample.images[0], sample.attention_maps[0], names, sample.case.prompt, path))
    return paths
