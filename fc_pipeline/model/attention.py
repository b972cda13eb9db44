"""Cross-attention capture for the localisation loss (paper §4.2).

Only the hooked cross-attention layers (``attn2`` under the configured module-name prefixes)
compute explicit attention probabilities; every other layer keeps its own processor (SDPA by
default). Each hooked layer records, for the last forward, the probabilities of the subject
token columns only — ``[B, heads, H*W, S]`` instead of ``[B, heads, H*W, 77]`` — with their
autograd graph, so the loss back-propagates into the UNet.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers.models.attention_processor import Attention

_SUFFIX = ".processor"


class SubjectAttentionProcessor:
    """A diffusers attention processor that records the attention probabilities it computes."""

    def __init__(self, capture: AttentionCapture, layer: str):
        self.capture = capture
        self.layer = layer

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        # the steps of diffusers' AttnProcessor, with the probabilities handed to the capture
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch_size, sequence_length, _ = context.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        key = attn.head_to_batch_dim(attn.to_k(context))
        value = attn.head_to_batch_dim(attn.to_v(context))
        query = attn.head_to_batch_dim(query)

        probs = attn.get_attention_scores(query, key, attention_mask)
        self.capture.record(self.layer, probs, attn.heads)

        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class AttentionCapture:
    """The cross-attention maps of the hooked layers for the last UNet forward.

    Set ``token_index`` (``[B, S]`` long) before the forward to keep only those token columns;
    with ``None`` all columns are kept. ``maps[layer]`` is ``[B, heads, H*W, S or T]``.
    """

    def __init__(self, unet, layers: Sequence[str]):
        self.unet = unet
        self.layers = list(layers)
        self.token_index: torch.Tensor | None = None
        self.maps: dict[str, torch.Tensor] = {}
        self._originals: dict[str, object] = {}

    def record(self, layer: str, probs: torch.Tensor, heads: int) -> None:
        """Store the probabilities ``[B*heads, H*W, T]`` of one layer (called by the processor)."""
        probs = probs.unflatten(0, (-1, heads))
        if self.token_index is not None:
            index = self.token_index.to(probs.device)
            if index.shape[0] != probs.shape[0]:
                raise ValueError(
                    f"token_index is for a batch of {index.shape[0]} but the UNet ran a batch of {probs.shape[0]}"
                )
            batch, heads_, pixels, _ = probs.shape
            probs = probs.gather(-1, index[:, None, None, :].expand(batch, heads_, pixels, index.shape[1]))
        self.maps[layer] = probs

    def clear(self) -> None:
        """Forget the maps of the last forward (frees their memory)."""
        self.maps.clear()

    def remove(self) -> None:
        """Restore the original processors of the hooked layers."""
        processors = self.unet.attn_processors
        processors.update(self._originals)
        self.unet.set_attn_processor(processors)
        self._originals.clear()
        self.clear()


def _is_hooked(name: str, prefixes: Sequence[str]) -> bool:
    return ".attn2" in name and any(name == p or name.startswith(p + ".") for p in prefixes)


def install_attention_capture(unet, layer_prefixes: Sequence[str]) -> AttentionCapture:
    """Hook the cross-attention (``attn2``) layers under ``layer_prefixes`` (e.g. ``"mid_block"``)."""
    processors = unet.attn_processors
    hooked = [key[: -len(_SUFFIX)] for key in processors if _is_hooked(key[: -len(_SUFFIX)], layer_prefixes)]
    if not hooked:
        raise ValueError(f"no cross-attention layer of the UNet lies under {list(layer_prefixes)}")
    capture = AttentionCapture(unet, hooked)
    for layer in hooked:
        capture._originals[layer + _SUFFIX] = processors[layer + _SUFFIX]
        processors[layer + _SUFFIX] = SubjectAttentionProcessor(capture, layer)
    unet.set_attn_processor(processors)
    return capture
