"""Dataset construction (docs/architecture.md): corpus -> captions -> segments -> phrases -> matches -> shards.

Every step is a plain function from pyarrow tables to a pyarrow table keyed by image ``id``
with an ``error`` column: a row never disappears, an upstream error is carried forward, and the
first step that fails an image names the reason (see :data:`FAILURE_REASONS`). Model-backed
steps take a model or a zero-argument factory, so a model is only built when some image needs it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

T = TypeVar("T")
M = TypeVar("M")

FAILURE_REASONS = {
    # corpus scan (fc_pipeline.images.ImageError codes)
    "not_found": "the file listed in the manifest does not exist",
    "empty_file": "the file has zero bytes",
    "unreadable": "not a decodable image (or not an image at all)",
    "truncated": "the image data ends early",
    "too_large": "more pixels than max_pixels (decompression-bomb guard)",
    # captioning
    "empty_caption": "the provided or generated caption is empty",
    "caption_failed": "the captioning model raised an error on the image",
    # segmentation
    "bad_annotation": "the provided panoptic annotation is missing, unreadable or inconsistent",
    "no_segments": "no panoptic segment (model or annotation)",
    "segmentation_failed": "the segmentation model raised an error on the image",
    # phrases
    "no_phrases": "the caption has no noun phrase",
    # matching
    "no_match": "no noun phrase matched a segment above the threshold",
    "no_person": "phrases matched segments, but none of them is a person",
    # sharding
    "shard_failed": "the image or its segment map could not be packed into the shard",
}


def batches(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    """Consecutive slices of ``items`` of at most ``size`` elements."""
    if size < 1:
        raise ValueError(f"batch size must be >= 1, got {size}")
    for start in range(0, len(items), size):
        yield items[start : start + size]


def resolve_model(model_or_factory: M | Callable[[], M] | None, method: str, what: str) -> M:
    """A model from an instance (anything with ``method``) or a zero-argument factory (called now)."""
    if model_or_factory is None:
        raise ValueError(f"some images need a {what}, but neither a model nor a factory was given")
    if hasattr(model_or_factory, method):
        return model_or_factory
    if callable(model_or_factory):
        return model_or_factory()
    raise TypeError(f"expected a {what} (with .{method}) or a factory, got {type(model_or_factory).__name__}")


def from_pretrained(load: Callable[..., M], model_id: str, profile_field: str, **kwargs) -> M:
    """``load(model_id, **kwargs)``, turning a missing checkpoint into an error that says what to do."""
    try:
        return load(model_id, **kwargs)
    except (OSError, ValueError, RuntimeError) as exc:  # open_clip reports a failed download as RuntimeError
        raise OSError(
            f"cannot load {model_id!r} ({exc.__class__.__name__}: {exc}). Download it where the hub is "
            f"reachable and pass its local directory: get_profile('paper', {profile_field}='/path/to/model'), "
            f"or use the offline profile 'tiny'."
        ) from exc


def torch_dtype(dtype):
    """A ``torch.dtype`` from a dtype, its name (``"float16"``) or ``None`` (float32)."""
    import torch

    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"unknown torch dtype {dtype!r} (use float32, float16 or bfloat16)")
    return resolved
