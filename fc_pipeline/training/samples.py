"""Training samples from the webdataset shards (paper §4.1–4.2; shard format in docs/architecture.md).

Per sample: the target image (resize + centre crop, in [-1, 1]), the caption's token ids, and per
subject a reference image (its segment's bounding-box crop with the background replaced by noise,
padded to a square and CLIP-normalised by ``fc_pipeline.model.references``, as at inference), its
noun token and its mask. The sampling regime of the paper is drawn per sample: 10 % unconditional
(empty caption), 10 % text-only (no subject augmentation), otherwise each subject is dropped with
p = 0.1, at most ``max_subjects`` per image. With ``augmentation`` the official code's random
augmentations apply: to each reference, and a horizontal flip of the target with its masks.

Streams shard by shard; deterministic given a seed (every random draw of a sample comes from a
generator seeded by ``(seed, epoch, shard, sample)``), and resumable from a ``DataPosition``.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from fc_pipeline.model.prompts import subject_token_indices_from_spans
from fc_pipeline.model.references import REFERENCE_FILLS, ReferenceAugmentation, subject_reference


@dataclass(frozen=True)
class SamplingConfig:
    """How shards become training samples (paper defaults; ``augmentation`` off unless given)."""

    resolution: int = 512
    reference_size: int = 224
    max_subjects: int = 4
    unconditional_prob: float = 0.1
    text_only_prob: float = 0.1
    subject_drop_prob: float = 0.1
    subject_labels: tuple[str, ...] = ("person",)  # segment labels that may become subjects
    latent_scale: int = 8  # the VAE's downsampling factor (SD: 8; the tiny VAE: 2)
    reference_fill: str = "zeros"  # padding of a reference to a square: "zeros" (official) or "noise"
    augmentation: ReferenceAugmentation | None = None  # None: no augmentation

    def __post_init__(self):
        if self.reference_fill not in REFERENCE_FILLS:
            raise ValueError(f"unknown reference_fill {self.reference_fill!r}; choose one of {REFERENCE_FILLS}")

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


def data_state(positions: dict[int, DataPosition], phase: int) -> dict[str, Any]:
    """The loader's resume state as JSON: each stream's last consumed position and the worker phase."""
    return {"phase": phase, "positions": {str(s): p.as_dict() for s, p in sorted(positions.items())}}


def read_data_state(state: dict[str, Any]) -> tuple[dict[int, DataPosition], int]:
    """``(positions by stream, phase)`` of :func:`data_state` (a one-stream ``position`` is stream 0)."""
    if "position" in state:
        return {0: DataPosition(**state["position"])}, 0
    positions = {int(s): DataPosition(**p) for s, p in state["data"]["positions"].items()}
    return positions, int(state["data"]["phase"])


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

    augmentation = config.augmentation
    target, target_seg = image, seg
    if augmentation is not None and rng.random() < augmentation.target_flip_prob:
        target, target_seg = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT), np.ascontiguousarray(seg[:, ::-1])
    target = _resize_crop(target, config.resolution, Image.Resampling.BICUBIC)
    target_seg = np.asarray(_resize_crop(Image.fromarray(target_seg), config.resolution, Image.Resampling.NEAREST))
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
        references[slot] = subject_reference(
            original, seg == subject["segment_id"], size, rng, fill=config.reference_fill, augmentation=augmentation
        )
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

    Shard order is reshuffled each epoch from the seed. The stream is split between
    ``world_size`` processes × DataLoader workers ("streams"), and no stream decodes a sample it
    does not own: with at least as many shards as streams, stream ``s`` reads only the shards
    ``s, s + S, …`` of the epoch's order; with fewer, every stream reads the raw tar members and
    decodes only the samples ``s, s + S, …`` of the epoch. Every sample is used exactly once per
    epoch across all streams (a dataset with fewer samples than streams repeats samples so that
    every stream still gets one).

    ``start`` resumes each stream right after its own position (``{stream: DataPosition}``, or
    one position for a single stream); whole shards before it are skipped unread. ``phase`` is
    the number of batches the DataLoader had delivered (mod the number of workers): the worker
    that delivers the next batch takes over the stream that was due, so a resumed run sees
    exactly the batches an uninterrupted one would. Samples that cannot be prepared are skipped
    with their id counted in ``skipped`` (never crash a run).
    """

    def __init__(
        self,
        urls: Sequence[str],
        tokenizer,
        config: SamplingConfig = SamplingConfig(),
        seed: int = 0,
        start: DataPosition | dict[int, DataPosition] = DataPosition(),
        rank: int = 0,
        world_size: int = 1,
        phase: int = 0,
    ):
        if not urls:
            raise ValueError("no training shards given")
        self.urls, self.tokenizer, self.config = list(urls), tokenizer, config
        self.seed, self.rank, self.world_size, self.phase = seed, rank, world_size, phase
        self.start = dict(start) if isinstance(start, dict) else {rank: start}
        self.skipped: list[str] = []

    def shard_order(self, epoch: int) -> list[str]:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.urls))
        return [self.urls[i] for i in order]

    def stream(self) -> tuple[int, int]:
        """(this stream's index, number of streams) for the calling process and DataLoader worker."""
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        return self.rank * workers + (worker + self.phase) % workers, self.world_size * workers

    def _owned(self, epoch: int, index: int, count: int) -> Iterator[tuple[DataPosition, dict]]:
        """The raw samples stream ``index`` of ``count`` owns in ``epoch``, with their positions."""
        from fc_pipeline.data.shards import read_raw_samples

        order = self.shard_order(epoch)
        start = self.start.get(index, DataPosition())

        def members(shards: Iterable[int]) -> Iterator[tuple[DataPosition, dict]]:
            for shard in shards:
                for number, raw in enumerate(read_raw_samples(order[shard])):
                    yield DataPosition(epoch, shard, number), raw

        if len(order) >= count:  # whole shards per stream; those before the resume point stay unread
            yield from members(s for s in range(index, len(order), count) if (epoch, s) >= (start.epoch, start.shard))
            return
        # fewer shards than streams: split the epoch's samples on raw members, before any decode
        total = 0
        for total, (position, raw) in enumerate(members(range(len(order))), start=1):
            if (total - 1) % count == index:
                yield position, raw
        if 0 < total <= index:  # fewer samples than streams: this stream repeats one
            yield next(itertools.islice(members(range(len(order))), index % total, None))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        from fc_pipeline.data.shards import decode_sample

        index, count = self.stream()
        start = self.start.get(index, DataPosition())
        epoch = start.epoch
        while True:
            yielded = False
            for position, raw in self._owned(epoch, index, count):
                if position <= start:
                    continue
                rng = np.random.default_rng([self.seed, position.epoch, position.shard, position.sample])
                try:
                    prepared = prepare_sample(decode_sample(raw), self.tokenizer, self.config, rng)
                except (ValueError, KeyError) as exc:
                    self.skipped.append(f"{raw.get('__key__')}: {exc}")
                    continue
                yielded = True
                yield {**prepared, "position": position, "stream": index}
            if not yielded and epoch > start.epoch:
                raise RuntimeError(
                    f"no usable training sample for stream {index} of {count} in {len(self.urls)} shard(s); "
                    "see `skipped`"
                )
            epoch += 1


def collate_samples(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors; keep ids, regimes and positions as lists."""
    batch: dict[str, Any] = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        batch[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return batch
