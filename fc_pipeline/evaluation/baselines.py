"""Pipelines scored under the evaluation protocol besides FastComposer checkpoints.

The runner calls any pipeline as ``pipe(prompt=str, subject_images=list[PIL.Image], alpha=float,
num_images_per_prompt=int, generator=list[torch.Generator], num_inference_steps=int,
guidance_scale=float, height=int, width=int, **kwargs)`` and reads ``.images`` (and, when present,
``.attention_maps``) from the result. :class:`PlainStableDiffusion` wraps a diffusers
``StableDiffusionPipeline`` to that call: the plain-SD row of a report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image

from fc_pipeline.evaluation.prompt_consistency import strip_markers


class PlainStableDiffusion:
    """``StableDiffusionPipeline`` under the evaluation protocol: text only (subjects and α ignored,
    ``<|image|>`` markers removed from the prompt), so it is generated once per case at α = 0."""

    text_only = True
    method_name = "plain Stable Diffusion"

    def __init__(self, pipe):
        self.pipe = pipe

    @classmethod
    def from_pretrained(cls, path: str | Path, torch_dtype: torch.dtype | None = None) -> PlainStableDiffusion:
        """The SD components (vae, unet, text encoder, tokenizer, scheduler) of a diffusers directory.

        Works on a Stable Diffusion checkpoint and on a FastComposer checkpoint alike (its extra
        components are left out); no safety checker, as in the paper's evaluation.
        """
        from diffusers import StableDiffusionPipeline

        path = Path(path)
        if not (path / "model_index.json").is_file():
            raise ValueError(f"baseline checkpoint {path} is not a diffusers directory (no model_index.json)")
        pipe = StableDiffusionPipeline.from_pretrained(
            path,
            torch_dtype=torch_dtype,
            safety_checker=None,
            feature_extractor=None,
            image_encoder=None,
            requires_safety_checker=False,
        )
        return cls(pipe)

    @property
    def device(self) -> torch.device:
        return self.pipe.device

    @property
    def scheduler(self):
        return self.pipe.scheduler

    @scheduler.setter
    def scheduler(self, scheduler) -> None:
        self.pipe.scheduler = scheduler

    def to(self, device: str | torch.device) -> PlainStableDiffusion:
        self.pipe.to(device)
        return self

    def set_progress_bar_config(self, **kwargs: Any) -> None:
        self.pipe.set_progress_bar_config(**kwargs)

    def __call__(
        self,
        prompt: str,
        subject_images: list[Image.Image] | None = None,
        alpha: float = 0.0,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 5.0,
        height: int | None = None,
        width: int | None = None,
        **kwargs: Any,
    ):
        return self.pipe(
            prompt=strip_markers(prompt),
            num_images_per_prompt=num_images_per_prompt,
            generator=generator,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            height=height,
            width=width,
        )
