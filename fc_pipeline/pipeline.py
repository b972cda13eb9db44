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
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.pipeline_utils import StableDiffusionMixin
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg, retrieve_timesteps
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput, logging
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPImageProcessor, CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

from fc_pipeline.checkpoints import read_card_data, refuse_pickled_weights, render_model_card
from fc_pipeline.images import load_image, to_rgb
from fc_pipeline.model.attention import install_attention_capture
from fc_pipeline.model.components import COMPONENT_NAMES
from fc_pipeline.model.conditioning import augment_text_embeddings, encode_subject_images
from fc_pipeline.model.fuser import SubjectFuser
from fc_pipeline.model.prompts import parse_subject_prompt
from fc_pipeline.model.references import reference_pixels
from fc_pipeline.profiles import SUBJECT_MARKER
from fc_pipeline.storage import atomic_write

SubjectImage = PIL.Image.Image | str | Path | bytes
DEFAULT_MAX_SUBJECTS = 4
SUBJECT_COMPONENTS = ("image_encoder", "fuser")  # what subject conditioning needs beyond Stable Diffusion

logger = logging.get_logger(__name__)


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


def subject_token_mask(subject_token_index: list[list[int]], num_tokens: int) -> torch.Tensor:
    """``[B, T]`` bool: True at each prompt's subject tokens."""
    mask = torch.zeros(len(subject_token_index), num_tokens, dtype=torch.bool)
    for row, index in enumerate(subject_token_index):
        mask[row, index] = True
    return mask


