"""The subject fuser (paper §4.1): ``c'_i = MLP([c_i ; v_j])`` at subject tokens only."""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


class _MLP(nn.Module):
    """LayerNorm -> Linear -> GELU -> Linear."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.norm(x))))


class SubjectFuser(ModelMixin, ConfigMixin):
    """Fuses each subject's image embedding into the text embedding of its noun token.

    Two residual stages with hidden width = text width, then a LayerNorm:
    ``h = c + MLP_1([c; v])``, ``c' = LayerNorm(h + MLP_2(h))``. Tokens that are not valid
    subjects pass through unchanged (bit for bit).
    """

    @register_to_config
    def __init__(self, text_dim: int, image_dim: int):
        super().__init__()
        self.fuse = _MLP(text_dim + image_dim, text_dim, text_dim)
        self.refine = _MLP(text_dim, text_dim, text_dim)
        self.norm = nn.LayerNorm(text_dim)

    def fuse_tokens(self, token_embeds: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        """``c'`` for paired token and image embeddings ``[..., D]``, ``[..., Di]``."""
        image_embeds = image_embeds.to(token_embeds.dtype)
        hidden = token_embeds + self.fuse(torch.cat([token_embeds, image_embeds], dim=-1))
        return self.norm(hidden + self.refine(hidden))

    def forward(
        self,
        text_embeds: torch.Tensor,
        image_embeds: torch.Tensor,
        subject_token_index: torch.Tensor,
        subject_valid: torch.Tensor,
    ) -> torch.Tensor:
        """Augmented text embeddings ``[B, T, D]`` from ``text_embeds [B, T, D]``,
        ``image_embeds [B, S, Di]``, ``subject_token_index [B, S]`` and ``subject_valid [B, S]``."""
        batch, length, width = text_embeds.shape
        if image_embeds.shape[:2] != subject_token_index.shape or subject_valid.shape != subject_token_index.shape:
            raise ValueError(
                f"shape mismatch: image_embeds {tuple(image_embeds.shape)}, subject_token_index "
                f"{tuple(subject_token_index.shape)}, subject_valid {tuple(subject_valid.shape)}"
            )
        index = subject_token_index.long().clamp(0, length - 1)
        tokens = text_embeds.gather(1, index[..., None].expand(-1, -1, width))
        fused = self.fuse_tokens(tokens, image_embeds)
        # one-hot [B, S, T] placement keeps gradients exact and never touches other tokens
        placement = torch.nn.functional.one_hot(index, length).to(fused.dtype) * subject_valid[..., None].to(
            fused.dtype
        )
        is_subject = placement.sum(1) > 0
        placed = torch.einsum("bst,bsd->btd", placement, fused)
        return torch.where(is_subject[..., None], placed, text_embeds)
