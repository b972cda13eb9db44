"""The FastComposer components: Stable Diffusion + CLIP image encoder + subject fuser.

``tiny`` builds every architecture from the small random configs of the profile (seeded, so two
calls give identical weights); ``paper`` loads the pretrained ids of the profile; a checkpoint
directory (diffusers layout, see ``FastComposerPipeline.save_pretrained``) restores all of them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import (
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

from fc_pipeline.checkpoints import refuse_pickled_weights
from fc_pipeline.model.fuser import SubjectFuser
from fc_pipeline.profiles import ModelProfile, clip_tokenizer, get_profile

# the order of FastComposerPipeline.__init__
COMPONENT_NAMES = (
    "vae",
    "text_encoder",
    "tokenizer",
    "unet",
    "scheduler",
    "image_encoder",
    "feature_extractor",
    "fuser",
)
MODEL_NAMES = ("vae", "text_encoder", "unet", "image_encoder", "fuser")


def build_component(name: str, config: dict[str, Any]):
    """A randomly initialised component (unet, vae, text_encoder, image_encoder, scheduler) from
    an architecture config. Works under ``accelerate.init_empty_weights()``."""
    config = {k: v for k, v in config.items() if not k.startswith("_") and k not in ("architectures", "model_type")}
    if name == "unet":
        return UNet2DConditionModel(**config)
    if name == "vae":
        return AutoencoderKL(**config)
    if name == "text_encoder":
        return CLIPTextModel(CLIPTextConfig(**config))
    if name == "image_encoder":
        return CLIPVisionModelWithProjection(CLIPVisionConfig(**config))
    if name == "scheduler":
        # scheduler configs are shared between samplers (e.g. DDIM's set_alpha_to_one)
        return DDPMScheduler.from_config(config)
    raise ValueError(f"unknown component {name!r}")


def build_fuser(text_encoder: CLIPTextModel, image_encoder: CLIPVisionModelWithProjection) -> SubjectFuser:
    """A fresh fuser sized for a text encoder and an image encoder."""
    return SubjectFuser(text_dim=text_encoder.config.hidden_size, image_dim=image_encoder.config.projection_dim)


def clip_image_processor() -> CLIPImageProcessor:
    """The CLIP preprocessing of reference images: 224² centre crop, CLIP mean/std."""
    return CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})


def _tiny_components(profile: ModelProfile) -> dict[str, Any]:
    parts: dict[str, Any] = {}
    with torch.random.fork_rng(devices=[]):
        for offset, name in enumerate(("vae", "text_encoder", "unet", "image_encoder")):
            torch.manual_seed(profile.seed + offset)
            parts[name] = build_component(name, profile.tiny_configs[name])
        torch.manual_seed(profile.seed + 4)
        parts["fuser"] = build_fuser(parts["text_encoder"], parts["image_encoder"])
    parts["scheduler"] = build_component("scheduler", profile.tiny_configs["scheduler"])
    parts["tokenizer"] = clip_tokenizer(profile)
    parts["feature_extractor"] = clip_image_processor()
    return parts


def _paper_components(profile: ModelProfile, torch_dtype: torch.dtype | None) -> dict[str, Any]:
    sd, clip, local = profile.stable_diffusion, profile.image_encoder, {"local_files_only": profile.offline}
    parts: dict[str, Any] = {
        "vae": AutoencoderKL.from_pretrained(sd, subfolder="vae", torch_dtype=torch_dtype, **local),
        "text_encoder": CLIPTextModel.from_pretrained(sd, subfolder="text_encoder", dtype=torch_dtype, **local),
        "tokenizer": CLIPTokenizer.from_pretrained(sd, subfolder="tokenizer", **local),
        "unet": UNet2DConditionModel.from_pretrained(sd, subfolder="unet", torch_dtype=torch_dtype, **local),
        "scheduler": DDPMScheduler.from_pretrained(sd, subfolder="scheduler", **local),
        "image_encoder": CLIPVisionModelWithProjection.from_pretrained(clip, dtype=torch_dtype, **local),
        "feature_extractor": CLIPImageProcessor.from_pretrained(clip, **local),
    }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(profile.seed)
        parts["fuser"] = build_fuser(parts["text_encoder"], parts["image_encoder"])
    return parts


def _checkpoint_components(path: Path, torch_dtype: torch.dtype | None) -> dict[str, Any]:
    missing = [name for name in COMPONENT_NAMES if not (path / name).is_dir()]
    if missing:
        raise FileNotFoundError(f"{path} is not a FastComposer checkpoint: missing {', '.join(missing)}")
    refuse_pickled_weights(path)  # before anything is read: unpickling can run code
    safe = {"use_safetensors": True}
    return {
        "vae": AutoencoderKL.from_pretrained(path, subfolder="vae", dtype=torch_dtype, **safe),
        "text_encoder": CLIPTextModel.from_pretrained(path, subfolder="text_encoder", dtype=torch_dtype, **safe),
        "tokenizer": CLIPTokenizer.from_pretrained(path, subfolder="tokenizer"),
        "unet": UNet2DConditionModel.from_pretrained(path, subfolder="unet", dtype=torch_dtype, **safe),
        # the training noise is DDPM's, whichever sampler the checkpoint ships for inference
        "scheduler": DDPMScheduler.from_pretrained(path, subfolder="scheduler"),
        "image_encoder": CLIPVisionModelWithProjection.from_pretrained(
            path, subfolder="image_encoder", dtype=torch_dtype, **safe
        ),
        "feature_extractor": CLIPImageProcessor.from_pretrained(path, subfolder="feature_extractor"),
        "fuser": SubjectFuser.from_pretrained(path, subfolder="fuser", dtype=torch_dtype, **safe),
    }


def load_components(
    profile: str | ModelProfile = "tiny", pretrained: str | Path | None = None, torch_dtype: torch.dtype | None = None
) -> dict[str, Any]:
    """All FastComposer components as a dict keyed like ``FastComposerPipeline.__init__``.

    ``pretrained`` is a checkpoint directory; without it the profile decides (tiny: random and
    seeded, paper: the pretrained ids, with a freshly initialised fuser).
    """
    profile = get_profile(profile)
    if pretrained is not None:
        return _checkpoint_components(Path(pretrained), torch_dtype)
    if not profile.tiny:
        return _paper_components(profile, torch_dtype)
    parts = _tiny_components(profile)
    if torch_dtype is not None:
        for name in MODEL_NAMES:
            parts[name].to(torch_dtype)
    return parts


def set_trainable(components: dict[str, Any], image_encoder_blocks: int = 2) -> list[torch.nn.Parameter]:
    """Freeze what the paper freezes and return the trainable parameters.

    UNet and fuser train; text encoder and VAE stay frozen; of the image encoder only the last
    ``image_encoder_blocks`` transformer blocks train.
    """
    for name in MODEL_NAMES:
        components[name].requires_grad_(False)
    components["unet"].requires_grad_(True)
    components["fuser"].requires_grad_(True)
    layers = components["image_encoder"].vision_model.encoder.layers
    if image_encoder_blocks > 0:
        for block in layers[-image_encoder_blocks:]:
            block.requires_grad_(True)
    return [p for name in MODEL_NAMES for p in components[name].parameters() if p.requires_grad]