def condition_on_subjects(
    prompt_embeds: torch.Tensor, subject_embeds: torch.Tensor, subject_mask: torch.Tensor
) -> torch.Tensor:
    """``prompt_embeds`` with the subject tokens of its conditional rows (the last ones, as under
    classifier-free guidance) taken from ``subject_embeds``; every other value is kept as it is."""
    rows = subject_embeds.shape[0]
    if prompt_embeds.shape[0] < rows or prompt_embeds.shape[1:] != subject_embeds.shape[1:]:
        raise ValueError(
            f"`prompt_embeds` {tuple(prompt_embeds.shape)} lost its conditional rows {tuple(subject_embeds.shape)}; "
            "a callback must keep them last"
        )
    conditional = torch.where(subject_mask[..., None], subject_embeds.to(prompt_embeds.dtype), prompt_embeds[-rows:])
    return torch.cat([prompt_embeds[:-rows], conditional])


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
    the ``fuser`` that writes each subject's image embedding into its noun token; text-only
    generation does not need those three (``_optional_components``), and any component may be
    ``None`` where ``StableDiffusionPipeline`` allows it (e.g. no ``vae`` for latent output).
    ``max_subjects`` bounds the number of reference images per prompt.

    Follows diffusers' conventions: ``prompt_embeds``/``negative_prompt_embeds``,
    ``cross_attention_kwargs``, ``callback_on_step_end`` (functions and ``PipelineCallback``
    objects such as ``SDCFGCutoffCallback``) and the ``guidance_scale``, ``num_timesteps``,
    ``interrupt``, ... properties those callbacks read.
    """

    model_cpu_offload_seq = "text_encoder->image_encoder->fuser->unet->vae"
    _optional_components = ["image_encoder", "feature_extractor", "fuser"]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: SchedulerMixin,
        image_encoder: CLIPVisionModelWithProjection | None = None,
        feature_extractor: CLIPImageProcessor | None = None,
        fuser: SubjectFuser | None = None,
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
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        self.card_data: dict[str, Any] = {}  # what the model card says (see save_pretrained)
        self._guidance_scale, self._guidance_rescale, self._clip_skip = 5.0, 0.0, None
        self._cross_attention_kwargs, self._num_timesteps, self._interrupt = None, 0, False

    @classmethod
    def from_components(cls, components: dict[str, Any], **config: Any) -> FastComposerPipeline:
        """Build the pipeline from ``fc_pipeline.model.components.load_components(...)`` output."""
        missing = [name for name in COMPONENT_NAMES if name not in components]
        if missing:
            raise ValueError(f"components missing for FastComposerPipeline: {', '.join(missing)}")
        return cls(**{name: components[name] for name in COMPONENT_NAMES}, **config)

    # ------------------------------------------------------------------ persistence
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs: Any) -> FastComposerPipeline:
        """``DiffusionPipeline.from_pretrained``, safetensors only.

        A local checkpoint holding any pickled weight file is refused before anything is read
        (``UnsafeCheckpointError``); a hub id loads safetensors only. ``use_safetensors=None``
        (diffusers' default) loads pickles of a checkpoint you trust, e.g. to convert it.
        """
        kwargs.setdefault("use_safetensors", True)
        local = Path(pretrained_model_name_or_path)
        if kwargs["use_safetensors"] and local.is_dir():
            refuse_pickled_weights(local)
        pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        if local.is_dir():
            pipe.card_data = read_card_data(local)
        return pipe

    def save_pretrained(
        self,
        save_directory: str | Path,
        safe_serialization: bool = True,
        variant: str | None = None,
        max_shard_size: int | str | None = None,
        push_to_hub: bool = False,
        card_data: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """``DiffusionPipeline.save_pretrained`` (safetensors only) plus the model card ``README.md``.

        ``card_data`` (default: ``self.card_data``, read back by ``from_pretrained``) fills the
        card: base model, training data summary, training settings, metrics
        (see ``fc_pipeline.checkpoints.render_model_card``). ``push_to_hub=True`` uploads the
        folder, card included (``repo_id``, ``token``, ``private``, ``commit_message``, ``create_pr``).
        """
        if not safe_serialization:
            raise ValueError("checkpoints are safetensors only: save with safe_serialization=True")
        if card_data is not None:
            self.card_data = dict(card_data)
        super().save_pretrained(save_directory, variant=variant, max_shard_size=max_shard_size, **kwargs)
        card = render_model_card(self.card_data, type(self.scheduler).__name__ if self.scheduler else "none")
        with atomic_write(Path(save_directory) / "README.md", "w", encoding="utf-8") as handle:
            handle.write(str(card))
        if push_to_hub:
            from huggingface_hub import create_repo

            repo_id = kwargs.get("repo_id") or Path(save_directory).name
            repo_id = create_repo(
                repo_id, exist_ok=True, private=kwargs.get("private"), token=kwargs.get("token")
            ).repo_id
            self._upload_folder(
                save_directory,
                repo_id,
                token=kwargs.get("token"),
                commit_message=kwargs.get("commit_message"),
                create_pr=kwargs.get("create_pr", False),
            )

    def push_to_hub(self, repo_id: str, card_data: dict[str, Any] | None = None, **kwargs: Any):
        """Save to a temporary folder (safetensors and model card) and upload it to the hub repo ``repo_id``."""
        import tempfile

        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, push_to_hub=True, card_data=card_data, repo_id=repo_id, **kwargs)

    # ------------------------------------------------------------------ state read by callbacks
    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def guidance_rescale(self) -> float:
        return self._guidance_rescale

    @property
    def clip_skip(self) -> int | None:
        return self._clip_skip

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale > 1 and self.unet.config.time_cond_proj_dim is None

    @property
    def cross_attention_kwargs(self) -> dict[str, Any] | None:
        return self._cross_attention_kwargs

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    # ------------------------------------------------------------------ inputs
    def check_inputs(
        self,
        prompt: str | list[str] | None,
        subject_images: list[list[PIL.Image.Image]] | None,
        alpha: float,
        num_inference_steps: int,
        height: int,
        width: int,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        return_attention_maps: bool = False,
        callback_on_step_end_tensor_inputs: Sequence[str] = (),
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        subject_token_index: list[list[int]] | None = None,
        output_type: str = "pil",
        truncate: bool = False,
    ) -> None:
        """Reject bad arguments before any model runs, saying what to do instead.

        ``subject_images`` is ``prepare_subject_images``' output. Markers must match the photos,
        and a (negative) prompt over the text encoder's token limit is an error unless ``truncate``.
        """
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("give either `prompt` (a string or a list of strings) or `prompt_embeds`, not both")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("give either `negative_prompt` or `negative_prompt_embeds`, not both")
        if prompt_embeds is not None and negative_prompt_embeds is not None:
            if prompt_embeds.shape != negative_prompt_embeds.shape:
                raise ValueError(
                    f"`prompt_embeds` {tuple(prompt_embeds.shape)} and `negative_prompt_embeds` "
                    f"{tuple(negative_prompt_embeds.shape)} must have the same shape"
                )
        prompts = None if prompt is None else self._as_prompt_list(prompt)
        if prompts is not None and (not prompts or not all(isinstance(p, str) for p in prompts)):
            raise ValueError(f"`prompt` must be a string or a non-empty list of strings, got {prompt!r}")
        batch_size = len(prompts) if prompts is not None else prompt_embeds.shape[0]
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
            raise ValueError(f"`alpha` must be a number in [0, 1] (paper: 0.6–0.8), got {alpha!r}")
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"`num_inference_steps` must be a positive integer, got {num_inference_steps!r}")
        if height % 8 != 0 or width % 8 != 0:
            raise ValueError(f"`height` and `width` have to be divisible by 8 but are {height} and {width}.")
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"`num_images_per_prompt` must be a positive integer, got {num_images_per_prompt!r}")
        if isinstance(negative_prompt, list) and len(negative_prompt) != batch_size:
            raise ValueError(
                f"`negative_prompt` has {len(negative_prompt)} entries but `prompt` has {batch_size}; "
                "give one negative prompt per prompt or a single string"
            )
        unknown = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` must be in {self._callback_tensor_inputs}, got {unknown}"
            )
        if output_type != "latent" and self.vae is None:
            raise ValueError(
                f"output_type={output_type!r} decodes with the vae, which this pipeline lacks; use output_type='latent'"
            )
        if return_attention_maps and subject_images is None:
            raise ValueError("`return_attention_maps` needs `subject_images`: the maps are those of the subject tokens")
        if subject_token_index is not None and (subject_images is None or prompt_embeds is None):
            raise ValueError("`subject_token_index` goes with `prompt_embeds` and `subject_images`")
        if subject_images is None:
            marked = [p for p in prompts or () if SUBJECT_MARKER in p]
            if marked:
                raise ValueError(
                    f"the prompt {marked[0]!r} has {SUBJECT_MARKER} markers but no `subject_images` were given; "
                    "pass one reference image per marker, or remove the markers"
                )
        else:
            self._check_subjects(subject_images, batch_size, prompt_embeds, subject_token_index)
        if prompts is not None:
            self.parse_prompts(prompts, subject_images, truncate)  # markers against photos, token limit
        if negative_prompt is not None:
            self.check_prompt_length(self._as_prompt_list(negative_prompt), truncate, what="negative prompt")

    def _check_subjects(
        self,
        subject_images: list[list[PIL.Image.Image]],
        batch_size: int,
        prompt_embeds: torch.Tensor | None,
        subject_token_index: list[list[int]] | None,
    ) -> None:
        missing = [name for name in SUBJECT_COMPONENTS if getattr(self, name, None) is None]
        if missing:
            raise ValueError(
                f"subject images need the {' and '.join(missing)} of a FastComposer checkpoint, which this "
                "pipeline lacks; load a full checkpoint or generate from text only"
            )
        if len(subject_images) != batch_size:
            raise ValueError(
                f"`subject_images` has {len(subject_images)} lists but there are {batch_size} prompts; "
                "give one list of reference images per prompt (or one flat list for all prompts)"
            )
        for images in subject_images:
            if len(images) > self.config.max_subjects:
                raise ValueError(
                    f"{len(images)} subject images for one prompt, but this pipeline supports at most "
                    f"{self.config.max_subjects} subjects"
                )
        if prompt_embeds is None:
            return
        counts = [len(images) for images in subject_images]
        if subject_token_index is None or [len(index) for index in subject_token_index] != counts:
            raise ValueError(
                f"with `prompt_embeds`, `subject_images` need `subject_token_index`: per prompt, the token index "
                f"of each subject ({counts} subjects; `parse_prompts` gives them for a marked prompt)"
            )
        if any(not 0 <= i < prompt_embeds.shape[1] for index in subject_token_index for i in index):
            raise ValueError(
                f"`subject_token_index` must lie in [0, {prompt_embeds.shape[1]}), got {subject_token_index}"
            )

    @staticmethod
    def _as_prompt_list(prompt: str | list[str]) -> list[str]:
        return list(prompt) if isinstance(prompt, (list, tuple)) else [prompt]

    @staticmethod
    def prepare_subject_images(subject_images: Any, num_prompts: int) -> list[list[PIL.Image.Image]] | None:
        """Reference photos as one list of RGB images per prompt (``None`` when there are none).

        Accepts one list per prompt, or one flat list (or one image) used for every prompt, as
        diffusers pipelines reuse a single conditioning image; each photo is a path, the file's
        bytes or a PIL image of any mode and size.
        """
        if subject_images is None:
            return None

        def load(photo: SubjectImage) -> PIL.Image.Image:
            return to_rgb(photo) if isinstance(photo, PIL.Image.Image) else load_image(photo)

        if isinstance(subject_images, (PIL.Image.Image, str, Path, bytes)):
            subject_images = [subject_images]
        subject_images = list(subject_images)
        nested = [isinstance(item, (list, tuple)) for item in subject_images]
        if not any(nested):
            photos = [load(photo) for photo in subject_images]
            return [photos] * num_prompts if photos else None
        if not all(nested):
            raise ValueError(
                "`subject_images` mixes lists and single photos; give one list per prompt, or one flat list"
            )
        if not any(subject_images):
            return None
        return [[load(photo) for photo in photos] for photos in subject_images]

    # ------------------------------------------------------------------ encoders
    def parse_prompts(
        self, prompts: list[str], subject_images: list[list[PIL.Image.Image]] | None, truncate: bool = False
    ) -> tuple[list[str], list[list[int]]]:
        """The prompts' text without ``<|image|>`` markers and, per prompt, each subject's token index.

        Without subject images the prompts pass unchanged (exactly Stable Diffusion's input); with
        them each marker binds to the token before it. Over-long prompts: see ``check_prompt_length``.
        """
        if subject_images is None:
            texts, subject_token_index = list(prompts), [[] for _ in prompts]
        else:
            parsed = [
                parse_subject_prompt(prompt, self.tokenizer, num_images=len(images))
                for prompt, images in zip(prompts, subject_images)
            ]
            texts, subject_token_index = [p.text for p in parsed], [p.subject_token_index for p in parsed]
        self.check_prompt_length(texts, truncate)
        return texts, subject_token_index

    def check_prompt_length(self, texts: list[str], truncate: bool = False, what: str = "prompt") -> None:
        """Raise if a text has more tokens than the text encoder takes, unless ``truncate`` (then
        encoding cuts it with a warning)."""
        if truncate:
            return
        limit = self.tokenizer.model_max_length
        for text, ids in zip(texts, self.tokenizer(texts, verbose=False).input_ids):
            if len(ids) > limit:
                raise ValueError(
                    f"{what} too long: {len(ids)} tokens but the text encoder takes {limit} (start and end "
                    f"included); shorten {text[:40]!r}... or pass truncate=True (CLI: --truncate) to cut it"
                )

    def _encode_text(
        self, texts: list[str], device: torch.device, clip_skip: int | None, max_length: int | None = None
    ) -> torch.Tensor:
        max_length = max_length or self.tokenizer.model_max_length
        for ids in self.tokenizer(texts, verbose=False).input_ids:
            if len(ids) > max_length:
                dropped = self.tokenizer.decode(ids[max_length - 1 : -1])
                logger.warning(f"text cut to the text encoder's {max_length} tokens; dropped: {dropped!r}")
        inputs = self.tokenizer(
            texts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
        )
        mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            mask = inputs.attention_mask.to(device)
        if clip_skip is None:
            return self.text_encoder(inputs.input_ids.to(device), attention_mask=mask)[0]
        hidden = self.text_encoder(inputs.input_ids.to(device), attention_mask=mask, output_hidden_states=True)[-1]
        text_model = getattr(self.text_encoder, "text_model", self.text_encoder)  # transformers 4 / 5 layout
        return text_model.final_layer_norm(hidden[-(clip_skip + 1)])

    def encode_prompt(
        self,
        prompt: str | list[str] | None,
        device: torch.device,
        num_images_per_prompt: int,
        do_classifier_free_guidance: bool,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        lora_scale: float | None = None,
        clip_skip: int | None = None,
        truncate: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Text-encoder hidden states of the prompts and negative prompts, repeated per image.

        ``StableDiffusionPipeline.encode_prompt``'s signature and numbers; ``prompt`` is plain text
        (``parse_prompts`` removes markers). Over the token limit is an error unless ``truncate``.
        ``lora_scale`` must be ``None``: this pipeline loads no LoRA.
        """
        if lora_scale is not None:
            raise ValueError("`lora_scale` is not supported: FastComposerPipeline loads no LoRA weights")
        if prompt_embeds is None:
            prompts = self._as_prompt_list(prompt)
            self.check_prompt_length(prompts, truncate)
            prompt_embeds = self._encode_text(prompts, device, clip_skip)
        if self.text_encoder is not None:
            dtype = self.text_encoder.dtype
        else:
            dtype = self.unet.dtype if self.unet is not None else prompt_embeds.dtype
        prompt_embeds = prompt_embeds.to(dtype=dtype, device=device)
        batch_size = prompt_embeds.shape[0]
        if do_classifier_free_guidance and negative_prompt_embeds is None:
            if negative_prompt is None:
                negative_prompt = [""] * batch_size
            elif isinstance(negative_prompt, str):
                negative_prompt = [negative_prompt] * batch_size
            self.check_prompt_length(negative_prompt, truncate, what="negative prompt")
            negative_prompt_embeds = self._encode_text(negative_prompt, device, None, max_length=prompt_embeds.shape[1])
        prompt_embeds = prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)
        if do_classifier_free_guidance:
            negative_prompt_embeds = negative_prompt_embeds.to(dtype=dtype, device=device)
            negative_prompt_embeds = negative_prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)
        return prompt_embeds, negative_prompt_embeds

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
        prompt: str | list[str] | None = None,
        subject_images: Sequence[SubjectImage] | Sequence[Sequence[SubjectImage]] | None = None,
        alpha: float = 0.7,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float = 5.0,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        subject_token_index: list[list[int]] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        guidance_rescale: float = 0.0,
        clip_skip: int | None = None,
        callback_on_step_end: Callable[[FastComposerPipeline, int, torch.Tensor, dict], dict]
        | PipelineCallback
        | MultiPipelineCallbacks
        | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        return_attention_maps: bool = False,
        truncate: bool = False,
    ) -> FastComposerPipelineOutput | tuple:
        """Generate images of ``prompt``, with the subjects marked ``<|image|>`` taking the
        identity of ``subject_images`` (one photo per marker, in order).

        ``alpha`` is the fraction of denoising steps, at the end, that see the subjects
        (delayed subject conditioning; 0 = text only, 1 = from the first step). Without
        ``subject_images`` the result is exactly ``StableDiffusionPipeline``'s, whose arguments
        this call shares. With ``prompt_embeds`` (the plain text's embedding) and subject images,
        ``subject_token_index`` gives each subject's token per prompt. A prompt over the text
        encoder's token limit is an error unless ``truncate`` (then it is cut, with a warning).
        ``callback_on_step_end`` may edit ``latents``, ``prompt_embeds`` (the UNet's text input,
        negative rows first) and ``negative_prompt_embeds``; at the switch step the subject tokens
        of the conditional rows are replaced by their fused embeddings.
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs

        # 0. Default height and width to the UNet's sample size
        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor

        # 1. Check inputs
        if prompt is not None:
            batch_size = len(self._as_prompt_list(prompt))
        else:
            batch_size = prompt_embeds.shape[0] if prompt_embeds is not None else 1
        subject_lists = self.prepare_subject_images(subject_images, batch_size)
        self.check_inputs(
            prompt,
            subject_lists,
            alpha,
            num_inference_steps,
            height,
            width,
            negative_prompt,
            num_images_per_prompt,
            return_attention_maps,
            callback_on_step_end_tensor_inputs,
            prompt_embeds,
            negative_prompt_embeds,
            subject_token_index,
            output_type,
            truncate,
        )
        self._guidance_scale = guidance_scale
        self._guidance_rescale = guidance_rescale
        self._clip_skip = clip_skip
        self._cross_attention_kwargs = cross_attention_kwargs
        self._interrupt = False

        # 2. Define call parameters
        device = self._execution_device
        per_prompt = num_images_per_prompt

        # 3. Encode the prompt: the text-only embedding c and, with subjects, the augmented c'
        texts = None
        if prompt is not None:
            texts, subject_token_index = self.parse_prompts(self._as_prompt_list(prompt), subject_lists, truncate)
        text_embeds, negative_prompt_embeds = self.encode_prompt(
            texts,
            device,
            1,
            self.do_classifier_free_guidance,
            negative_prompt,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            clip_skip=self.clip_skip,
            truncate=truncate,
        )
        subject_embeds = subject_mask = None
        if subject_lists is not None:
            subject_embeds = self.encode_subjects(subject_lists, subject_token_index, text_embeds)
            subject_embeds = subject_embeds.repeat_interleave(per_prompt, dim=0)
            subject_mask = subject_token_mask(subject_token_index, text_embeds.shape[1])
            subject_mask = subject_mask.repeat_interleave(per_prompt, dim=0).to(device)
        prompt_embeds = text_embeds.repeat_interleave(per_prompt, dim=0)
        if self.do_classifier_free_guidance:
            negative_prompt_embeds = negative_prompt_embeds.repeat_interleave(per_prompt, dim=0)
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])

        # 4. Prepare timesteps and the step at which subject conditioning starts
        timesteps, num_inference_steps = retrieve_timesteps(
            self.scheduler, num_inference_steps, device, timesteps, sigmas
        )
        subject_start = subject_conditioning_start(len(timesteps), alpha) if subject_embeds is not None else None

        # 5. Prepare latent variables
        latents = self.prepare_latents(
            batch_size * per_prompt,
            self.unet.config.in_channels,
            height,
            width,
            prompt_embeds.dtype,
            device,
            generator,
            latents,
        )

        # 6. Prepare extra step kwargs
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)

        # 7. Denoising loop (recording the subject tokens' cross-attention when asked for)
        capture, attention_sum, attention_steps = None, 0.0, 0
        if return_attention_maps:
            capture = install_attention_capture(self.unet, localization_layers(self.unet))
            rows = pad_token_index(subject_token_index).repeat_interleave(per_prompt, dim=0)
        num_warmup_steps = len(timesteps) - num_inference_steps * self.scheduler.order
        self._num_timesteps = len(timesteps)
        try:
            with self.progress_bar(total=num_inference_steps) as progress_bar:
                for i, t in enumerate(timesteps):
                    if self.interrupt:
                        continue
                    # Delayed subject conditioning (paper §4.3): layout from the text first, identity later.
                    if i == subject_start:
                        prompt_embeds = condition_on_subjects(prompt_embeds, subject_embeds, subject_mask)

                    guided = self.do_classifier_free_guidance  # a callback may have turned guidance off
                    if capture is not None:
                        capture.token_index = torch.cat([rows, rows]) if guided else rows
                    latent_model_input = torch.cat([latents] * 2) if guided else latents
                    latent_model_input = self.scheduler.scale_model_input(latent_model_input, t)
                    noise_pred = self.unet(
                        latent_model_input,
                        t,
                        encoder_hidden_states=prompt_embeds,
                        cross_attention_kwargs=self.cross_attention_kwargs,
                        return_dict=False,
                    )[0]

                    if guided:
                        noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
                        noise_pred = noise_pred_uncond + self.guidance_scale * (noise_pred_text - noise_pred_uncond)
                        if self.guidance_rescale > 0.0:
                            noise_pred = rescale_noise_cfg(
                                noise_pred, noise_pred_text, guidance_rescale=self.guidance_rescale
                            )

                    if capture is not None:
                        attention_sum = attention_sum + mean_layer_attention(
                            capture.maps, latents.shape[0], latents.shape[-2:]
                        )
                        attention_steps += 1
                        capture.clear()

                    latents = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]

                    if callback_on_step_end is not None:
                        tensors = {
                            "latents": latents,
                            "prompt_embeds": prompt_embeds,
                            "negative_prompt_embeds": negative_prompt_embeds,
                        }
                        outputs = callback_on_step_end(
                            self, i, t, {name: tensors[name] for name in callback_on_step_end_tensor_inputs}
                        )
                        latents = outputs.pop("latents", latents)
                        prompt_embeds = outputs.pop("prompt_embeds", prompt_embeds)
                        negative = outputs.pop("negative_prompt_embeds", negative_prompt_embeds)
                        if negative is not negative_prompt_embeds:  # an edited negative replaces the negative rows
                            negative_prompt_embeds = negative
                            if self.do_classifier_free_guidance:
                                conditional = prompt_embeds[-batch_size * per_prompt :]
                                prompt_embeds = torch.cat([negative_prompt_embeds, conditional])

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
        if return_attention_maps and attention_steps:
            per_image = (attention_sum / attention_steps).float().cpu().numpy()
            subjects = [len(index) for index in subject_token_index for _ in range(per_prompt)]
            attention_maps = [maps[:count] for maps, count in zip(per_image, subjects)]
        if not return_dict:
            return (image, attention_maps)
        return FastComposerPipelineOutput(images=image, attention_maps=attention_maps)
