"""FastComposerPipeline: Stable Diffusion equality, delayed conditioning, round trip, schedulers, errors."""

from __future__ import annotations

import io

import numpy as np
import PIL.Image
import pytest
import torch
from accelerate import init_empty_weights
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
)

from fc_pipeline.images import ImageError, load_image
from fc_pipeline.model.components import build_component, load_components
from fc_pipeline.pipeline import FastComposerPipeline, localization_layers, subject_conditioning_start
from fc_pipeline.profiles import PAPER_LOCALIZATION_LAYERS, TINY_LOCALIZATION_LAYERS, paper_config

PROMPT = "a man <|image|> and a woman <|image|> on the beach"
TEXT = "a man and a woman on the beach"


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


class EmbeddingRecorder:
    """Records the ``encoder_hidden_states`` of every UNet forward."""

    def __init__(self, unet):
        self.calls: list[torch.Tensor] = []
        self.handle = unet.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        self.calls.append(kwargs["encoder_hidden_states"].clone())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


# --- text only: exactly Stable Diffusion ---------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(prompt=TEXT, num_inference_steps=4),
        dict(
            prompt=[TEXT, "a dog"],
            negative_prompt=["blurry", "dark"],
            num_images_per_prompt=2,
            num_inference_steps=2,
            guidance_rescale=0.7,
            height=32,
            width=32,
        ),
        dict(prompt=TEXT, guidance_scale=1.0, num_inference_steps=4, height=48, width=32),
    ],
    ids=["default", "batch-negative-rescale", "no-guidance-48x32"],
)
def test_text_only_equals_stable_diffusion(pipe, make_stable_diffusion, kwargs):
    kwargs = {"guidance_scale": 5.0, **kwargs}
    ours = pipe(**kwargs, generator=seeded(), output_type="np").images
    theirs = make_stable_diffusion()(**kwargs, generator=seeded(), output_type="np").images
    assert ours.shape == theirs.shape
    assert np.abs(ours - theirs).max() == 0.0


def test_alpha_zero_with_subjects_equals_stable_diffusion_of_the_plain_text(pipe, make_stable_diffusion, subject_paths):
    call = dict(num_inference_steps=3, height=32, width=32, output_type="np")
    ours = pipe(PROMPT, subject_images=subject_paths, alpha=0.0, generator=seeded(), **call).images
    no_photos = pipe(TEXT, subject_images=[], generator=seeded(), **call).images
    theirs = make_stable_diffusion()(TEXT, guidance_scale=5.0, generator=seeded(), **call).images
    assert np.abs(ours - theirs).max() == 0.0 and np.abs(no_photos - theirs).max() == 0.0


# --- delayed subject conditioning ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("alpha", "steps", "start"),
    [(0.0, 4, 4), (1.0, 4, 0), (0.7, 10, 3), (0.7, 50, 15), (0.5, 5, 2), (0.6, 7, 3), (0.8, 1, 0), (0.25, 6, 4)],
)
def test_subject_conditioning_start(alpha, steps, start):
    assert subject_conditioning_start(steps, alpha) == start


@pytest.mark.parametrize(
    ("alpha", "steps", "start"), [(0.7, 10, 3), (0.5, 5, 2), (0.6, 7, 3), (1.0, 3, 0), (0.0, 3, 3)]
)
def test_each_step_gets_the_right_embedding(pipe, subject_paths, alpha, steps, start):
    call = dict(subject_images=subject_paths, num_inference_steps=steps, height=16, width=16, output_type="latent")
    with EmbeddingRecorder(pipe.unet) as text_only:
        pipe(PROMPT, alpha=0.0, **call)
    with EmbeddingRecorder(pipe.unet) as delayed:
        pipe(PROMPT, alpha=alpha, **call)
    text_embeds = text_only.calls[0]
    assert len(delayed.calls) == steps
    for i, embeds in enumerate(delayed.calls):
        negative, conditional = embeds.chunk(2)
        assert torch.equal(negative, text_embeds.chunk(2)[0]), "the unconditional embedding never changes"
        assert torch.equal(conditional, text_embeds.chunk(2)[1]) == (i < start), f"step {i}, switch at {start}"
    if start < steps:
        augmented = delayed.calls[-1].chunk(2)[1][0]
        changed = (augmented != text_embeds.chunk(2)[1][0]).any(-1).nonzero().flatten().tolist()
        subject_tokens = pipe.parse_prompts([PROMPT], [subject_paths])[1][0]
        assert changed == subject_tokens, "only the subject tokens are augmented"


