"""Subject conditioning (paper §4.1): image embeddings of the references, fused into the text."""

from __future__ import annotations

import torch
from transformers import CLIPTextModel, CLIPVisionModelWithProjection

from fc_pipeline.model.fuser import SubjectFuser


def _placement(module: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    # works for wrapped modules too (DistributedDataParallel has no .device/.dtype)
    parameter = next(module.parameters())
    return parameter.device, parameter.dtype


def encode_text(text_encoder: CLIPTextModel, input_ids: torch.Tensor) -> torch.Tensor:
    """Per-token text embeddings ``c`` ``[B, T, D]`` (the last hidden state, as Stable Diffusion uses)."""
    return text_encoder(input_ids.to(_placement(text_encoder)[0]))[0]


def encode_subject_images(image_encoder: CLIPVisionModelWithProjection, pixel_values: torch.Tensor) -> torch.Tensor:
    """Projected CLIP image embeddings ``v`` ``[B, S, D]`` of CLIP-normalised references ``[B, S, 3, H, W]``."""
    if pixel_values.ndim != 5:
        raise ValueError(f"pixel_values must be [batch, subjects, 3, H, W], got {tuple(pixel_values.shape)}")
    batch, subjects = pixel_values.shape[:2]
    device, dtype = _placement(image_encoder)
    flat = pixel_values.flatten(0, 1).to(device=device, dtype=dtype)
    return image_encoder(pixel_values=flat).image_embeds.view(batch, subjects, -1)


def augment_text_embeddings(
    text_embeds: torch.Tensor,
    image_embeds: torch.Tensor,
    fuser: SubjectFuser,
    subject_token_index: torch.Tensor,
    subject_valid: torch.Tensor,
) -> torch.Tensor:
    """The subject-augmented conditioning ``c'`` ``[B, T, D]``: the fuser at valid subject tokens."""
    device = text_embeds.device
    return fuser(text_embeds, image_embeds.to(device), subject_token_index.to(device), subject_valid.to(device))
