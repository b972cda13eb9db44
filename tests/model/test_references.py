import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from fc_pipeline.model.references import ReferenceAugmentation, reference_pixels, subject_reference
from fc_pipeline.training.samples import SamplingConfig, prepare_sample

NO_REGIMES = dict(unconditional_prob=0, text_only_prob=0, subject_drop_prob=0)
NO_REFERENCE_AUGMENTATION = dict(
    zoom_prob=0, rotate_prob=0, jitter_prob=0, blur_prob=0, grayscale_prob=0, flip_prob=0, elastic_prob=0
)


def _unnormalise(pixels: torch.Tensor) -> torch.Tensor:
    """CLIP-normalised pixels back to [0, 1]."""
    return pixels * torch.tensor(OPENAI_CLIP_STD)[:, None, None] + torch.tensor(OPENAI_CLIP_MEAN)[:, None, None]


def _photo(width=96, height=64) -> Image.Image:
    """A non-square photo with a red left edge and a blue right edge."""
    pixels = np.random.default_rng(0).integers(60, 200, size=(height, width, 3), dtype=np.uint8)
    pixels[:, :8] = (255, 0, 0)
    pixels[:, -8:] = (0, 0, 255)
    return Image.fromarray(pixels)


def _whole_photo_sample(photo: Image.Image) -> dict:
    """A shard sample whose one subject covers the whole photo: the loader's reference is the photo."""
    meta = {
        "caption": "a man outside",
        "subjects": [{"phrase": "a man", "start": 0, "end": 5, "segment_id": 1, "score": 0.9}],
        "segments": [{"id": 1, "label": "person"}],
    }
    return {"id": "w", "image": photo, "meta": meta, "seg": np.ones((photo.height, photo.width), np.uint16)}


def test_loader_and_pipeline_preprocess_a_reference_identically(components, tokenizer, monkeypatch):
    from fc_pipeline import pipeline as pipeline_module
    from fc_pipeline.pipeline import FastComposerPipeline

    photo = _photo()
    loaded = prepare_sample(
        _whole_photo_sample(photo), tokenizer, SamplingConfig(resolution=32, **NO_REGIMES), np.random.default_rng(0)
    )
    seen = {}

    def record(image_encoder, pixel_values):
        seen["pixels"] = pixel_values
        return torch.zeros(*pixel_values.shape[:2], components["image_encoder"].config.projection_dim)

    monkeypatch.setattr(pipeline_module, "encode_subject_images", record)
    pipe = FastComposerPipeline.from_components(components)
    prompt_embeds = torch.zeros(1, 77, components["text_encoder"].config.hidden_size)
    pipe.encode_subjects([[photo]], [[2]], prompt_embeds)
    assert torch.equal(seen["pixels"][0, 0], loaded["subject_pixel_values"][0])
    # padded, not cropped: both sides of the wide photo survive, black above and below
    reference = _unnormalise(seen["pixels"][0, 0])
    assert reference[0, 112, 2] > 0.95 and reference[2, 112, -3] > 0.95
    assert reference[:, :30].abs().max() < 1e-3 and reference[:, -30:].abs().max() < 1e-3


def test_reference_pixels_pads_to_a_centred_square():
    tall = torch.full((3, 8, 4), 255, dtype=torch.uint8)
    square = _unnormalise(reference_pixels(tall, 8))
    assert square.shape == (3, 8, 8)
    assert torch.allclose(square[0, :, 2:6], torch.ones(8, 4), atol=1e-3)
    assert square[0, :, :2].abs().max() < 1e-3 and square[0, :, 6:].abs().max() < 1e-3
    with pytest.raises(ValueError, match="padding canvas"):
        reference_pixels(tall, 8, canvas=torch.zeros(3, 4, 4, dtype=torch.uint8))


