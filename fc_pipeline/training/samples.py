"""Training samples from the webdataset shards (paper §4.1–4.2; shard format in docs/architecture.md).

Per sample: the target image (resize + centre crop, in [-1, 1]), the caption's token ids, and per
subject a reference image (its segment's bounding-box crop with the background replaced by noise,
CLIP-normalised 224²), its noun token and its mask. The sampling regime of the paper is drawn per
sample: 10 % unconditional (empty caption), 10 % text-only (no subject augmentation), otherwise
each subject is dropped with p = 0.1, at most ``max_subjects`` per image.

Streams shard by shard; deterministic given a seed (every random draw of a sample comes from a
generator seeded by ``(seed, epoch, shard, sample)``), and resumable from a ``DataPosition``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from fc_pipeline.model.prompts import subject_token_indices_from_spans


@dataclass(frozen=True)
class SamplingConfig:
    """How shards become training samples (paper defaults)."""

    resolution: int = 512
    reference_size: int = 224
    max_subjects: int = 4
    unconditional_prob: float = 0.1
    text_only_prob: float = 0.1
    subject_drop_prob: float = 0.1
    subject_labels: tuple[str, ...] = ("person",)  # segment labels that may become subjects
    latent_scale: int = 8  # the VAE's downsampling factor (SD: 8; the tiny VAE: 2)

    @property
    def mask_size(self) -> int:
        """Masks are kept at latent resolution; every attention map of the loss is coarser."""
        return self.resolution // self.latent_scale


@dataclass(frozen=True, order=True)
class DataPosition:
    """Where a sample lies in the stream: epoch, shard (in that epoch's order), sample in shard."""

    epoch: int = 0
    shard: int = 0
    sample: int = -1  # -1: before the first sample of the shard

    def as_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "shard": self.shard, "sample": self.sample}


def draw_conditioning(rng: np.random.Generator, num_subjects: int, config: SamplingConfig) -> tuple[str, np.ndarray]:
    """The regime of one sample and which of its subjects are kept (bool ``[num_subjects]``)."""
    u = rng.random()
    keep = rng.random(num_subjects) >= config.subject_drop_prob
    if u < config.unconditional_prob:
        return "unconditional", np.zeros(num_subjects, dtype=bool)
    if u < config.unconditional_prob + config.text_only_prob:
        return "text_only", np.zeros(num_subjects, dtype=bool)
    return "subjects", keep


def _resize_crop(image: Image.Image, size: int, resample: Image.Resampling) -> Image.Image:
    """Resize the shorter side to ``size`` and centre-crop a square."""
    scale = size / min(image.size)
    width, height = max(size, round(image.width * scale)), max(size, round(image.height * scale))
    image = image.resize((width, height), resample)
    left, top = (width - size) // 2, (height - size) // 2
    return image.crop((left, top, left + size, top + size))


