"""FastComposerPipeline follows diffusers' pipeline conventions: callbacks, embeddings, optional parts."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback, SDCFGCutoffCallback

from fc_pipeline.pipeline import FastComposerPipeline, subject_conditioning_start

PROMPT = "a man <|image|> and a woman <|image|> on the beach"
TEXT = "a man and a woman on the beach"
SMALL = dict(num_inference_steps=4, height=32, width=32)


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


class UNetInputs:
    """Records ``encoder_hidden_states`` and ``cross_attention_kwargs`` of every UNet forward."""

    def __init__(self, unet):
        self.embeds: list[torch.Tensor] = []
        self.kwargs: list[dict | None] = []
        self.handle = unet.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        self.embeds.append(kwargs["encoder_hidden_states"].clone())
        self.kwargs.append(kwargs.get("cross_attention_kwargs"))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


# --- callbacks ----------------------------------------------------------------------------------------
def test_builtin_cfg_cutoff_callback_matches_stable_diffusion(pipe, make_stable_diffusion):
    call = dict(**SMALL, guidance_scale=5.0, output_type="np")
    ours = pipe(TEXT, generator=seeded(), callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=0.5), **call)
    theirs = make_stable_diffusion()(
        TEXT, generator=seeded(), callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=0.5), **call
    )
    plain = pipe(TEXT, generator=seeded(), **call)
    assert np.abs(ours.images - theirs.images).max() == 0.0
    assert not np.array_equal(ours.images, plain.images), "the cut-off changed the sampling"


def test_cfg_cutoff_before_the_subject_switch(pipe, subject_paths):
    with UNetInputs(pipe.unet) as inputs:
        out = pipe(
            PROMPT,
            subject_images=subject_paths,
            alpha=0.5,
            callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=0),
            output_type="latent",
            return_attention_maps=True,
            **SMALL,
        )
    assert [e.shape[0] for e in inputs.embeds] == [2, 1, 1, 1], "guidance is off after step 0"
    assert out.attention_maps[0].shape == (2, 16, 16) and np.isfinite(out.attention_maps[0]).all()
    start = subject_conditioning_start(4, 0.5)
    assert torch.equal(inputs.embeds[1], inputs.embeds[0][-1:])
    assert not torch.equal(inputs.embeds[start], inputs.embeds[1]), "the subjects still switch in"
    assert torch.isfinite(out.images).all()


def test_edited_prompt_embeds_are_used_and_keep_their_edit_after_the_switch(pipe, subject_paths):
    def scale(pipeline, step, timestep, tensors):
        return {"prompt_embeds": tensors["prompt_embeds"] * 2.0} if step == 0 else {}

    call = dict(subject_images=subject_paths, alpha=0.5, output_type="latent", **SMALL)
    with UNetInputs(pipe.unet) as plain:
        pipe(PROMPT, **call)
    with UNetInputs(pipe.unet) as edited:
        pipe(PROMPT, callback_on_step_end=scale, callback_on_step_end_tensor_inputs=["prompt_embeds"], **call)
    assert torch.equal(edited.embeds[0], plain.embeds[0])
    assert torch.equal(edited.embeds[1], plain.embeds[1] * 2.0), "the edit reaches the next step"
    subject_tokens = pipe.parse_prompts([PROMPT], [subject_paths])[1][0]
    after = edited.embeds[-1].chunk(2)[1][0]
    expected = plain.embeds[0].chunk(2)[1][0] * 2.0
    other = [t for t in range(after.shape[0]) if t not in subject_tokens]
    assert torch.equal(after[other], expected[other]), "the edit survives the switch outside subject tokens"
    assert torch.equal(after[subject_tokens], plain.embeds[-1].chunk(2)[1][0][subject_tokens])


def test_edited_negative_prompt_embeds_replace_the_negative_rows(pipe):
    seen = {}

    def zero_negative(pipeline, step, timestep, tensors):
        seen.update(tensors)
        return {"negative_prompt_embeds": torch.zeros_like(tensors["negative_prompt_embeds"])}

    with UNetInputs(pipe.unet) as inputs:
        pipe(
            TEXT,
            callback_on_step_end=zero_negative,
            callback_on_step_end_tensor_inputs=["latents", "prompt_embeds", "negative_prompt_embeds"],
            output_type="latent",
            **SMALL,
        )
    assert set(seen) == {"latents", "prompt_embeds", "negative_prompt_embeds"}
    negative, conditional = inputs.embeds[1].chunk(2)
    assert (negative == 0).all() and torch.equal(conditional, inputs.embeds[0].chunk(2)[1])


def test_callback_objects_and_the_properties_they_read(pipe):
    class Record(PipelineCallback):
        tensor_inputs = ["latents"]

        def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
            self.seen = (
                pipeline.guidance_scale,
                pipeline.do_classifier_free_guidance,
                pipeline.num_timesteps,
                pipeline.cross_attention_kwargs,
                pipeline.guidance_rescale,
                pipeline.interrupt,
            )
            pipeline._interrupt = step_index == 1  # as diffusers' docs stop a pipeline early
            return callback_kwargs

    record = Record()
    kwargs = {"scale": 1.0}
    with UNetInputs(pipe.unet) as inputs:
        pipe(
            TEXT,
            guidance_scale=3.0,
            guidance_rescale=0.5,
            cross_attention_kwargs=kwargs,
            callback_on_step_end=MultiPipelineCallbacks([record]),
            output_type="latent",
            **SMALL,
        )
    assert record.seen == (3.0, True, 4, kwargs, 0.5, False)
    assert len(inputs.embeds) == 2, "interrupt skips the remaining steps"
    assert inputs.kwargs == [kwargs, kwargs], "cross_attention_kwargs reach the UNet"


@pytest.mark.parametrize("subjects", [False, True], ids=["text", "subjects"])
def test_diffusers_common_callback_checks(pipe, subject_paths, subjects):
    """What diffusers' PipelineTesterMixin.test_callback_inputs / test_callback_cfg check."""
    prompt = dict(prompt=PROMPT, subject_images=subject_paths) if subjects else dict(prompt=TEXT)
    call = dict(output_type="latent", **SMALL, **prompt)

    def zero_last(pipeline, step, timestep, tensors):
        assert set(tensors) == set(pipeline._callback_tensor_inputs)
        if step == pipeline.num_timesteps - 1:
            tensors["latents"] = torch.zeros_like(tensors["latents"])
        return tensors

    out = pipe(callback_on_step_end=zero_last, callback_on_step_end_tensor_inputs=pipe._callback_tensor_inputs, **call)
    assert out.images.abs().sum() == 0

    def more_guidance(pipeline, step, timestep, tensors):
        pipeline._guidance_scale += 1.0
        return tensors

    pipe(guidance_scale=2.0, callback_on_step_end=more_guidance, **call)
    assert pipe.guidance_scale == 2.0 + pipe.num_timesteps


