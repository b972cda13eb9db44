"""FastComposerPipeline: Stable Diffusion plus subject images, with delayed subject conditioning.

Paper §4.3. The first ``N - round(α·N)`` denoising steps see the plain text embedding (the layout
forms from text alone), the remaining steps the subject-augmented one (identity is filled in).
Without subject images the pipeline computes exactly what ``StableDiffusionPipeline`` computes.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.pipeline_utils import StableDiffusionMixin
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg, retrieve_timesteps
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPImageProcessor, CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

from fc_pipeline.images import load_image, to_rgb
from fc_pipeline.model.attention import install_attention_capture
from fc_pipeline.model.components import COMPONENT_NAMES
from fc_pipeline.model.conditioning import augment_text_embeddings, encode_subject_images
from fc_pipeline.model.fuser import SubjectFuser
from fc_pipeline.model.prompts import parse_subject_prompt
from fc_pipeline.model.references import reference_pixels
from fc_pipeline.profiles import SUBJECT_MARKER

SubjectImage = PIL.Image.Image | str | Path | bytes
DEFAULT_MAX_SUBJECTS = 4


@dataclass
class FastComposerPipelineOutput(BaseOutput):
    """Generated images and, when asked for, each image's subject-token attention maps.

    ``attention_maps[k]`` is a float32 array ``[num_subjects, h, w]`` at the attention (latent)
    resolution, averaged over the hooked cross-attention layers and all denoising steps.
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    attention_maps: list[np.ndarray] | None = None


def subject_conditioning_start(num_steps: int, alpha: float) -> int:
    """Index of the first denoising step that sees the subject-augmented embedding.

    The last ``round(α·N)`` of ``N`` steps are subject-conditioned (halves round up), so α = 0
    never switches and α = 1 conditions from the first step.
    """
    return num_steps - math.floor(alpha * num_steps + 0.5)


def localization_layers(unet: UNet2DConditionModel) -> list[str]:
    """The UNet blocks whose cross-attention maps are returned: all but the highest-resolution ones.

    For SD1.5 this is down_blocks.1/2, mid_block, up_blocks.1/2 — the layers the localisation
    loss supervises (paper §4.2).
    """
    down = [f"down_blocks.{i}" for i, block in enumerate(unet.down_blocks) if hasattr(block, "attentions")]
    up = [f"up_blocks.{i}" for i, block in enumerate(unet.up_blocks) if hasattr(block, "attentions")]
    return down[1:] + ["mid_block"] + up[:-1]


def pad_token_index(subject_token_index: list[list[int]]) -> torch.Tensor:
    """Per-prompt subject token indices as a ``[B, S]`` LongTensor, padded with 0."""
    width = max(len(index) for index in subject_token_index)
    return torch.tensor([index + [0] * (width - len(index)) for index in subject_token_index], dtype=torch.long)


def mean_layer_attention(maps: dict[str, torch.Tensor], batch_size: int, size: Sequence[int]) -> torch.Tensor:
    """Subject-token attention ``[B, S, h, w]`` averaged over heads and layers, at latent ``size``.

    ``maps`` are an attention capture's ``[B_unet, heads, H*W, S]`` probabilities; the last
    ``batch_size`` rows are the conditional half under classifier-free guidance.
    """
    height, width = size
    resized = []
    for probs in maps.values():
        probs = probs[-batch_size:].float().mean(1)  # [B, H*W, S]
        h, w = height, width
        while h * w > probs.shape[1]:  # each UNet level halves the resolution (rounding up)
            h, w = math.ceil(h / 2), math.ceil(w / 2)
        if h * w != probs.shape[1]:
            raise ValueError(f"cannot place {probs.shape[1]} attention positions on a {height}x{width} latent grid")
        grid = probs.transpose(1, 2).reshape(batch_size, -1, h, w)
        resized.append(
            torch.nn.functional.interpolate(grid, size=(height, width), mode="bilinear", align_corners=False)
        )
    return torch.stack(resized).mean(0)


