import accelerate
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPImageProcessor, CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

from fc_pipeline.model.components import build_component, load_components, set_trainable
from fc_pipeline.model.fuser import SubjectFuser
from fc_pipeline.profiles import PAPER_LOCALIZATION_LAYERS, TINY_LOCALIZATION_LAYERS, paper_config


def test_tiny_components_are_the_real_classes_and_deterministic(components):
    expected = {
        "vae": AutoencoderKL,
        "text_encoder": CLIPTextModel,
        "tokenizer": CLIPTokenizer,
        "unet": UNet2DConditionModel,
        "scheduler": DDPMScheduler,
        "image_encoder": CLIPVisionModelWithProjection,
        "feature_extractor": CLIPImageProcessor,
        "fuser": SubjectFuser,
    }
    assert set(components) == set(expected)
    for name, cls in expected.items():
        assert isinstance(components[name], cls), name
    assert components["feature_extractor"].crop_size == {"height": 224, "width": 224}
    state = torch.get_rng_state()
    again = load_components("tiny")
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is left alone
    for name in ("unet", "vae", "text_encoder", "image_encoder", "fuser"):
        for a, b in zip(components[name].parameters(), again[name].parameters()):
            assert torch.equal(a, b), name
    attn2 = [k for k in components["unet"].attn_processors if ".attn2." in k]
    assert len(attn2) == 7
    middle = [k for k in attn2 if k.startswith(tuple(p + "." for p in TINY_LOCALIZATION_LAYERS))]
    assert len(middle) == 4


def test_paper_architectures_on_meta_device():
    expected = {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480, "image_encoder": 303_966_208}
    with accelerate.init_empty_weights():
        for name, count in expected.items():
            model = build_component(name, paper_config(name))
            assert next(model.parameters()).device.type == "meta"
            assert sum(p.numel() for p in model.parameters()) == count, name
            if name == "unet":
                attn2 = [k for k in model.attn_processors if ".attn2." in k]
                middle = [k for k in attn2 if k.startswith(tuple(p + "." for p in PAPER_LOCALIZATION_LAYERS))]
                assert (len(attn2), len(middle)) == (16, 11)
    scheduler = build_component("scheduler", paper_config("scheduler"))
    assert scheduler.config.beta_schedule == "scaled_linear"


def test_set_trainable_follows_the_paper(components):
    trainable = set_trainable(components)
    ids = {id(p) for p in trainable}
    assert all(not p.requires_grad for p in components["vae"].parameters())
    assert all(not p.requires_grad for p in components["text_encoder"].parameters())
    assert all(p.requires_grad for p in components["unet"].parameters())
    assert all(p.requires_grad for p in components["fuser"].parameters())
    vision = components["image_encoder"].vision_model
    layers = vision.encoder.layers
    assert all(p.requires_grad for layer in layers[-2:] for p in layer.parameters())
    assert not any(p.requires_grad for layer in layers[:-2] for p in layer.parameters())
    assert not any(p.requires_grad for p in vision.embeddings.parameters())
    assert not any(p.requires_grad for p in components["image_encoder"].visual_projection.parameters())
    assert len(ids) == len(trainable)


def test_checkpoint_directory_round_trip(components, tmp_path):
    for name, part in components.items():
        part.save_pretrained(tmp_path / name)
    loaded = load_components("tiny", pretrained=tmp_path)
    for name in ("unet", "fuser", "image_encoder"):
        for a, b in zip(components[name].parameters(), loaded[name].parameters()):
            assert torch.equal(a, b)
    assert not list(tmp_path.rglob("*.bin"))