def test_augmentation_is_deterministic_for_a_seed_and_leaves_the_torch_rng_alone():
    image = np.random.default_rng(1).integers(0, 256, size=(60, 40, 3), dtype=np.uint8)
    mask = np.zeros((60, 40), bool)
    mask[5:55, 10:30] = True
    augmentation = ReferenceAugmentation()
    state = torch.get_rng_state()
    first = subject_reference(image, mask, 64, np.random.default_rng(7), augmentation=augmentation)
    assert torch.equal(torch.get_rng_state(), state)
    again = subject_reference(image, mask, 64, np.random.default_rng(7), augmentation=augmentation)
    assert torch.equal(first, again)
    plain = subject_reference(image, mask, 64, np.random.default_rng(7))
    others = [subject_reference(image, mask, 64, np.random.default_rng(k), augmentation=augmentation) for k in range(6)]
    assert all(o.shape == plain.shape for o in others)
    assert sum(not torch.allclose(o, plain) for o in others) >= 5
    # with every probability 0 the augmented reference is the plain one
    off = ReferenceAugmentation(**NO_REFERENCE_AUGMENTATION)
    assert torch.equal(subject_reference(image, mask, 64, np.random.default_rng(7), augmentation=off), plain)


def test_zoom_in_keeps_the_top_square_of_a_tall_crop():
    tall = torch.zeros(3, 40, 20, dtype=torch.uint8)
    tall[:, :20] = 255  # the top half is white
    zoomed = ReferenceAugmentation(zoom_prob=1.0).zoom_in(tall)
    assert zoomed.shape[-1] == zoomed.shape[-2] and 20 <= zoomed.shape[-1] <= 40
    assert zoomed.float().mean() > 250  # the top square only
    wide = torch.zeros(3, 20, 40, dtype=torch.uint8)
    assert ReferenceAugmentation(zoom_prob=1.0).zoom_in(wide).shape[-2] >= 20  # only enlarged


def test_flipped_target_keeps_masks_on_their_subjects(tokenizer):
    width, height = 64, 64
    image = np.full((height, width, 3), 90, np.uint8)
    seg = np.zeros((height, width), np.uint16)
    seg[8:56, 4:20] = 1  # the man on the left, red
    seg[8:56, 40:52] = 2  # the woman on the right, yellow
    image[seg == 1] = (220, 30, 30)
    image[seg == 2] = (230, 210, 40)
    meta = {
        "caption": "a man and a woman",
        "subjects": [
            {"phrase": "a man", "start": 0, "end": 5, "segment_id": 1, "score": 0.9},
            {"phrase": "a woman", "start": 10, "end": 17, "segment_id": 2, "score": 0.9},
        ],
        "segments": [{"id": 1, "label": "person"}, {"id": 2, "label": "person"}],
    }
    sample = {"id": "f", "image": Image.fromarray(image), "meta": meta, "seg": seg}
    config = SamplingConfig(resolution=64, latent_scale=1, **NO_REGIMES)
    still = prepare_sample(sample, tokenizer, config, np.random.default_rng(0))
    flip = ReferenceAugmentation(target_flip_prob=1.0, **NO_REFERENCE_AUGMENTATION)
    flipped = prepare_sample(
        sample, tokenizer, dataclasses.replace(config, augmentation=flip), np.random.default_rng(0)
    )
    assert torch.equal(flipped["pixel_values"], still["pixel_values"].flip(-1))
    assert torch.equal(flipped["subject_masks"], still["subject_masks"].flip(-1))
    for out in (still, flipped):
        target = (out["pixel_values"] + 1) * 127.5
        for slot, colour in enumerate([(220, 30, 30), (230, 210, 40)]):
            inside = out["subject_masks"][slot] > 0.99
            assert inside.sum() > 100
            assert torch.allclose(target[:, inside].mean(1), torch.tensor(colour, dtype=torch.float32), atol=3)
    assert flipped["subject_masks"][0, :, 44:60].sum() > 0 and flipped["subject_masks"][0, :, :40].sum() == 0
    # the references are cut from the unflipped photo, as in the official code
    assert torch.equal(flipped["subject_pixel_values"], still["subject_pixel_values"])
    assert flipped["subject_token_index"].tolist() == still["subject_token_index"].tolist()
