"""Dataset construction (docs/architecture.md): corpus -> captions -> segments -> phrases -> matches -> shards.

Every step is a plain function from pyarrow tables to a pyarrow table keyed by image ``id``
with an ``error`` column: a row never disappears, an upstream error is carried forward, and the
first step that fails an image names the reason (the reasons: docs/architecture.md). Model-backed
steps take a model or a zero-argument factory, so a model is only built when some image needs it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

T = TypeVar("T")
M = TypeVar("M")


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
