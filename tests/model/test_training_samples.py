import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from fc_pipeline.data.shards import shard_urls
from fc_pipeline.training.samples import (
    DataPosition,
    SamplingConfig,
    TrainingSamples,
    collate_samples,
    draw_conditioning,
    prepare_sample,
)


def _sample(n_subjects=2, width=96, height=64):
    image = np.full((height, width, 3), 90, np.uint8)
    seg = np.zeros((height, width), np.uint16)
    words = ["man", "woman", "boy", "girl", "child", "lady"][:n_subjects]
    caption = " and ".join(f"a {w}" for w in words) + " outside"
    subjects, start = [], 0
    for k, word in enumerate(words, start=1):
        x = 8 + (k - 1) * 14
        seg[10:50, x : x + 10] = k
        image[seg == k] = (20 * k, 200, 50)
        end = start + 2 + len(word)
        subjects.append({"phrase": f"a {word}", "start": start, "end": end, "segment_id": k, "score": 0.9})
        start = end + 5
    segments = [{"id": k, "label": "person"} for k in range(1, n_subjects + 1)]
    meta = {"caption": caption, "subjects": subjects, "segments": segments}
    return {"id": "s", "image": Image.fromarray(image), "meta": meta, "seg": seg}


def test_sampling_rates_over_10k_draws():
    config = SamplingConfig()
    rng = np.random.default_rng(0)
    draws = [draw_conditioning(rng, 3, config) for _ in range(10_000)]
    regimes = [r for r, _ in draws]
    assert regimes.count("unconditional") / 1e4 == pytest.approx(0.1, abs=0.02)
    assert regimes.count("text_only") / 1e4 == pytest.approx(0.1, abs=0.02)
    kept = np.concatenate([k for r, k in draws if r == "subjects"])
    assert 1 - kept.mean() == pytest.approx(0.1, abs=0.02)
    assert not any(k.any() for r, k in draws if r != "subjects")


def test_prepared_sample_contents(tokenizer):
    config = SamplingConfig(resolution=64, unconditional_prob=0, text_only_prob=0, subject_drop_prob=0)
    sample = _sample()
    out = prepare_sample(sample, tokenizer, config, np.random.default_rng(1))
    assert out["regime"] == "subjects"
    assert (
        out["pixel_values"].shape == (3, 64, 64) and -1 <= out["pixel_values"].min() <= out["pixel_values"].max() <= 1
    )
    assert out["subject_pixel_values"].shape == (4, 3, 224, 224)
    assert out["subject_valid"].tolist() == [True, True, False, False]
    tokens = tokenizer.convert_ids_to_tokens(out["input_ids"].tolist())
    assert [tokens[i] for i in out["subject_token_index"][:2]] == ["man</w>", "woman</w>"]
    # masks at latent resolution, located where the segments are after resize + centre crop (96x64 -> 64x64)
    masks = out["subject_masks"]
    assert masks.shape == (4, 8, 8) and masks[2:].sum() == 0
    assert masks[0, 2:6, 0].min() > 0.2 and masks[0, :, 4:].sum() == 0
    # the reference keeps the subject's pixels; its padding to a square is black (official
    # PadToSquare(fill=0); it was noise before, now the "noise" option, checked below)
    again = prepare_sample(sample, tokenizer, config, np.random.default_rng(1))
    other = prepare_sample(sample, tokenizer, config, np.random.default_rng(2))
    assert torch.equal(out["subject_pixel_values"], again["subject_pixel_values"])
    reference, other_reference = out["subject_pixel_values"][0], other["subject_pixel_values"][0]
    centre = (slice(None), slice(100, 124), slice(100, 124))
    assert torch.allclose(reference[centre], other_reference[centre], atol=1e-5)  # inside the subject
    black = -torch.tensor(OPENAI_CLIP_MEAN) / torch.tensor(OPENAI_CLIP_STD)
    assert torch.allclose(reference[:, :, :20], black[:, None, None].expand(3, 224, 20), atol=1e-5)
    noisy = dataclasses.replace(config, reference_fill="noise")
    noise, other_noise = (prepare_sample(sample, tokenizer, noisy, np.random.default_rng(k)) for k in (1, 2))
    assert (
        noise["subject_pixel_values"][0, :, :, :20] - other_noise["subject_pixel_values"][0, :, :, :20]
    ).abs().mean() > 0.3
    with pytest.raises(ValueError, match="reference_fill"):
        SamplingConfig(reference_fill="grey")


def test_regimes_and_max_subjects(tokenizer):
    sample = _sample(n_subjects=6)
    unconditional = SamplingConfig(resolution=64, unconditional_prob=1.0)
    out = prepare_sample(sample, tokenizer, unconditional, np.random.default_rng(0))
    assert out["regime"] == "unconditional" and not out["subject_valid"].any()
    empty = tokenizer("", padding="max_length", max_length=77, return_tensors="pt").input_ids[0]
    assert torch.equal(out["input_ids"], empty)
    text_only = prepare_sample(
        sample,
        tokenizer,
        SamplingConfig(resolution=64, unconditional_prob=0, text_only_prob=1.0),
        np.random.default_rng(0),
    )
    assert text_only["regime"] == "text_only" and not text_only["subject_valid"].any()
    assert not torch.equal(text_only["input_ids"], empty)
    full = SamplingConfig(resolution=64, max_subjects=4, unconditional_prob=0, text_only_prob=0, subject_drop_prob=0)
    out = prepare_sample(sample, tokenizer, full, np.random.default_rng(0))
    assert out["subject_valid"].sum() == 4 and out["subject_masks"].shape[0] == 4
    # only person segments become subjects
    with_dog = _sample(2)
    with_dog["meta"]["segments"][0]["label"] = "dog"
    out = prepare_sample(with_dog, tokenizer, full, np.random.default_rng(0))
    assert out["subject_valid"].tolist() == [True, False, False, False]
    tokens = tokenizer.convert_ids_to_tokens(out["input_ids"].tolist())
    assert tokens[out["subject_token_index"][0]] == "woman</w>"


def test_stream_is_deterministic_and_resumes_after_a_position(synthetic_shards, tokenizer):
    urls = shard_urls(synthetic_shards, "train")
    config = SamplingConfig(resolution=32)

    def take(n, **kwargs):
        stream = iter(TrainingSamples(urls, tokenizer, config, seed=3, **kwargs))
        return [next(stream) for _ in range(n)]

    first = take(11)  # 8 samples per epoch: crosses into the second epoch
    assert [s["position"].epoch for s in first] == [0] * 8 + [1] * 3
    assert len({s["id"] for s in first[:8]}) == 8
    again = take(11)
    assert [s["id"] for s in again] == [s["id"] for s in first]
    assert all(torch.equal(a["subject_pixel_values"], b["subject_pixel_values"]) for a, b in zip(first, again))
    resumed = take(5, start=first[5]["position"])
    assert [s["position"] for s in resumed] == [s["position"] for s in first[6:11]]
    assert all(torch.equal(a["pixel_values"], b["pixel_values"]) for a, b in zip(resumed, first[6:]))
    # two processes split the epoch between them: one shard each (2 shards of 4)
    rank0, rank1 = take(4, rank=0, world_size=2), take(4, rank=1, world_size=2)
    assert [s["id"] for s in rank0] == [s["id"] for s in first[0:4]]
    assert [s["id"] for s in rank1] == [s["id"] for s in first[4:8]]
    batch = collate_samples(first[:3])
    assert batch["pixel_values"].shape == (3, 3, 32, 32) and len(batch["position"]) == 3
    assert DataPosition(0, 1, 2) < DataPosition(1, 0, 0)
