"""Training losses (paper §4.2): ``L = L_noise + λ·L_loc``."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

DEFAULT_LOCALIZATION_WEIGHT = 1e-3  # λ of the paper
_EPS = 1e-6
# How L_loc averages over subjects and L_noise is masked; the first of each is the official code's.
LOCALIZATION_AVERAGES = ("samples", "subjects")
MASKED_LOSS_FORMS = ("batch", "sample")


def _resize_masks(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``[B, S, H0, W0]`` -> ``[B, S, h, w]``: the covered fraction of each cell when shrinking
    (area), bilinear when enlarging, identity at equal size."""
    masks = masks.float()
    if tuple(masks.shape[-2:]) == tuple(size):
        return masks
    if masks.shape[-2] >= size[0] and masks.shape[-1] >= size[1]:
        return F.interpolate(masks, size=size, mode="area")
    return F.interpolate(masks, size=size, mode="bilinear", align_corners=False).clamp(0, 1)


def localization_loss(
    attention_probs: torch.Tensor,
    subject_token_index: torch.Tensor,
    subject_masks: torch.Tensor,
    subject_valid: torch.Tensor,
    average: str = "samples",
) -> torch.Tensor:
    """Balanced localisation loss of one cross-attention layer.

    ``attention_probs [B, heads, H*W, T]`` (softmax over T), ``subject_token_index [B, S]``,
    ``subject_masks [B, S, H0, W0]`` in [0, 1] (resized here to H×W), ``subject_valid [B, S]``.
    Per valid subject k, with A_k the head-averaged map of its token:
    ``mean(A_k over background) − mean(A_k over mask)``. ``average="samples"`` (the official
    ``get_object_localization_loss``): per sample the mean over its valid subjects, then the mean over
    the batch, a sample without subjects counting 0; ``"subjects"``: the mean over all valid subjects
    of the batch. 0 if there are none.
    """
    if average not in LOCALIZATION_AVERAGES:
        raise ValueError(f"unknown localisation loss average {average!r}; choose one of {LOCALIZATION_AVERAGES}")
    batch, _, pixels, _ = attention_probs.shape
    side = int(round(pixels**0.5))
    if side * side != pixels:
        raise ValueError(f"attention map of {pixels} positions is not square")
    subjects = subject_token_index.shape[1]
    index = subject_token_index.long().to(attention_probs.device)
    maps = attention_probs.float().mean(1)  # [B, H*W, T]
    maps = maps.gather(-1, index[:, None, :].expand(batch, pixels, subjects)).transpose(1, 2)  # [B, S, H*W]
    masks = _resize_masks(subject_masks.to(maps.device), (side, side)).flatten(2)  # [B, S, H*W]
    background = 1.0 - masks
    inside = (maps * masks).sum(-1) / (masks.sum(-1) + _EPS)
    outside = (maps * background).sum(-1) / (background.sum(-1) + _EPS)
    valid = subject_valid.to(maps.device, maps.dtype)
    per_subject = (outside - inside) * valid
    if average == "subjects":
        return per_subject.sum() / valid.sum().clamp(min=1.0)
    return (per_subject.sum(1) / valid.sum(1).clamp(min=1.0)).mean()


def localization_loss_over_layers(
    maps: Mapping[str, torch.Tensor],
    subject_masks: torch.Tensor,
    subject_valid: torch.Tensor,
    subject_token_index: torch.Tensor | None = None,
    average: str = "samples",
) -> torch.Tensor:
    """``localization_loss`` averaged over layers (e.g. ``AttentionCapture.maps``).

    Without ``subject_token_index`` the maps hold only the subject columns, in subject order.
    """
    if not maps:
        raise ValueError("no attention maps were captured; is the attention capture installed?")
    losses = []
    for probs in maps.values():
        index = subject_token_index
        if index is None:
            index = torch.arange(probs.shape[-1], device=probs.device).expand(probs.shape[0], -1)
        losses.append(localization_loss(probs, index, subject_masks, subject_valid, average))
    return torch.stack(losses).mean()


def denoising_loss(
    model_pred: torch.Tensor,
    target: torch.Tensor,
    subject_masks: torch.Tensor | None = None,
    subject_valid: torch.Tensor | None = None,
    masked: torch.Tensor | None = None,
    form: str = "batch",
) -> torch.Tensor:
    """Epsilon MSE, restricted where ``masked`` is true to the union of the valid subject masks
    (resized to the latent resolution).

    ``form="batch"`` (the official ``FastComposerModel.forward``): ``masked`` is one flag for the
    whole batch; prediction and target are multiplied by the union mask and the MSE is the mean
    over all elements, so a sample without subjects contributes 0. ``"sample"``: ``masked [B]``
    per sample; the MSE inside the mask divided by its area, a sample without subjects plain MSE.
    """
    if form not in MASKED_LOSS_FORMS:
        raise ValueError(f"unknown masked denoising loss form {form!r}; choose one of {MASKED_LOSS_FORMS}")
    if form == "batch" and masked is not None and masked.numel() != 1:
        raise ValueError(f"the batch form of the masked loss takes one flag per batch, got {masked.numel()}")
    error = (model_pred.float() - target.float()).pow(2)
    if masked is None or subject_masks is None or not bool(masked.any()):
        return error.mean()
    masks = subject_masks.float()
    if subject_valid is not None:
        masks = masks * subject_valid[..., None, None].to(masks)
    union = _resize_masks(masks.amax(1, keepdim=True), tuple(model_pred.shape[-2:]))  # [B, 1, h, w]
    if form == "batch":
        return (error * union.pow(2)).mean()  # (m·pred − m·target)²
    plain = error.mean(dim=(1, 2, 3))
    area = union.sum(dim=(1, 2, 3)) * model_pred.shape[1]
    inside = (error * union).sum(dim=(1, 2, 3)) / area.clamp(min=_EPS)
    use_mask = masked.to(plain.device).bool() & (area > 0)
    return torch.where(use_mask, inside, plain).mean()
