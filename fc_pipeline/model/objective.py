"""One FastComposer training forward (paper §4.2): the losses of a batch.

noise the VAE latents of the target -> condition the UNet on the subject-augmented text ``c'``
-> ``L = L_noise + λ·L_loc``. With ``use_subjects=False``, ``λ = 0`` and ``mask_loss_prob = 0`` it
is exactly plain Stable Diffusion fine-tuning (the baseline of ``benchmarks/train_step.py``).
"""

from __future__ import annotations

from typing import Any

import torch

from fc_pipeline.model.attention import AttentionCapture
from fc_pipeline.model.conditioning import augment_text_embeddings, encode_subject_images, encode_text
from fc_pipeline.model.losses import DEFAULT_LOCALIZATION_WEIGHT, denoising_loss, localization_loss_over_layers


def _subject_embeddings(image_encoder, pixel_values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``[B, S, D]`` image embeddings, computed for the valid subjects only (zeros elsewhere)."""
    valid = valid.to(pixel_values.device)
    chosen = encode_subject_images(image_encoder, pixel_values[valid][:, None])[:, 0]  # [N, D]
    embeds = chosen.new_zeros(*valid.shape, chosen.shape[-1])
    embeds[valid.to(chosen.device)] = chosen
    return embeds


def compute_losses(
    models: dict[str, Any],
    batch: dict[str, torch.Tensor],
    capture: AttentionCapture | None = None,
    *,
    localization_weight: float = DEFAULT_LOCALIZATION_WEIGHT,
    mask_loss_prob: float = 0.5,
    masked_loss: str = "batch",
    localization_average: str = "samples",
    use_subjects: bool = True,
) -> dict[str, torch.Tensor]:
    """``{"loss", "l_noise", "l_loc"}`` of a collated batch (see ``training_samples``).

    ``models`` holds vae, text_encoder, unet, scheduler, image_encoder, fuser (possibly wrapped
    for distributed training). ``masked_loss`` and ``localization_average`` choose the loss
    normalisation (see ``denoising_loss`` and ``localization_loss``; the defaults are the official
    code's). Random draws (noise, timesteps, the masked-loss flag of the batch or of each sample)
    use the global torch RNG, which ``accelerate`` checkpoints. ``L_loc`` needs ``capture`` installed on
    the UNet's localisation layers; with ``localization_weight == 0`` it is not computed at all.
    """
    vae, unet, scheduler = models["vae"], models["unet"], models["scheduler"]
    device = next(unet.parameters()).device
    pixels = batch["pixel_values"].to(device)
    valid = batch["subject_valid"].to(device)
    masks = batch["subject_masks"].to(device)
    with torch.no_grad():  # VAE and text encoder are frozen
        latents = vae.encode(pixels.to(vae.dtype)).latent_dist.sample() * vae.config.scaling_factor
        text = encode_text(models["text_encoder"], batch["input_ids"])
    noise = torch.randn_like(latents)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    target = (
        noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, timesteps)
    )

    condition = text
    if use_subjects and bool(valid.any()):
        embeds = _subject_embeddings(models["image_encoder"], batch["subject_pixel_values"], valid)
        condition = augment_text_embeddings(text, embeds, models["fuser"], batch["subject_token_index"], valid)

    localize = capture is not None and localization_weight > 0
    if localize:
        capture.token_index = batch["subject_token_index"].to(device)
    prediction = unet(noisy, timesteps, condition).sample
    draws = () if masked_loss == "batch" else (latents.shape[0],)
    masked = torch.rand(draws, device=device) < mask_loss_prob
    l_noise = denoising_loss(prediction, target, masks, valid, masked, form=masked_loss)
    l_loc = (
        localization_loss_over_layers(capture.maps, masks, valid, average=localization_average)
        if localize
        else torch.zeros((), device=device)
    )
    if capture is not None:  # maps hold autograd graphs: never keep them past the step
        capture.clear()
    loss = l_noise + localization_weight * l_loc if localize else l_noise
    return {"loss": loss, "l_noise": l_noise.detach(), "l_loc": l_loc.detach()}
