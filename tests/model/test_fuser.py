import torch

import fc_pipeline
from fc_pipeline.model.conditioning import augment_text_embeddings, encode_subject_images
from fc_pipeline.model.fuser import SubjectFuser


def test_fusion_changes_only_valid_subject_tokens():
    torch.manual_seed(0)
    fuser = SubjectFuser(text_dim=32, image_dim=24)
    text = torch.randn(2, 77, 32)
    image = torch.randn(2, 3, 24)
    index = torch.tensor([[2, 5, 0], [4, 9, 11]])
    valid = torch.tensor([[True, True, False], [True, False, True]])
    out = fuser(text, image, index, valid)
    changed = (out != text).any(-1)
    expected = torch.zeros(2, 77, dtype=torch.bool)
    expected[0, [2, 5]] = True
    expected[1, [4, 11]] = True
    assert torch.equal(changed, expected)
    # a subject token gets MLP([c_i; v_j]) of its own image
    assert torch.allclose(out[1, 11], fuser.fuse_tokens(text[1, 11], image[1, 2]), atol=1e-6)
    assert torch.allclose(out[0, 5], fuser.fuse_tokens(text[0, 5], image[0, 1]), atol=1e-6)


def test_fusion_gradients_reach_text_image_and_fuser():
    fuser = SubjectFuser(text_dim=8, image_dim=8)
    text = torch.randn(1, 77, 8, requires_grad=True)
    image = torch.randn(1, 1, 8, requires_grad=True)
    out = augment_text_embeddings(text, image, fuser, torch.tensor([[3]]), torch.tensor([[True]]))
    (out[0, 3] * torch.linspace(-1, 1, 8)).sum().backward()  # a plain sum is constant after LayerNorm
    assert image.grad.abs().sum() > 0 and text.grad[0, 3].abs().sum() > 0
    assert text.grad[0, 4].abs().sum() == 0
    assert all(p.grad is not None for p in fuser.parameters())


def test_fuser_is_a_top_level_export_and_round_trips(tmp_path):
    assert fc_pipeline.SubjectFuser is SubjectFuser
    fuser = SubjectFuser(text_dim=8, image_dim=4)
    fuser.save_pretrained(tmp_path, safe_serialization=True)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    loaded = SubjectFuser.from_pretrained(tmp_path)
    assert loaded.config.text_dim == 8 and loaded.config.image_dim == 4
    for a, b in zip(fuser.parameters(), loaded.parameters()):
        assert torch.equal(a, b)


def test_encode_subject_images_shape(components):
    pixels = torch.randn(2, 3, 3, 224, 224)
    embeds = encode_subject_images(components["image_encoder"], pixels)
    assert embeds.shape == (2, 3, components["image_encoder"].config.projection_dim)
    single = encode_subject_images(components["image_encoder"], pixels[1:, 2:])
    assert torch.allclose(embeds[1, 2], single[0, 0], atol=1e-5)
