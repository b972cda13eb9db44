"""The pretrained models of the ``paper`` profile: a model store in one local folder, loaded without
the network; download, check and memory plan.

``FC_PIPELINE_MODELS=DIR`` (the CLI's ``--models DIR``, a model resource's ``models_dir``) makes each
``paper`` model load from ``DIR/<model id>``, in the layout its own library saves and loads:

=====================  ====================================================  =========================
model                  folder under DIR                                      layout
=====================  ====================================================  =========================
BLIP-2 captioner       ``Salesforce/blip2-opt-6.7b-coco``                    transformers
Mask2Former segmenter  ``facebook/mask2former-swin-large-coco-panoptic``     transformers
OpenCLIP matcher       ``ViT-H-14/laion2b_s32b_b79k``                        open_clip ``local-dir:``
SBERT                  ``sentence-transformers/stsb-mpnet-base-v2``          sentence-transformers
Stable Diffusion 1.5   ``stable-diffusion-v1-5/stable-diffusion-v1-5``       diffusers
CLIP ViT-L/14          ``openai/clip-vit-large-patch14``                     transformers
FaceNet (vggface2)     ``facenet-pytorch/20180402-114759-vggface2.pt``       a state-dict file
=====================  ====================================================  =========================

With a store every loader passes ``local_files_only=True``: nothing is looked up on a hub. Ids that
are already local paths (``get_profile("paper", captioner="/models/blip2")``) are kept as they are.
:func:`download` fills a store where the hub is reachable; :func:`check` says what is there and how
big each model is; :func:`plan_step` states the accelerator memory of a step and :func:`ensure_fits`
refuses a step that cannot fit, before anything is loaded.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from fc_pipeline.profiles import ModelProfile, get_profile, paper_config

MODELS_ENV = "FC_PIPELINE_MODELS"
FACENET_WEIGHTS = {"vggface2": "20180402-114759-vggface2.pt"}  # facenet-pytorch's release file names
FACENET_RELEASE = "https://github.com/timesler/facenet-pytorch/releases/download/v2.2.9/"
OPEN_CLIP_PREFIX = "local-dir:"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
GIB = 1024**3
# Files a download skips: other frameworks' weights, fp16/EMA duplicates, the unused SD safety checker.
SKIPPED_FILES = [
    "*.msgpack",
    "*.h5",
    "*.ot",
    "*.onnx",
    "*.onnx_data",
    "*.tflite",
    "flax_model*",
    "tf_model*",
    "rust_model*",
    "*.ckpt",
    "*fp16*",
    "*non_ema*",
    "*.ema.*",
    "safety_checker/*",
    "onnx/*",
    "openvino/*",
]


@dataclass(frozen=True)
class StoredModel:
    """One model of a profile: the profile fields that name it, its id and where it lives."""

    name: str
    fields: tuple[str, ...]
    model_id: str
    library: str
    marker: str  # the file whose presence means "stored" ("" when the id itself is the file)
    path: Path | None = None  # set by :func:`stored_models` when a store or a local path is known

    @property
    def present(self) -> bool:
        """Whether the model is on disk: its marker file and some weights (or the weights file itself)."""
        if self.path is None or not self.marker:
            return self.path is not None and self.path.is_file()
        return (self.path / self.marker).is_file() and any(
            p.suffix in WEIGHT_SUFFIXES for p in self.path.rglob("*") if p.is_file()
        )

    def files(self) -> list[Path]:
        """The files of the stored model (empty when missing)."""
        if self.path is None or not self.path.exists():
            return []
        return [self.path] if self.path.is_file() else sorted(p for p in self.path.rglob("*") if p.is_file())


def store_root(models_dir: str | os.PathLike | None = None) -> Path | None:
    """The store folder: ``models_dir`` (``""``: none), else ``$FC_PIPELINE_MODELS``, else ``None``."""
    root = os.environ.get(MODELS_ENV) if models_dir is None else models_dir
    return Path(root).expanduser().resolve() if root else None


def _is_local(value: str) -> bool:
    return value.startswith((OPEN_CLIP_PREFIX, "/", "~", ".")) or Path(value).exists()


def stored_models(
    profile: ModelProfile | str = "paper", models_dir: str | os.PathLike | None = None
) -> list[StoredModel]:
    """The models of a (non-tiny) profile, each with its place in the store (or its local path)."""
    profile = get_profile(profile, models_dir="") if isinstance(profile, str) else profile
    if profile.tiny:
        raise ValueError(f"profile {profile.name!r} builds its models offline; the model store is for 'paper'")
    root = store_root(models_dir)
    clip_weights = profile.matcher_clip_pretrained  # an open_clip tag, or a local weights file used as it is
    clip_is_file = bool(clip_weights) and _is_local(clip_weights)
    roles = [
        ("captioner", ("captioner",), profile.captioner, "transformers", "config.json"),
        ("segmenter", ("segmenter",), profile.segmenter, "transformers", "config.json"),
        (
            "matcher_clip",
            ("matcher_clip", "matcher_clip_pretrained"),
            clip_weights if clip_is_file else f"{profile.matcher_clip}/{clip_weights}".rstrip("/"),
            "open_clip",
            "" if clip_is_file else "open_clip_config.json",
        ),
        ("sbert", ("sbert",), profile.sbert, "sentence-transformers", "modules.json"),
        ("stable_diffusion", ("stable_diffusion",), profile.stable_diffusion, "diffusers", "model_index.json"),
        ("image_encoder", ("image_encoder",), profile.image_encoder, "transformers", "config.json"),
        ("prompt_clip", ("prompt_clip",), profile.prompt_clip, "transformers", "config.json"),
        (
            "facenet",
            ("facenet",),
            f"facenet-pytorch/{FACENET_WEIGHTS[profile.facenet]}"
            if profile.facenet in FACENET_WEIGHTS
            else profile.facenet,
            "facenet-pytorch",
            "",
        ),
    ]
    models: dict[str, StoredModel] = {}
    for name, fields, model_id, library, marker in roles:
        if model_id in models:  # one model serving two roles (CLIP ViT-L/14: subject encoder and evaluation)
            first = models[model_id]
            models[model_id] = dataclasses.replace(first, name=f"{first.name}+{name}", fields=first.fields + fields)
            continue
        if _is_local(model_id):
            path = Path(model_id.removeprefix(OPEN_CLIP_PREFIX)).expanduser()
        else:
            path = root / model_id if root else None
        models[model_id] = StoredModel(name, fields, model_id, library, marker, path)
    return list(models.values())


def use_store(profile: ModelProfile, models_dir: str | os.PathLike | None = None) -> ModelProfile:
    """The profile with each hub id replaced by its folder in the store; unchanged without a store."""
    root = store_root(models_dir)
    if root is None or profile.tiny:
        return profile
    changes: dict[str, str] = {"models_dir": str(root)}
    for model in stored_models(profile, root):
        if _is_local(model.model_id):
            continue
        if model.library == "open_clip":  # the folder holds config + weights; no pretrained tag any more
            changes.update(matcher_clip=f"{OPEN_CLIP_PREFIX}{model.path}", matcher_clip_pretrained="")
        else:
            changes.update({field: str(model.path) for field in model.fields})
    return dataclasses.replace(profile, **changes)


# --- sizes: meta-device parameter counts of the paper's architectures ---
def _config(component: str) -> dict[str, Any]:
    return {k: v for k, v in paper_config(component).items() if not k.startswith("_") and k != "model_type"}


def _build_meta(name: str, profile: ModelProfile) -> dict[str, Any]:
    """The model(s) behind ``name`` on the meta device, keyed by part."""
    if name in ("stable_diffusion", "image_encoder", "fuser"):  # the FastComposer model's own builders
        from fc_pipeline.model.components import build_component, build_fuser

        if name == "fuser":
            text = build_component("text_encoder", paper_config("text_encoder"))
            return {"fuser": build_fuser(text, build_component("image_encoder", paper_config("image_encoder")))}
        parts = ("unet", "vae", "text_encoder") if name == "stable_diffusion" else ("image_encoder",)
        return {part: build_component(part, paper_config(part)) for part in parts}
    if name == "captioner":
        from transformers import Blip2Config, Blip2ForConditionalGeneration

        return {"captioner": Blip2ForConditionalGeneration(Blip2Config(**_config("captioner")))}
    if name == "segmenter":
        from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation

        return {"segmenter": Mask2FormerForUniversalSegmentation(Mask2FormerConfig(**_config("segmenter")))}
    if name == "matcher_clip":
        import open_clip

        clip_name = profile.matcher_clip
        config = open_clip.get_model_config(clip_name)
        if config is None:
            raise ValueError(f"open_clip knows no architecture {clip_name!r} (matcher_clip)")
        return {"matcher_clip": open_clip.CLIP(**config)}
    if name == "sbert":
        from transformers import MPNetConfig, MPNetModel

        return {"sbert": MPNetModel(MPNetConfig(**_config("sbert")))}
    if name == "prompt_clip":
        from transformers import CLIPConfig, CLIPModel

        text, vision = _config("text_encoder"), _config("image_encoder")
        config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=vision["projection_dim"])
        return {"prompt_clip": CLIPModel(config)}
    if name == "facenet":
        from facenet_pytorch import InceptionResnetV1

        return {"facenet": InceptionResnetV1(pretrained=None, classify=False)}
    raise ValueError(f"unknown paper model {name!r}")


def meta_models(name: str, profile: ModelProfile | None = None) -> dict[str, Any]:
    """:func:`_build_meta` under ``accelerate.init_empty_weights`` (no memory, no weights)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        models = _build_meta(name, profile or get_profile("paper", models_dir=""))
    for model in models.values():
        if hasattr(model, "tie_weights"):  # e.g. BLIP-2's OPT head shares the input embedding
            model.tie_weights()
    return models