def subject_reference(image: np.ndarray, mask: np.ndarray, size: int, rng: np.random.Generator) -> torch.Tensor:
    """CLIP-normalised ``[3, size, size]`` reference: the mask's bounding box, background (and the
    padding to a square) replaced by uniform noise, so that at inference plain photos work."""
    rows, cols = np.nonzero(mask)
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    crop, inside = image[top:bottom, left:right], mask[top:bottom, left:right]
    side = max(crop.shape[:2])
    canvas = rng.integers(0, 256, size=(side, side, 3), dtype=np.uint8)
    y, x = (side - crop.shape[0]) // 2, (side - crop.shape[1]) // 2
    region = canvas[y : y + crop.shape[0], x : x + crop.shape[1]]
    region[inside] = crop[inside]
    resized = Image.fromarray(canvas).resize((size, size), Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(OPENAI_CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD).view(3, 1, 1)
    return (pixels - mean) / std


def _subject_candidates(meta: dict, seg: np.ndarray, labels: Sequence[str]) -> list[dict]:
    """Subjects whose segment is of an allowed label and present in the segment map."""
    label_of = {s.get("id"): s.get("label") for s in meta.get("segments", [])}
    present = set(np.unique(seg).tolist())
    return [
        s
        for s in meta.get("subjects", [])
        if s["segment_id"] in present and (not labels or label_of.get(s["segment_id"], labels[0]) in labels)
    ]


def prepare_sample(sample: dict, tokenizer, config: SamplingConfig, rng: np.random.Generator) -> dict[str, Any]:
    """One training example from a shard sample ``{"id", "image", "meta", "seg"}`` (see module doc)."""
    image, seg, meta = sample["image"].convert("RGB"), np.asarray(sample["seg"]), sample["meta"]
    if seg.shape != (image.height, image.width):
        raise ValueError(f"sample {sample['id']}: segment map {seg.shape} does not match image {image.size}")
    candidates = _subject_candidates(meta, seg, config.subject_labels)
    if len(candidates) > config.max_subjects:
        chosen = np.sort(rng.choice(len(candidates), config.max_subjects, replace=False))
        candidates = [candidates[i] for i in chosen]
    regime, keep = draw_conditioning(rng, len(candidates), config)

    target = _resize_crop(image, config.resolution, Image.Resampling.BICUBIC)
    target_seg = np.asarray(_resize_crop(Image.fromarray(seg), config.resolution, Image.Resampling.NEAREST))
    caption = "" if regime == "unconditional" else meta["caption"]
    # a subject cropped away by the centre crop cannot be localised: treat it as dropped
    kept = [s for s, k in zip(candidates, keep) if k and (target_seg == s["segment_id"]).any()]
    input_ids, token_index = subject_token_indices_from_spans(
        caption, [(s["start"], s["end"]) for s in kept], tokenizer
    )

    slots, size, mask_size = config.max_subjects, config.reference_size, config.mask_size
    references = torch.zeros(slots, 3, size, size)
    masks = torch.zeros(slots, mask_size, mask_size)
    index = torch.zeros(slots, dtype=torch.long)
    valid = torch.zeros(slots, dtype=torch.bool)
    original = np.asarray(image)
    for slot, (subject, token) in enumerate(zip(kept, token_index)):
        references[slot] = subject_reference(original, seg == subject["segment_id"], size, rng)
        full_mask = torch.from_numpy(target_seg == subject["segment_id"]).float()[None, None]
        masks[slot] = F.interpolate(full_mask, size=(mask_size, mask_size), mode="area")[0, 0]
        index[slot], valid[slot] = token, True
    pixels = torch.from_numpy(np.asarray(target, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
    return {
        "id": sample["id"],
        "regime": regime,
        "pixel_values": pixels,
        "input_ids": input_ids,
        "subject_pixel_values": references,
        "subject_token_index": index,
        "subject_valid": valid,
        "subject_masks": masks,
    }


class TrainingSamples(torch.utils.data.IterableDataset):
    """Endless stream of prepared samples over shard URLs, epoch after epoch.

    Shard order is reshuffled each epoch from the seed. ``start`` resumes right after a position
    (whole shards before it are skipped unread). Under several processes (``rank``/``world_size``)
    or DataLoader workers each takes every n-th sample of the same stream. Samples that cannot be
    prepared are skipped with their id counted in ``skipped`` (never crash a run).
    """

    def __init__(
        self,
        urls: Sequence[str],
        tokenizer,
        config: SamplingConfig = SamplingConfig(),
        seed: int = 0,
        start: DataPosition = DataPosition(),
        rank: int = 0,
        world_size: int = 1,
    ):
        if not urls:
            raise ValueError("no training shards given")
        self.urls, self.tokenizer, self.config = list(urls), tokenizer, config
        self.seed, self.start, self.rank, self.world_size = seed, start, rank, world_size
        self.skipped: list[str] = []

    def shard_order(self, epoch: int) -> list[str]:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.urls))
        return [self.urls[i] for i in order]

    def _stride(self) -> tuple[int, int]:
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        return self.rank * workers + worker, self.world_size * workers

    def __iter__(self) -> Iterator[dict[str, Any]]:
        from fc_pipeline.data.shards import read_samples

        offset, stride = self._stride()
        epoch, counter = self.start.epoch, 0
        while True:
            yielded = False
            for shard, url in enumerate(self.shard_order(epoch)):
                if (epoch, shard) < (self.start.epoch, self.start.shard):
                    continue
                for number, sample in enumerate(read_samples(url)):
                    position = DataPosition(epoch, shard, number)
                    if position <= self.start:
                        continue
                    counter += 1
                    if (counter - 1) % stride != offset:
                        continue
                    rng = np.random.default_rng([self.seed, epoch, shard, number])
                    try:
                        prepared = prepare_sample(sample, self.tokenizer, self.config, rng)
                    except (ValueError, KeyError) as exc:
                        self.skipped.append(f"{sample.get('id')}: {exc}")
                        continue
                    yielded = True
                    yield {**prepared, "position": position}
            if not yielded and epoch > self.start.epoch:
                raise RuntimeError(f"no usable training sample in {len(self.urls)} shard(s); see `skipped`")
            epoch += 1


def collate_samples(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors; keep ids, regimes and positions as lists."""
    batch: dict[str, Any] = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        batch[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return batch