def test_unknown_callback_tensor_is_an_error(pipe):
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        pipe(TEXT, callback_on_step_end=lambda *a: {}, callback_on_step_end_tensor_inputs=["noise"], **SMALL)


# --- embeddings in, encode_prompt -------------------------------------------------------------------------
def test_encode_prompt_matches_stable_diffusion(pipe, make_stable_diffusion):
    ours = pipe.encode_prompt([TEXT, "a dog"], "cpu", 2, True, ["blurry", "dark"])
    theirs = make_stable_diffusion().encode_prompt([TEXT, "a dog"], "cpu", 2, True, ["blurry", "dark"])
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
    skipped = pipe.encode_prompt(TEXT, "cpu", 1, False, clip_skip=1)[0]
    ids = pipe.tokenizer(TEXT, padding="max_length", max_length=77, return_tensors="pt").input_ids
    hidden = pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
    assert torch.equal(skipped, pipe.text_encoder.final_layer_norm(hidden)), "clip_skip=1: the penultimate layer"


def test_prompt_embeds_in_text_only_equal_stable_diffusion(pipe, make_stable_diffusion):
    embeds, negative = pipe.encode_prompt(TEXT, "cpu", 1, True, "blurry")
    call = dict(prompt_embeds=embeds, negative_prompt_embeds=negative, output_type="np", guidance_scale=5.0, **SMALL)
    ours = pipe(generator=seeded(), **call).images
    theirs = make_stable_diffusion()(generator=seeded(), **call).images
    assert np.abs(ours - theirs).max() == 0.0