def parameter_count(name: str, profile: ModelProfile | None = None) -> int:
    """Parameters of a paper model (meta-device count; a role name like ``image_encoder+prompt_clip``
    counts its largest role)."""
    profile = profile or get_profile("paper", models_dir="")
    return max(_role_count(role, profile.matcher_clip) for role in name.split("+"))


@cache
def _role_count(name: str, matcher_clip: str) -> int:
    profile = get_profile("paper", models_dir="", matcher_clip=matcher_clip)
    return sum(sum(p.numel() for p in model.parameters()) for model in meta_models(name, profile).values())


def _human(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return f"{size:.1f} TiB"


def check(profile: ModelProfile | str = "paper", models_dir: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """One row per model: present or missing, files, size on disk, parameters and memory at fp16/fp32."""
    profile = get_profile(profile, models_dir="") if isinstance(profile, str) else profile
    rows = []
    for model in stored_models(profile, models_dir):
        files = model.files() if model.present else []
        params = parameter_count(model.name, profile)
        rows.append(
            {
                "model": model.name,
                "id": model.model_id,
                "path": str(model.path) if model.path else None,
                "present": model.present,
                "files": len(files),
                "bytes": sum(p.stat().st_size for p in files),
                "parameters": params,
                "fp16_gib": round(params * 2 / GIB, 2),
                "fp32_gib": round(params * 4 / GIB, 2),
            }
        )
    return rows


def format_check(rows: list[dict[str, Any]]) -> str:
    """The rows of :func:`check` as an aligned text table."""
    header = ("model", "status", "files", "on disk", "parameters", "fp16", "fp32", "path")
    lines = [
        (
            row["model"],
            "present" if row["present"] else "MISSING",
            str(row["files"]),
            _human(row["bytes"]),
            f"{row['parameters']:,}",
            f"{row['fp16_gib']:.2f} GiB",
            f"{row['fp32_gib']:.2f} GiB",
            row["path"] or f"(no store) {row['id']}",
        )
        for row in rows
    ]
    widths = [max(len(line[i]) for line in [header, *lines]) for i in range(len(header) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths)) + "  " + line[-1] for line in [header, *lines]
    )


# --- download ---
def download(
    profile: ModelProfile | str = "paper",
    models_dir: str | os.PathLike | None = None,
    log: Callable[[str], None] = print,
) -> list[StoredModel]:
    """Fill the store with every model of the profile that is missing; returns what was fetched.

    Uses the libraries' own download functions (``huggingface_hub.snapshot_download``, open_clip's
    pretrained table, facenet-pytorch's release URL), so it needs the hub and GitHub reachable.
    """
    root = store_root(models_dir)
    if root is None:
        raise ValueError(f"no model store: pass --to DIR or set {MODELS_ENV}")
    profile = get_profile(profile, models_dir="") if isinstance(profile, str) else profile
    fetched = []
    for model in stored_models(profile, root):
        if model.present:
            log(f"{model.name}: present at {model.path}")
            continue
        if _is_local(model.model_id):
            raise FileNotFoundError(f"{model.name}: the local path {model.model_id} does not hold the model")
        log(f"{model.name}: downloading {model.model_id} to {model.path}")
        if model.library == "open_clip":
            _download_open_clip(profile, model.path)
        elif model.library == "facenet-pytorch":
            _download_file(FACENET_RELEASE + model.path.name, model.path)
        else:
            _download_hub(model)
        fetched.append(model)
    return fetched


def _download_hub(model: StoredModel) -> None:
    """``snapshot_download`` of the files the library loads: safetensors when the repo has them,
    a diffusers pipeline's component folders only (not SD's single-file checkpoints)."""
    from huggingface_hub import list_repo_files, snapshot_download

    ignore = list(SKIPPED_FILES)
    if any(name.endswith(".safetensors") for name in list_repo_files(model.model_id)):
        ignore.append("*.bin")
    allow = ["model_index.json", "*/*.json", "*/*.txt", "*/*.safetensors"] if model.library == "diffusers" else None
    snapshot_download(model.model_id, local_dir=model.path, allow_patterns=allow, ignore_patterns=ignore)


def _download_open_clip(profile: ModelProfile, target: Path) -> None:
    """open_clip's own download of the profile's tag, moved into ``target`` beside the
    ``open_clip_config.json`` that ``local-dir:`` reads."""
    import shutil

    import open_clip

    from fc_pipeline.storage import write_json

    name, tag = profile.matcher_clip, profile.matcher_clip_pretrained
    pretrained = open_clip.get_pretrained_cfg(name, tag)
    if not pretrained:
        raise ValueError(f"open_clip knows no weights {tag!r} for {name!r} (matcher_clip_pretrained)")
    cache = target / ".download"
    weights = Path(open_clip.download_pretrained(pretrained, cache_dir=str(cache))).resolve()
    target.mkdir(parents=True, exist_ok=True)
    name_on_disk = "open_clip_model.safetensors" if weights.suffix == ".safetensors" else "open_clip_pytorch_model.bin"
    shutil.move(weights, target / name_on_disk)
    shutil.rmtree(cache, ignore_errors=True)
    preprocess = {k: pretrained[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in pretrained}
    write_json(
        {"model_cfg": open_clip.get_model_config(name), "preprocess_cfg": preprocess}, target / "open_clip_config.json"
    )


def _download_file(url: str, target: Path) -> None:
    import torch

    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    torch.hub.download_url_to_file(url, str(partial))
    partial.replace(target)


# --- memory plan ---
# Activation memory per sample at the paper's input sizes (512 px for Stable Diffusion): rough
# upper estimates, not counts. The weights and optimiser terms are exact (meta-device counts).
ACTIVATION_GIB = {"caption": 0.3, "segment": 0.8, "match": 0.05, "train": 1.8, "generate": 0.6, "evaluate": 0.6}
OVERHEAD_GIB = 1.0  # CUDA context, allocator slack, cuDNN workspaces
STEP_MODELS = {
    "caption": ("captioner",),
    "segment": ("segmenter",),
    "match": ("matcher_clip", "sbert"),
    "train": ("stable_diffusion", "image_encoder", "fuser"),
    "generate": ("stable_diffusion", "image_encoder", "fuser"),
    "evaluate": ("stable_diffusion", "image_encoder", "fuser", "prompt_clip", "facenet"),
}
# the steps' own defaults: build-dataset batches, the training batch per GPU, evaluation images per prompt
DEFAULT_BATCH = {"caption": 8, "segment": 4, "match": 1, "train": 16, "generate": 1, "evaluate": 4}
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
TRAIN_STATE_BYTES = 12  # per trainable parameter: fp32 gradient + AdamW's two fp32 moments


class MemoryPlanError(RuntimeError):
    """A step would not fit the accelerator's free memory."""


@dataclass(frozen=True)
class StepPlan:
    """Accelerator memory of one step, in bytes, by cause."""

    step: str
    dtype: str
    batch: int
    parameters: int
    weights: int
    optimizer: int
    activations: int
    overhead: int

    @property
    def need(self) -> int:
        return self.weights + self.optimizer + self.activations + self.overhead

    def describe(self) -> str:
        """``train: 26.1 GiB = weights 4.3 (1,270,000,000 params, float32) + optimiser ... ``."""
        parts = [f"weights {self.weights / GIB:.1f} ({self.parameters:,} params, {self.dtype})"]
        if self.optimizer:
            parts.append(f"gradients+AdamW {self.optimizer / GIB:.1f}")
        parts.append(f"activations {self.activations / GIB:.1f} (batch {self.batch})")
        parts.append(f"overhead {self.overhead / GIB:.1f}")
        return f"{self.step}: {self.need / GIB:.1f} GiB = " + " + ".join(parts)


@cache
def _counts(step: str, matcher_clip: str) -> tuple[int, int]:
    """(all parameters, trainable parameters) of a step's models."""
    total = sum(_role_count(name, matcher_clip) for name in STEP_MODELS[step])
    trainable = 0
    if step == "train":
        from fc_pipeline.model.components import set_trainable

        profile = get_profile("paper", models_dir="", matcher_clip=matcher_clip)
        models = {part: m for name in STEP_MODELS[step] for part, m in meta_models(name, profile).items()}
        trainable = sum(p.numel() for p in set_trainable(models))
    return total, trainable


def plan_step(
    step: str,
    profile: ModelProfile | str = "paper",
    dtype: str | None = None,
    batch: int | None = None,
    resolution: int | None = None,
) -> StepPlan:
    """The memory a step needs on the accelerator.

    ``dtype`` is the weights' dtype (default float32, what the steps load with; training keeps fp32
    weights under bf16 autocast); ``batch`` the step's batch (:data:`DEFAULT_BATCH`); ``resolution``
    scales the Stable Diffusion activations quadratically from 512 px.
    """
    if step not in STEP_MODELS:
        raise ValueError(f"unknown step {step!r}; choose one of {sorted(STEP_MODELS)}")
    profile = get_profile(profile, models_dir="") if isinstance(profile, str) else profile
    total, trainable = _counts(step, profile.matcher_clip)
    pixels = (resolution or profile.resolution) if step in ("train", "generate", "evaluate") else 512
    return _plan(step, total, trainable, "float32" if step == "train" else dtype, batch, pixels)


def _plan(step: str, parameters: int, trainable: int, dtype: Any, batch: int | None, resolution: int) -> StepPlan:
    """A :class:`StepPlan` from parameter counts; activations scale with the batch and quadratically
    with the image size from 512 px."""
    dtype = "float32" if dtype is None else str(dtype).removeprefix("torch.")
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPE_BYTES)}")
    batch = DEFAULT_BATCH[step] if batch is None else batch
    return StepPlan(
        step=step,
        dtype=dtype,
        batch=batch,
        parameters=parameters,
        weights=parameters * DTYPE_BYTES[dtype],
        optimizer=trainable * TRAIN_STATE_BYTES,
        activations=int(ACTIVATION_GIB[step] * GIB * batch * (resolution / 512) ** 2),
        overhead=int(OVERHEAD_GIB * GIB),
    )


