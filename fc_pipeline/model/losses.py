"""Training losses (paper §4.2): ``L = L_noise + λ·L_loc``."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

DEFAULT_LOCALIZATION_WEIGHT = 1e-3  # λ of the paper
_EPS = 1e-6


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
) -> torch.Tensor:
    """Balanced localisation loss of one cross-attention layer.

    ``attention_probs [B, heads, H*W, T]`` (softmax over T), ``subject_token_index [B, S]``,
    ``subject_masks [B, S, H0, W0]`` in [0, 1] (resized here to H×W), ``subject_valid [B, S]``.
    Per valid subject k, with A_k the head-averaged map of its token:
    ``mean(A_k over background) − mean(A_k over mask)``; the mean over valid subjects, 0 if none.
    """
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
    return ((outside - inside) * valid).sum() / valid.sum().clamp(min=1.0)


def localization_loss_over_layers(
    maps: Mapping[str, torch.Tensor],
    subject_masks: torch.Tensor,
    subject_valid: torch.Tensor,
    subject_token_index: torch.Tensor | None = None,
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
        losses.append(localization_loss(probs, index, subject_masks, subject_valid))
    return torch.stack(losses).mean()


def denoising_loss(
    model_pred: torch.Tensor,
    target: torch.Tensor,
    subject_masks: torch.Tensor | None = None,
    subject_valid: torch.Tensor | None = None,
    masked: torch.Tensor | None = None,
) -> torch.Tensor:
    """Epsilon MSE, restricted for samples with ``masked [B]`` true to the union of their valid
    subject masks (resized to the latent resolution). A sample without subjects uses plain MSE."""
    error = (model_pred.float() - target.float()).pow(2)
    plain = error.mean(dim=(1, 2, 3))
    if masked is None or subject_masks is None or not bool(masked.any()):
        return plain.mean()
    masks = subject_masks.float()
    if subject_valid is not None:
        masks = masks * subject_valid[..., None, None].to(masks)
    union = _resize_masks(masks.amax(1, keepdim=True), tuple(model_pred.shape[-2:]))  # [B, 1, h, w]
    area = union.sum(dim=(1, 2, 3)) * model_pred.shape[1]
    inside = (error * union).sum(dim=(1, 2, 3)) / area.clamp(min=_EPS)
    use_mask = masked.to(plain.device).bool() & (area > 0)
    return torch.where(use_mask, inside, plain).mean()
