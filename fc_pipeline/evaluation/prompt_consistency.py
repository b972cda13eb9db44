"""Prompt consistency (paper §5): CLIP ViT-L/14 image–text cosine × 100 of the marker-free prompt."""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fc_pipeline.profiles import PROFILES, SUBJECT_MARKER, ModelProfile, clip_tokenizer, get_profile

PAPER_PROMPT_CLIP = PROFILES["paper"].prompt_clip

# How reports mark a prompt-consistency number scored by the tiny profile's random CLIP.
RANDOM_SCORER_NOTE = "random scorer — not meaningful"


def strip_markers(prompt: str) -> str:
    """The prompt as plain text: subject markers removed, whitespace normalised."""
    return re.sub(r"\s+", " ", prompt.replace(SUBJECT_MARKER, " ")).strip()


class PromptConsistency:
    """CLIP image–text similarity of generated images and their prompts, loaded once.

    The ``paper`` profile loads CLIP ViT-L/14 from a local directory or the Hugging Face cache (nothing
    is downloaded at run time); ``tiny`` builds a random CLIP whose scores are not meaningful
    (:attr:`note` says so, and reports carry it).
    """

    def __init__(self, profile: ModelProfile | str = "paper", device: str | torch.device = "cpu"):
        from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer
        from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

        self.profile = get_profile(profile)
        self.device = torch.device(device)
        self.random = self.profile.tiny
        if self.profile.tiny:
            torch.manual_seed(self.profile.seed)
            self.model = CLIPModel(CLIPConfig(**self.profile.tiny_configs["prompt_clip"]))
            self.tokenizer = clip_tokenizer(self.profile)
            self.image_processor = CLIPImageProcessor(
                size={"shortest_edge": 224},
                crop_size={"height": 224, "width": 224},
                image_mean=OPENAI_CLIP_MEAN,
                image_std=OPENAI_CLIP_STD,
            )
        else:
            source = self.profile.prompt_clip
            try:
                self.model = CLIPModel.from_pretrained(source, local_files_only=True)
                self.tokenizer = CLIPTokenizer.from_pretrained(source, local_files_only=True)
                self.image_processor = CLIPImageProcessor.from_pretrained(source, local_files_only=True)
            except (OSError, ValueError):
                raise FileNotFoundError(_missing_clip_message(source)) from None
        self.model.eval().to(self.device)

    @property
    def note(self) -> str | None:
        """``RANDOM_SCORER_NOTE`` when the scores come from a random model, else ``None``."""
        return RANDOM_SCORER_NOTE if self.random else None

    @property
    def description(self) -> str:
        """Which model scores, in words (for reports)."""
        if self.random:
            return f"random tiny CLIP (seed {self.profile.seed}) — {RANDOM_SCORER_NOTE}"
        return f"CLIP {self.profile.prompt_clip}"

    @torch.no_grad()
    def score(self, images: list[Image.Image], prompts: list[str]) -> np.ndarray:
        """Cosine × 100 of each image with its prompt (markers stripped); one value per pair."""
        if len(images) != len(prompts):
            raise ValueError(f"got {len(images)} images for {len(prompts)} prompts; pass one prompt per image")
        if not images:
            return np.zeros((0,), np.float32)
        text = self.tokenizer(
            [strip_markers(p) for p in prompts],
            padding="max_length",
            truncation=True,
            max_length=self.tokenizer.model_max_length,
            return_tensors="pt",
        )
        pixels = self.image_processor([im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
        image_embeds = self.model.get_image_features(pixel_values=pixels.to(self.device))
        text_embeds = self.model.get_text_features(
            input_ids=text["input_ids"].to(self.device), attention_mask=text["attention_mask"].to(self.device)
        )
        image_embeds, text_embeds = (_features(x) for x in (image_embeds, text_embeds))
        cosine = torch.nn.functional.cosine_similarity(image_embeds, text_embeds, dim=-1)
        return (100.0 * cosine).float().cpu().numpy()


def _missing_clip_message(source: str) -> str:
    """How to get the evaluation CLIP when ``source`` (a hub id or a directory) is not on disk."""
    if Path(source).expanduser().is_absolute() or source.startswith("."):
        where, fetch = f"no CLIP model directory at {source}", f"hf download {PAPER_PROMPT_CLIP} --local-dir {source}"
    else:
        where, fetch = f"{source} is not in the Hugging Face cache", f"hf download {source}"
    return (
        f"prompt consistency needs CLIP ViT-L/14 weights, and nothing is downloaded at run time: {where}; "
        f"fetch them once with `{fetch}` or point --prompt-clip at a local model directory "
        f"(--profile tiny scores with a random CLIP instead: {RANDOM_SCORER_NOTE})"
    )


def _features(output) -> torch.Tensor:
    # transformers 5 may return a model output object instead of the pooled tensor.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


@lru_cache(maxsize=4)
def default_prompt_scorer(profile: ModelProfile | str = "paper", device: str = "cpu") -> PromptConsistency:
    """A process-wide :class:`PromptConsistency` per (profile, device)."""
    return PromptConsistency(profile, device)


def prompt_consistency(
    images: list[Image.Image], prompts: list[str], scorer: PromptConsistency | None = None
) -> np.ndarray:
    """CLIP score (cosine × 100) per image–prompt pair; see :class:`PromptConsistency`."""
    return (scorer or default_prompt_scorer()).score(images, prompts)
