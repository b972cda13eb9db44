import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

from fc_pipeline.model.attention import SubjectAttentionProcessor, install_attention_capture
from fc_pipeline.model.losses import localization_loss_over_layers
from fc_pipeline.profiles import TINY_LOCALIZATION_LAYERS


def _inputs(seed=0, batch=2):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 4, 8, 8, generator=g)
    context = torch.randn(batch, 77, 32, generator=g)
    index = torch.tensor([[2, 5], [3, 4]])[:batch]
    masks = torch.zeros(batch, 2, 64, 64)
    masks[:, 0, :, :32] = 1
    masks[:, 1, :, 32:] = 1
    return latents, context, index, masks, torch.ones(batch, 2, dtype=torch.bool)


def test_capture_hooks_only_middle_layers_and_keeps_subject_columns(components):
    unet = components["unet"]
    latents, context, index, _, _ = _inputs()
    with torch.no_grad():
        reference = unet(latents, 10, context).sample
    capture = install_attention_capture(unet, TINY_LOCALIZATION_LAYERS)
    hooked = {k for k, p in unet.attn_processors.items() if isinstance(p, SubjectAttentionProcessor)}
    assert len(hooked) == 4 and all(".attn2." in k for k in hooked)
    assert all(isinstance(p, AttnProcessor2_0) for k, p in unet.attn_processors.items() if k not in hooked)
    with torch.no_grad():
        full = unet(latents, 10, context).sample
        full_maps = dict(capture.maps)
        capture.token_index = index
        out = unet(latents, 10, context).sample
    assert torch.allclose(out, reference, atol=1e-5) and torch.allclose(full, reference, atol=1e-5)
    assert set(capture.maps) == set(capture.layers)
    for layer, probs in capture.maps.items():
        batch, heads, pixels, tokens = full_maps[layer].shape
        assert (batch, tokens) == (2, 77) and probs.shape == (2, heads, pixels, 2)
        assert pixels in (16, 4)  # the low-resolution middle of an 8x8 latent
        assert torch.allclose(full_maps[layer].sum(-1), torch.ones(batch, heads, pixels), atol=1e-5)
        assert torch.equal(probs[1, :, :, 0], full_maps[layer][1, :, :, 3])
    capture.clear()
    assert capture.maps == {}
    capture.remove()
    assert all(isinstance(p, AttnProcessor2_0) for p in unet.attn_processors.values())


def test_loss_is_independent_of_other_layers_backend_and_has_gradients(components):
    unet = components["unet"]
    latents, context, index, masks, valid = _inputs()
    capture = install_attention_capture(unet, TINY_LOCALIZATION_LAYERS)
    capture.token_index = index

    def loss_value():
        unet.zero_grad()
        unet(latents, 10, context)
        loss = localization_loss_over_layers(capture.maps, masks, valid)
        loss.backward()
        return loss

    sdpa = loss_value()
    hooked_grad = unet.mid_block.attentions[0].transformer_blocks[0].attn2.to_q.weight.grad.clone()
    other_grad = unet.down_blocks[0].resnets[0].conv1.weight.grad
    assert hooked_grad.abs().sum() > 0 and other_grad.abs().sum() > 0  # flows through the maps into the UNet
    for _name, module in unet.named_modules():
        if hasattr(module, "set_processor") and not isinstance(module.processor, SubjectAttentionProcessor):
            module.set_processor(AttnProcessor())
    classic = loss_value()
    assert classic.item() == pytest.approx(sdpa.item(), abs=1e-6)
    assert torch.allclose(
        unet.mid_block.attentions[0].transformer_blocks[0].attn2.to_q.weight.grad, hooked_grad, atol=1e-6
    )


def test_batch_mismatch_and_unknown_layers_raise(components):
    unet = components["unet"]
    with pytest.raises(ValueError, match="no cross-attention layer"):
        install_attention_capture(unet, ["down_blocks.7"])
    capture = install_attention_capture(unet, ["mid_block"])
    capture.token_index = torch.tensor([[1]])
    latents, context, *_ = _inputs()
    with pytest.raises(ValueError, match="batch of 1"), torch.no_grad():
        unet(latents, 10, context)
