"""Step 1: a caption per image — the corpus's own, else BLIP-2's."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pyarrow as pa
import torch
from PIL import Image
from tqdm.auto import tqdm

from fc_pipeline.data import batches, from_pretrained, resolve_model
from fc_pipeline.images import ImageError, load_image
from fc_pipeline.pretrained import check_step_memory
from fc_pipeline.profiles import ModelProfile, clip_tokenizer, get_profile
from fc_pipeline.settings import torch_dtype

logger = logging.getLogger(__name__)

CAPTIONS_SCHEMA = pa.schema(
    [("id", pa.string()), ("caption", pa.string()), ("caption_source", pa.string()), ("error", pa.string())]
)


class Captioner:
    """BLIP-2 (``Blip2ForConditionalGeneration``) image captioner of a model profile."""

    def __init__(
        self,
        profile: ModelProfile | str = "tiny",
        device: str = "cpu",
        dtype: torch.dtype | str | None = None,
        max_new_tokens: int = 30,
    ):
        self.profile = get_profile(profile)
        self.device = torch.device(device)
        self.dtype = torch_dtype(dtype)
        self.max_new_tokens = max_new_tokens
        check_step_memory("caption", self.profile, self.device, self.dtype)
        if self.profile.tiny:
            self.processor, self.model = _tiny_blip2(self.profile)
        else:
            from transformers import Blip2ForConditionalGeneration, Blip2Processor

            model_id, offline = self.profile.captioner, self.profile.offline
            self.processor = from_pretrained(
                Blip2Processor.from_pretrained, model_id, "captioner", local_files_only=offline
            )
            self.model = from_pretrained(
                Blip2ForConditionalGeneration.from_pretrained,
                model_id,
                "captioner",
                dtype=self.dtype,
                local_files_only=offline,
            )
        self.model.to(self.device, self.dtype).eval()

    @torch.inference_mode()
    def caption(self, images: list[Image.Image]) -> list[str]:
        """One caption per image (stripped; may be empty for a poor model)."""
        if not images:
            return []
        pixel_values = self.processor(images=images, return_tensors="pt")["pixel_values"]
        # Without input_ids, generate() prompts with the query-token placeholders + BOS itself.
        generated = self.model.generate(
            pixel_values=pixel_values.to(self.device, self.dtype), max_new_tokens=self.max_new_tokens
        )
        return [text.strip() for text in self.processor.batch_decode(generated, skip_special_tokens=True)]


def _tiny_blip2(profile: ModelProfile):
    """A random BLIP-2 with OPT from ``TINY_CONFIGS["captioner"]`` that runs fully offline."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, BlipImageProcessor
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD  # BLIP-2's EVA-CLIP uses them too

    config = profile.tiny_configs["captioner"]
    size = config["image_size"]
    tokenizer = clip_tokenizer(profile)
    image_processor = BlipImageProcessor(
        size={"height": size, "width": size}, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD
    )
    processor = Blip2Processor(image_processor, tokenizer, num_query_tokens=config["num_query_tokens"])
    image_token = tokenizer.convert_tokens_to_ids(processor.image_token.content)
    text_config = dict(
        config["text_config"],
        vocab_size=len(tokenizer),  # CLIP BPE + the processor's "<image>" token
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    blip_config = Blip2Config(
        vision_config=config["vision_config"],
        qformer_config=config["qformer_config"],
        text_config=text_config,
        num_query_tokens=config["num_query_tokens"],
        image_token_index=image_token,  # transformers 5 needs it explicitly
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(profile.seed)
        model = Blip2ForConditionalGeneration(blip_config)
    return processor, model


def caption_corpus(
    corpus: pa.Table,
    captioner: Captioner | Callable[[], Captioner] | None,
    batch_size: int = 8,
) -> pa.Table:
    """Captions for every row of ``corpus`` (the :func:`~fc_pipeline.data.corpus.scan_corpus` table).

    Columns ``id, caption, caption_source ("provided"|"model"), error``. The captioner (or its
    factory) is only used when some readable image has no provided caption.
    """
    rows = corpus.select(["id", "path", "caption", "error"]).to_pylist()
    out = {
        row["id"]: {
            "id": row["id"],
            "caption": row["caption"],
            "caption_source": "provided" if row["caption"] else None,
            "error": row["error"],
        }
        for row in rows
    }
    todo = [row for row in rows if row["error"] is None and not row["caption"]]
    if todo:
        model = resolve_model(captioner, "caption", "captioner")
        with tqdm(total=len(todo), desc="caption", disable=len(todo) < 2 * batch_size) as progress:
            for batch in batches(todo, batch_size):
                for image_id, caption, error in _caption_batch(model, batch):
                    out[image_id].update(caption=caption, caption_source="model", error=error)
                progress.update(len(batch))
    return pa.Table.from_pylist(list(out.values()), schema=CAPTIONS_SCHEMA)


def _caption_batch(model, batch: list[dict]) -> list[tuple[str, str | None, str | None]]:
    """``(id, caption, error)`` per row; a failing batch is retried image by image."""
    results, images, loaded = [], [], []
    for row in batch:
        try:
            images.append(load_image(row["path"]))
            loaded.append(row["id"])
        except ImageError as exc:
            results.append((row["id"], None, exc.reason))
    try:
        captions = model.caption(images)
    except Exception:  # find the image that breaks the model; the others keep their captions
        logger.warning("captioning a batch of %d failed; retrying one by one", len(images), exc_info=True)
        captions = [_caption_one(model, image, image_id) for image, image_id in zip(images, loaded)]
    for image_id, caption in zip(loaded, captions):
        if caption is None:
            results.append((image_id, None, "caption_failed"))
        else:
            caption = caption.strip()
            results.append((image_id, caption or None, None if caption else "empty_caption"))
    return results


def _caption_one(model, image: Image.Image, image_id: str) -> str | None:
    try:
        return model.caption([image])[0]
    except Exception:
        logger.warning("captioning image %s failed", image_id, exc_info=True)
        return None