class FastComposerPipeline(DiffusionPipeline, StableDiffusionMixin):
    """Multi-subject personalised text-to-image generation without fine-tuning (FastComposer).

    Components are those of Stable Diffusion (``vae``, ``text_encoder``, ``tokenizer``, ``unet``,
    ``scheduler``) plus the subject encoder (``image_encoder`` with its ``feature_extractor``) and
    the ``fuser`` that writes each subject's image embedding into its noun token.
    ``max_subjects`` bounds the number of reference images per prompt.
    """

    model_cpu_offload_seq = "text_encoder->image_encoder->fuser->unet->vae"
    _callback_tensor_inputs = ["latents", "prompt_embeds"]

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: SchedulerMixin,
        image_encoder: CLIPVisionModelWithProjection,
        feature_extractor: CLIPImageProcessor,
        fuser: SubjectFuser,
        max_subjects: int = DEFAULT_MAX_SUBJECTS,
    ):
        super().__init__()
        self.register_modules(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            image_encoder=image_encoder,
            feature_extractor=feature_extractor,
            fuser=fuser,
        )
        self.register_to_config(max_subjects=max_subjects)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    @classmethod
    def from_components(cls, components: dict[str, Any], **config: Any) -> FastComposerPipeline:
        """Build the pipeline from ``fc_pipeline.model.components.load_components(...)`` output."""
        missing = [name for name in COMPONENT_NAMES if name not in components]
        if missing:
            raise ValueError(f"components missing for FastComposerPipeline: {', '.join(missing)}")
        return cls(**{name: components[name] for name in COMPONENT_NAMES}, **config)

    # ------------------------------------------------------------------ inputs
    def check_inputs(
        self,
        prompts: list[str],
        subject_images: list[list[PIL.Image.Image]] | None,
        alpha: float,
        num_inference_steps: int,
        height: int,
        width: int,
        negative_prompt: str | list[str] | None,
        num_images_per_prompt: int,
        return_attention_maps: bool,
        callback_on_step_end_tensor_inputs: Sequence[str],
    ) -> None:
        """Reject bad arguments before any model runs, saying what to do instead."""
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"`prompt` must be a string or a non-empty list of strings, got {prompts!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
            raise ValueError(f"`alpha` must be a number in [0, 1] (paper: 0.6–0.8), got {alpha!r}")
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"`num_inference_steps` must be a positive integer, got {num_inference_steps!r}")
        if height % 8 != 0 or width % 8 != 0:
            raise ValueError(f"`height` and `width` have to be divisible by 8 but are {height} and {width}.")
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"`num_images_per_prompt` must be a positive integer, got {num_images_per_prompt!r}")
        if isinstance(negative_prompt, list) and len(negative_prompt) != len(prompts):
            raise ValueError(
                f"`negative_prompt` has {len(negative_prompt)} entries but `prompt` has {len(prompts)}; "
                "give one negative prompt per prompt or a single string"
            )
        unknown = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` must be in {self._callback_tensor_inputs}, got {unknown}"
            )
        if return_attention_maps and subject_images is None:
            raise ValueError("`return_attention_maps` needs `subject_images`: the maps are those of the subject tokens")
        if subject_images is None:
            marked = [p for p in prompts if SUBJECT_MARKER in p]
            if marked:
                raise ValueError(
                    f"the prompt {marked[0]!r} has {SUBJECT_MARKER} markers but no `subject_images` were given; "
                    "pass one reference image per marker, or remove the markers"
                )
            return
        if len(subject_images) != len(prompts):
            raise ValueError(
                f"`subject_images` has {len(subject_images)} lists but there are {len(prompts)} prompts; "
                "give one list of reference images per prompt"
            )
        for images in subject_images:
            if len(images) > self.config.max_subjects:
                raise ValueError(
                    f"{len(images)} subject images for one prompt, but this pipeline supports at most "
                    f"{self.config.max_subjects} subjects"
                )
        # marker/image count, markers without a noun and over-long prompts: parse_subject_prompt

    @staticmethod
    def _as_prompt_list(prompt: str | list[str]) -> list[str]:
        return list(prompt) if isinstance(prompt, (list, tuple)) else [prompt]

    @staticmethod
    def prepare_subject_images(subject_images: Any, num_prompts: int) -> list[list[PIL.Image.Image]] | None:
        """Reference photos as one list of RGB images per prompt (``None`` when there are none).

        Accepts one list per prompt or, for a single prompt, a flat list or one image; each photo
        is a path, the file's bytes or a PIL image of any mode and size.
        """
        if subject_images is None:
            return None
        if isinstance(subject_images, (PIL.Image.Image, str, Path, bytes)):
            subject_images = [subject_images]
        subject_images = list(subject_images)
        if num_prompts == 1 and not all(isinstance(item, (list, tuple)) for item in subject_images):
            subject_images = [subject_images]
        if not any(subject_images):
            return None
        return [
            [to_rgb(photo) if isinstance(photo, PIL.Image.Image) else load_image(photo) for photo in photos]
            for photos in subject_images
        ]

    # ------------------------------------------------------------------ encoders
    def tokenize_prompt(
        self, prompts: list[str], subject_images: list[list[PIL.Image.Image]] | None
    ) -> tuple[torch.Tensor, list[list[int]]]:
        """Token ids ``[B, T]`` of the prompts and, per prompt, the token index of each subject.

        Without subject images this is exactly Stable Diffusion's tokenisation; with them the
        ``<|image|>`` markers are removed and each binds to the token before it.
        """
        if subject_images is None:
            inputs = self.tokenizer(
                prompts,
                padding="max_length",
                max_length=self.tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            )
            return inputs.input_ids, [[] for _ in prompts]
        parsed = [
            parse_subject_prompt(prompt, self.tokenizer, num_images=len(images))
            for prompt, images in zip(prompts, subject_images)
        ]
        return torch.stack([p.input_ids for p in parsed]), [p.subject_token_index for p in parsed]

    def encode_prompt(
        self,
        input_ids: torch.Tensor,
        device: torch.device,
        do_classifier_free_guidance: bool,
        negative_prompt: str | list[str] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Text-encoder hidden states of the prompt tokens and of the negative prompts."""
        batch_size = input_ids.shape[0]
        prompt_embeds = self.text_encoder(input_ids.to(device))[0]
        dtype = self.text_encoder.dtype
        prompt_embeds = prompt_embeds.to(dtype=dtype, device=device)
        if not do_classifier_free_guidance:
            return prompt_embeds, None
        if negative_prompt is None:
            negative_prompt = [""] * batch_size
        elif isinstance(negative_prompt, str):
            negative_prompt = [negative_prompt] * batch_size
        uncond_ids = self.tokenizer(
            negative_prompt,
            padding="max_length",
            max_length=prompt_embeds.shape[1],
            truncation=True,
            return_tensors="pt",
        ).input_ids
        negative_prompt_embeds = self.text_encoder(uncond_ids.to(device))[0]
        return prompt_embeds, negative_prompt_embeds.to(dtype=dtype, device=device)

    def encode_subjects(
        self,
        subject_images: list[list[PIL.Image.Image]],
        subject_token_index: list[list[int]],
        prompt_embeds: torch.Tensor,
    ) -> torch.Tensor:
        """The subject-augmented text embedding ``c'``: each reference photo fused into its noun token.

        Natural photos work as they are, no segmentation is needed: each is padded to a square and
        resized exactly as the training references are (``fc_pipeline.model.references``).
        """
        token_index = pad_token_index(subject_token_index)
        valid = torch.tensor([[s < len(photos) for s in range(token_index.shape[1])] for photos in subject_images])
        photos = [photo for photos in subject_images for photo in photos]
        pixels = torch.stack([reference_pixels(photo, self.image_encoder.config.image_size) for photo in photos])
        pixel_values = pixels.new_zeros(*valid.shape, *pixels.shape[1:])
        pixel_values[valid] = pixels  # row-major: prompt by prompt, subject by subject
        image_embeds = encode_subject_images(self.image_encoder, pixel_values)
        return augment_text_embeddings(prompt_embeds, image_embeds, self.fuser, token_index, valid)

    # ------------------------------------------------------------------ sampling helpers
    def prepare_latents(self, batch_size, num_channels_latents, height, width, dtype, device, generator, latents=None):
        """Initial noise, scaled by the scheduler's ``init_noise_sigma`` (as in Stable Diffusion)."""
        shape = (
            batch_size,
            num_channels_latents,
            int(height) // self.vae_scale_factor,
            int(width) // self.vae_scale_factor,
        )
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(
                f"{len(generator)} generators were passed for an effective batch size of {batch_size}; "
                "pass one generator per generated image"
            )
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        else:
            latents = latents.to(device)
        return latents * self.scheduler.init_noise_sigma

    def prepare_extra_step_kwargs(self, generator, eta):
        """``eta`` and ``generator`` for schedulers whose ``step`` accepts them."""
        accepted = set(inspect.signature(self.scheduler.step).parameters)
        extra = {}
        if "eta" in accepted:
            extra["eta"] = eta
        if "generator" in accepted:
            extra["generator"] = generator
        return extra

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        subject_images: Sequence[SubjectImage] | Sequence[Sequence[SubjectImage]] | None = None,
        alpha: float = 0.7,
        num_inference_steps: int = 50,
        guidance_scale: float = 5.0,
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_attention_maps: bool = False,
        eta: float = 0.0,
        guidance_rescale: float = 0.0,
        latents: torch.Tensor | None = None,
        callback_on_step_end: Callable[[FastComposerPipeline, int, torch.Tensor, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        return_dict: bool = True,
    ) -> FastComposerPipelineOutput | tuple:
        """Generate images of ``prompt``, with the subjects marked ``<|image|>`` taking the
        identity of ``subject_images`` (one photo per marker, in order).

        ``alpha`` is the fraction of denoising steps, at the end, that see the subjects
        (delayed subject conditioning; 0 = text only, 1 = from the first step). Without
        ``subject_images`` the result is exactly ``StableDiffusionPipeline``'s.
        """
        # 0. Default height and width to the UNet's sample size
        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor

        # 1. Check inputs
        prompts = self._as_prompt_list(prompt)
        subject_lists = self.prepare_subject_images(subject_images, len(prompts))
        self.check_inputs(
            prompts,
            subject_lists,
            alpha,
            num_inference_steps,
            height,
            width,
            negative_prompt,
            num_images_per_prompt,
            return_attention_maps,
            callback_on_step_end_tensor_inputs,
        )

        # 2. Define call parameters
        batch_size = len(prompts)
        device = self._execution_device
        do_classifier_free_guidance = guidance_scale > 1 and self.unet.config.time_cond_proj_dim is None

        # 3. Encode the prompt: the text-only embedding c and, with subjects, the augmented c'
        input_ids, subject_token_index = self.tokenize_prompt(prompts, subject_lists)
        text_embeds, negative_embeds = self.encode_prompt(
            input_ids, device, do_classifier_free_guidance, negative_prompt
        )
        subject_embeds = None
        if subject_lists is not None:
            subject_embeds = self.encode_subjects(subject_lists, subject_token_index, text_embeds)

        def batched(embeds: torch.Tensor) -> torch.Tensor:
            """Repeat per image, and put the unconditional half first for classifier-free guidance."""
            embeds = embeds.repeat_interleave(num_images_per_prompt, dim=0)
            if do_classifier_free_guidance:
                embeds = torch.cat([negative_embeds.repeat_interleave(num_images_per_prompt, dim=0), embeds])
            return embeds

        text_only_embeds = batched(text_embeds)
        subject_conditioned_embeds = batched(subject_embeds) if subject_embeds is not None else None

        # 4. Prepare timesteps and the step at which subject conditioning starts
        timesteps, num_inference_steps = retrieve_timesteps(self.scheduler, num_inference_steps, device)
        subject_start = (
            subject_conditioning_start(len(timesteps), alpha) if subject_embeds is not None else len(timesteps)
        )

        # 5. Prepare latent variables
        latents = self.prepare_latents(
            batch_size * num_images_per_prompt,
            self.unet.config.in_channels,
            height,
            width,
            text_only_embeds.dtype,
            device,
            generator,
            latents,
        )

        # 6. Prepare extra step kwargs
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)

        # 7. Denoising loop (recording the subject tokens' cross-attention when asked for)
        capture, attention_sum = None, 0.0
        if return_attention_maps:
            capture = install_attention_capture(self.unet, localization_layers(self.unet))
            rows = pad_token_index(subject_token_index).repeat_interleave(num_images_per_prompt, dim=0)
            capture.token_index = torch.cat([rows, rows]) if do_classifier_free_guidance else rows
        num_warmup_steps = len(timesteps) - num_inference_steps * self.scheduler.order
        try:
            with self.progress_bar(total=num_inference_steps) as progress_bar:
                for i, t in enumerate(timesteps):
                    # Delayed subject conditioning (paper §4.3): layout from the text first, identity later.
                    if i >= subject_start:
                        prompt_embeds = subject_conditioned_embeds
                    else:
                        prompt_embeds = text_only_embeds

                    latent_model_input = torch.cat([latents] * 2) if do_classifier_free_guidance else latents
                    latent_model_input = self.scheduler.scale_model_input(latent_model_input, t)
                    noise_pred = self.unet(
                        latent_model_input, t, encoder_hidden_states=prompt_embeds, return_dict=False
                    )[0]

                    if do_classifier_free_guidance:
                        noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
                        noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)
                        if guidance_rescale > 0.0:
                            noise_pred = rescale_noise_cfg(
                                noise_pred, noise_pred_text, guidance_rescale=guidance_rescale
                            )

                    if capture is not None:
                        attention_sum = attention_sum + mean_layer_attention(
                            capture.maps, latents.shape[0], latents.shape[-2:]
                        )
                        capture.clear()

                    latents = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]

                    if callback_on_step_end is not None:
                        callback_kwargs = {"latents": latents, "prompt_embeds": prompt_embeds}
                        callback_kwargs = {k: callback_kwargs[k] for k in callback_on_step_end_tensor_inputs}
                        latents = callback_on_step_end(self, i, t, callback_kwargs).pop("latents", latents)

                    if i == len(timesteps) - 1 or ((i + 1) > num_warmup_steps and (i + 1) % self.scheduler.order == 0):
                        progress_bar.update()
        finally:
            if capture is not None:
                capture.remove()

        # 8. Decode the latents
        if output_type == "latent":
            image = latents
        else:
            image = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False, generator=generator)[0]
            image = self.image_processor.postprocess(
                image, output_type=output_type, do_denormalize=[True] * image.shape[0]
            )
        self.maybe_free_model_hooks()

        attention_maps = None
        if return_attention_maps:
            per_image = (attention_sum / len(timesteps)).float().cpu().numpy()
            subjects = [len(index) for index in subject_token_index for _ in range(num_images_per_prompt)]
            attention_maps = [maps[:count] for maps, count in zip(per_image, subjects)]
        if not return_dict:
            return (image, attention_maps)
        return FastComposerPipelineOutput(images=image, attention_maps=attention_maps)