def test_subjects_change_the_latents_only_from_the_switch_step_on(pipe, subject_paths):
    def latents_per_step(alpha):
        recorded = []

        def keep(pipeline, step, timestep, tensors):
            recorded.append(tensors["latents"].clone())
            return {}

        pipe(
            PROMPT,
            subject_images=subject_paths,
            alpha=alpha,
            num_inference_steps=6,
            height=16,
            width=16,
            output_type="latent",
            generator=seeded(),
            callback_on_step_end=keep,
        )
        return recorded

    text_only, delayed = latents_per_step(0.0), latents_per_step(0.5)
    start = subject_conditioning_start(6, 0.5)
    assert start == 3
    for i, (a, b) in enumerate(zip(text_only, delayed)):
        assert torch.equal(a, b) == (i < start), f"step {i}"


# --- subject images -----------------------------------------------------------------------------------
def test_subject_images_any_mode_size_and_source(pipe, subject_paths):
    photo = load_image(subject_paths[0])
    call = dict(subject_images=None, num_inference_steps=2, height=16, width=16, output_type="latent")
    from_path = pipe("a man <|image|>", **{**call, "subject_images": [subject_paths[0]]}, generator=seeded()).images
    from_pil = pipe("a man <|image|>", **{**call, "subject_images": [photo]}, generator=seeded()).images
    from_bytes = pipe(
        "a man <|image|>", **{**call, "subject_images": subject_paths[0].read_bytes()}, generator=seeded()
    ).images
    assert torch.equal(from_path, from_pil) and torch.equal(from_path, from_bytes)

    small = photo.resize((37, 91))
    buffer = io.BytesIO()
    photo.convert("RGBA").save(buffer, format="PNG")
    odd = [
        small.convert("RGBA"),
        small.convert("L"),
        small.convert("P"),
        small.convert("CMYK"),
        PIL.Image.fromarray(np.asarray(small.convert("L"), dtype=np.uint16) * 257),
        buffer.getvalue(),
    ]
    for image in odd:
        latents = pipe("a man <|image|>", **{**call, "subject_images": [image]}, generator=seeded()).images
        assert torch.isfinite(latents).all()


def test_missing_subject_photo_is_a_clear_error(pipe, tmp_path):
    with pytest.raises(ImageError, match="not_found"):
        pipe("a man <|image|>", subject_images=[tmp_path / "nope.jpg"], num_inference_steps=1)


def test_batch_with_different_subject_counts_and_attention_maps(pipe, subject_paths):
    out = pipe(
        [PROMPT, "a woman <|image|> reading"],
        subject_images=[subject_paths, [subject_paths[1]]],
        num_images_per_prompt=2,
        num_inference_steps=3,
        generator=seeded(),
        return_attention_maps=True,
    )
    assert len(out.images) == 4 and out.images[0].size == (64, 64)
    assert [m.shape for m in out.attention_maps] == [(2, 32, 32), (2, 32, 32), (1, 32, 32), (1, 32, 32)]
    for maps in out.attention_maps:
        assert maps.dtype == np.float32 and (maps >= 0).all() and (maps <= 1).all() and maps.max() > 0
    assert not np.allclose(out.attention_maps[0][0], out.attention_maps[0][1])


def test_attention_capture_is_removed_even_on_error(pipe, subject_paths):
    before = {name: type(p) for name, p in pipe.unet.attn_processors.items()}

    def fail(*args):
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        pipe(
            PROMPT,
            subject_images=subject_paths,
            num_inference_steps=2,
            height=16,
            width=16,
            return_attention_maps=True,
            callback_on_step_end=fail,
        )
    assert {name: type(p) for name, p in pipe.unet.attn_processors.items()} == before


def test_attention_layers_are_the_localization_layers_of_both_profiles(pipe):
    assert tuple(localization_layers(pipe.unet)) == TINY_LOCALIZATION_LAYERS
    with init_empty_weights():
        paper_unet = build_component("unet", paper_config("unet"))
    assert tuple(localization_layers(paper_unet)) == PAPER_LOCALIZATION_LAYERS