def test_prompt_embeds_with_subjects_need_the_subject_tokens(pipe, subject_paths):
    texts, index = pipe.parse_prompts([PROMPT], [subject_paths])
    embeds, _ = pipe.encode_prompt(texts, "cpu", 1, False)
    call = dict(subject_images=subject_paths, output_type="latent", **SMALL)
    from_prompt = pipe(PROMPT, generator=seeded(), **call).images
    from_embeds = pipe(prompt_embeds=embeds, subject_token_index=index, generator=seeded(), **call).images
    assert torch.equal(from_prompt, from_embeds)
    with pytest.raises(ValueError, match="subject_token_index"):
        pipe(prompt_embeds=embeds, **call)
    with pytest.raises(ValueError, match="not both"):
        pipe(PROMPT, prompt_embeds=embeds, **call)


def test_custom_timesteps_equal_stable_diffusion(pipe, make_stable_diffusion):
    call = dict(timesteps=[901, 601, 301, 1], height=32, width=32, guidance_scale=5.0, output_type="np")
    ours = pipe(TEXT, generator=seeded(), **call).images
    assert np.abs(ours - make_stable_diffusion()(TEXT, generator=seeded(), **call).images).max() == 0.0


def test_one_flat_subject_list_serves_every_prompt(pipe, subject_paths):
    prompts = [PROMPT, "two friends, a man <|image|> and a woman <|image|>"]
    call = dict(output_type="latent", **SMALL)
    flat = pipe(prompts, subject_images=subject_paths, generator=seeded(), **call).images
    nested = pipe(prompts, subject_images=[subject_paths, subject_paths], generator=seeded(), **call).images
    assert torch.equal(flat, nested)
    with pytest.raises(ValueError, match="mixes lists"):
        pipe(prompts, subject_images=[subject_paths[0], [subject_paths[1]]], **call)


# --- optional components ------------------------------------------------------------------------------------
def test_text_only_pipeline_without_subject_parts(components, make_stable_diffusion, subject_paths, tmp_path):
    parts = {**components, "image_encoder": None, "feature_extractor": None, "fuser": None}
    pipe = FastComposerPipeline.from_components(parts)
    pipe.set_progress_bar_config(disable=True)
    call = dict(guidance_scale=5.0, output_type="np", **SMALL)
    ours = pipe(TEXT, generator=seeded(), **call).images
    assert np.abs(ours - make_stable_diffusion()(TEXT, generator=seeded(), **call).images).max() == 0.0
    with pytest.raises(ValueError, match="image_encoder and fuser"):
        pipe(PROMPT, subject_images=subject_paths, **SMALL)

    pipe.save_pretrained(tmp_path / "text-only")
    assert not (tmp_path / "text-only" / "fuser").exists()
    loaded = FastComposerPipeline.from_pretrained(tmp_path / "text-only")
    assert loaded.fuser is None and loaded.image_encoder is None


def test_no_vae_gives_latents(components):
    pipe = FastComposerPipeline.from_components({**components, "vae": None})
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae_scale_factor == 8
    latents = pipe(TEXT, output_type="latent", num_inference_steps=2, height=32, width=32).images
    assert latents.shape == (1, 4, 4, 4)
    with pytest.raises(ValueError, match="output_type='latent'"):
        pipe(TEXT, num_inference_steps=2)


# --- over-long prompts ------------------------------------------------------------------------------------------
def test_long_prompt_is_an_error_unless_truncated(pipe, make_stable_diffusion, caplog):
    long = "a photo of a man on the beach " + "in golden light " * 30
    with pytest.raises(ValueError, match="prompt too long: .* or pass truncate=True"):
        pipe(long, **SMALL)
    with pytest.raises(ValueError, match="negative prompt too long"):
        pipe(TEXT, negative_prompt=long, **SMALL)
    with caplog.at_level(logging.WARNING):
        ours = pipe(long, truncate=True, generator=seeded(), output_type="np", **SMALL).images
    assert "dropped" in caplog.text
    theirs = make_stable_diffusion()(long, guidance_scale=5.0, generator=seeded(), output_type="np", **SMALL).images
    assert np.abs(ours - theirs).max() == 0.0, "truncation cuts exactly as Stable Diffusion does"