def ensure_fits(plan: StepPlan, device: str = "cuda") -> tuple[int, int]:
    """``(free, total)`` bytes of the CUDA device; :class:`MemoryPlanError` when the plan needs more."""
    import torch

    free, total = torch.cuda.mem_get_info(torch.device(device))
    if plan.need > free:
        raise MemoryPlanError(
            f"{plan.describe()}; {device} has {free / GIB:.1f} GiB free of {total / GIB:.1f} GiB. "
            f"Lower the batch, use float16/bfloat16 weights, or a larger GPU (fc-pipeline models plan)."
        )
    return free, total


def check_step_memory(
    step: str,
    profile: ModelProfile | str,
    device: Any,
    dtype: Any = None,
    batch: int | None = None,
    resolution: int | None = None,
) -> StepPlan | None:
    """At the start of a GPU step: refuse it up front when it cannot fit (paper profile on CUDA only)."""
    profile = get_profile(profile) if isinstance(profile, str) else profile
    if profile.tiny or not str(device).startswith("cuda"):
        return None
    plan = plan_step(step, profile, dtype=dtype, batch=batch, resolution=resolution)
    ensure_fits(plan, str(device))
    return plan


def checkpoint_parameters(checkpoint: str | os.PathLike) -> int:
    """Parameters of a diffusers-layout checkpoint, from its safetensors headers (nothing is loaded)."""
    import math

    from safetensors import safe_open

    total = 0
    for path in sorted(Path(checkpoint).glob("*/*.safetensors")):
        with safe_open(str(path), "pt") as weights:
            total += sum(math.prod(weights.get_slice(key).get_shape()) for key in weights.keys())
    return total


def check_checkpoint_memory(
    step: str,
    checkpoint: str | os.PathLike,
    device: Any,
    dtype: Any = None,
    batch: int | None = None,
    resolution: int | None = None,
) -> StepPlan | None:
    """Before loading a FastComposer checkpoint on CUDA for ``generate``/``evaluate``: its weights
    (counted from the files) at ``dtype`` plus activations per image; :class:`MemoryPlanError` when
    it cannot fit. ``resolution`` defaults to the checkpoint's (UNet sample size × VAE scale)."""
    import json

    if not str(device).startswith("cuda"):
        return None
    if step not in ("generate", "evaluate"):
        raise ValueError(f"checkpoints are planned for generate or evaluate, not {step!r}")
    checkpoint = Path(checkpoint)
    if resolution is None:
        unet = json.loads((checkpoint / "unet" / "config.json").read_text())
        vae = json.loads((checkpoint / "vae" / "config.json").read_text())
        resolution = unet["sample_size"] * 2 ** (len(vae["block_out_channels"]) - 1)
    plan = _plan(step, checkpoint_parameters(checkpoint), 0, dtype, batch, resolution)
    ensure_fits(plan, str(device))
    return plan