# --- persistence and schedulers ----------------------------------------------------------------
def test_save_load_round_trip_gives_identical_images(pipe, subject_paths, tmp_path):
    pipe.save_pretrained(tmp_path / "ckpt", safe_serialization=True)
    files = {p.relative_to(tmp_path / "ckpt").as_posix() for p in (tmp_path / "ckpt").rglob("*") if p.is_file()}
    assert "fuser/diffusion_pytorch_model.safetensors" in files and "unet/diffusion_pytorch_model.safetensors" in files
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    loaded = FastComposerPipeline.from_pretrained(tmp_path / "ckpt")
    loaded.set_progress_bar_config(disable=True)
    call = dict(
        prompt=PROMPT, subject_images=subject_paths, num_inference_steps=3, output_type="np", return_attention_maps=True
    )
    a, b = pipe(**call, generator=seeded()), loaded(**call, generator=seeded())
    assert np.abs(a.images - b.images).max() == 0.0
    assert all(np.array_equal(x, y) for x, y in zip(a.attention_maps, b.attention_maps))


@pytest.mark.parametrize(
    "scheduler_class", [DPMSolverMultistepScheduler, EulerDiscreteScheduler, DDIMScheduler, HeunDiscreteScheduler]
)
def test_scheduler_swap(components, make_fastcomposer, make_stable_diffusion, subject_paths, scheduler_class):
    scheduler = scheduler_class.from_config(components["scheduler"].config)
    pipe = make_fastcomposer(scheduler)
    call = dict(num_inference_steps=3, height=32, width=32, generator=seeded(), output_type="np")
    ours = pipe(TEXT, **call).images
    theirs = make_stable_diffusion(scheduler)(TEXT, guidance_scale=5.0, **{**call, "generator": seeded()}).images
    assert np.abs(ours - theirs).max() == 0.0

    with EmbeddingRecorder(pipe.unet) as recorder:
        subject = pipe(PROMPT, subject_images=subject_paths, alpha=0.5, **{**call, "generator": seeded()})
    assert np.isfinite(subject.images).all() and not np.array_equal(subject.images, ours)
    conditional = [embeds.chunk(2)[1] for embeds in recorder.calls]
    start = subject_conditioning_start(len(conditional), 0.5)
    assert all(torch.equal(c, conditional[0]) for c in conditional[:start])
    assert not torch.equal(conditional[start], conditional[0])


# --- bad input --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(prompt="a man <|image|> and a woman", subject_images="two"), "marker"),
        (dict(prompt=PROMPT, subject_images=None), "no `subject_images`"),
        (dict(prompt="a man <|image|>", alpha=1.5), "alpha"),
        (dict(prompt="a man <|image|>", alpha=-0.1), "alpha"),
        (dict(prompt="a man <|image|>", alpha=True), "alpha"),
        (dict(prompt="a man <|image|>", num_inference_steps=0), "num_inference_steps"),
        (dict(prompt="a man <|image|>", height=60), "divisible by 8"),
        (dict(prompt=" and ".join(["a man <|image|>"] * 5), subject_images="five"), "at most 4 subjects"),
        (dict(prompt="a photo " * 80 + "of a man <|image|>"), "too long"),
        (dict(prompt="<|image|> on the beach"), "no word before"),
        (dict(prompt=TEXT, return_attention_maps=True, subject_images=None), "needs `subject_images`"),
        (dict(prompt=[TEXT, TEXT], subject_images="one list"), "one list of reference images per prompt"),
        (dict(prompt=TEXT, subject_images=None, negative_prompt=["a", "b"]), "negative_prompt"),
        (dict(prompt=123, subject_images=None), "prompt"),
    ],
)
def test_bad_input_is_a_clear_error(pipe, subject_paths, kwargs, message):
    counts = {"two": subject_paths, "five": [subject_paths[0]] * 5, "one list": [[subject_paths[0]]]}
    images = kwargs.get("subject_images", [subject_paths[0]])
    kwargs = {**kwargs, "subject_images": counts.get(images, images) if isinstance(images, str) else images}
    with pytest.raises(ValueError, match=message):
        pipe(**{"num_inference_steps": 1, **kwargs})


def test_from_components_names_what_is_missing(components):
    with pytest.raises(ValueError, match="fuser"):
        FastComposerPipeline.from_components({k: v for k, v in components.items() if k != "fuser"})


def test_pipeline_moves_to_another_dtype(subject_paths):
    pipe = FastComposerPipeline.from_components(load_components("tiny")).to(dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        PROMPT,
        subject_images=subject_paths,
        num_inference_steps=2,
        height=16,
        width=16,
        output_type="np",
        return_attention_maps=True,
    )
    assert pipe.fuser.dtype == pipe.unet.dtype == torch.bfloat16
    assert np.isfinite(out.images).all() and out.attention_maps[0].dtype == np.float32
