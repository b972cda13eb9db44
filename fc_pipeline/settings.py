"""Settings declared once: a dataclass field per option, with its help text, paper value and bounds.

A settings dataclass (``TrainConfig``, ``EvaluationConfig``, ``DatasetSettings``) declares each option
with :func:`setting` and calls :func:`validate` in ``__post_init__``, so a bad value fails before any
work starts, whoever builds the object. The ``fc-pipeline`` flags (:func:`add_arguments`) and the
Dagster run config (``assets.settings.config_class``) are derived from the same fields: a new option
is one new line in the dataclass.

Also here: the two settings every model step shares, ``device`` ("auto") and ``dtype`` (a name).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any


class SettingError(ValueError):
    """An option with a value it cannot take; ``option`` is the field's name."""

    def __init__(self, option: str, problem: str):
        super().__init__(f"{option} {problem}")
        self.option, self.problem = option, problem


def setting(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    paper: Any = None,
    min: float | None = None,
    max: float | None = None,
    above: float | None = None,
    choices: Iterable[Any] | None = None,
) -> Any:
    """A dataclass field with its description (``help``), the paper's value and the allowed values:
    ``min``/``max`` inclusive bounds, ``above`` an exclusive lower bound, ``choices`` a closed set
    (each checked per element for sequences; ``None`` always allowed)."""
    metadata = {"help": help, "paper": paper, "min": min, "max": max, "above": above}
    metadata["choices"] = tuple(choices) if choices is not None else None
    return dataclasses.field(default=default, metadata=metadata)


def describe(field: dataclasses.Field) -> str:
    """The field's help text with its paper value, as the CLI and the Dagster UI show it."""
    text, paper = field.metadata.get("help", ""), field.metadata.get("paper")
    return f"{text} (paper: {paper})" if paper is not None else text


def _problem(value: Any, meta: Mapping[str, Any]) -> str | None:
    if meta.get("choices") is not None and value not in meta["choices"]:
        return f"must be one of {', '.join(map(str, meta['choices']))}, got {value!r}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if meta.get("min") is not None and value < meta["min"]:
        return f"must be >= {meta['min']}, got {value!r}"
    if meta.get("max") is not None and value > meta["max"]:
        return f"must be <= {meta['max']}, got {value!r}"
    if meta.get("above") is not None and value <= meta["above"]:
        return f"must be > {meta['above']}, got {value!r}"
    return None


def check_value(field: dataclasses.Field, value: Any) -> None:
    """Raise :class:`SettingError` when ``value`` (each element of a sequence) breaks the field's bounds/choices."""
    for item in value if isinstance(value, (list, tuple)) else [value]:
        problem = None if item is None else _problem(item, field.metadata)
        if problem:
            raise SettingError(field.name, problem)


def validate(settings: Any) -> None:
    """Check every field of a settings dataclass against its bounds/choices; raise :class:`SettingError`."""
    for field in dataclasses.fields(settings):
        check_value(field, getattr(settings, field.name))


def field_types(cls: type) -> dict[str, Any]:
    """``{field name: type}`` of a settings dataclass, ``X | None`` reduced to ``X``."""
    hints = typing.get_type_hints(cls)
    resolved = {}
    for field in dataclasses.fields(cls):
        hint = hints[field.name]
        if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
            args = [a for a in typing.get_args(hint) if a is not type(None)]
            hint = args[0] if len(args) == 1 else hint
        resolved[field.name] = hint
    return resolved


def default_of(field: dataclasses.Field) -> Any:
    """A field's default value (``MISSING`` when it has none)."""
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def flag(name: str) -> str:
    """The command-line flag of a field: ``train_batch_size`` -> ``--train-batch-size``."""
    return "--" + name.replace("_", "-")


def add_arguments(
    parser: argparse.ArgumentParser,
    cls: type,
    *,
    exclude: Iterable[str] = (),
    aliases: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """One flag per field of ``cls`` (``--field-name``, plus ``aliases[name]``); returns ``{field: flag}``.

    Flags default to ``None`` (the dataclass's default applies; :func:`given` collects the others);
    the help shows the default and the paper's value.
    """
    aliases, kinds, flags = aliases or {}, field_types(cls), {}
    for field in dataclasses.fields(cls):
        if field.name in exclude:
            continue
        kind = kinds[field.name]
        shown = default_of(field)
        if isinstance(shown, (list, tuple)):
            shown = " ".join(map(str, shown))
        text = describe(field) + ("" if shown in (dataclasses.MISSING, None) else f" [default: {shown}]")
        strings = [aliases[field.name], flag(field.name)] if field.name in aliases else [flag(field.name)]
        options: dict[str, Any] = dict(dest=field.name, default=None, help=text.replace("%", "%%"))
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) in (list, tuple):
            options.update(nargs="+", action="extend", type=typing.get_args(kind)[0], metavar="X")
        else:
            options.update(type=kind, metavar={int: "N", float: "X"}.get(kind, field.name.upper()))
            if field.metadata.get("choices") is not None:
                options.update(choices=field.metadata["choices"], metavar=None)
        parser.add_argument(*strings, **options)
        flags[field.name] = strings[0]
    return flags


def given(args: argparse.Namespace, cls: type, names: Iterable[str]) -> dict[str, Any]:
    """The options set on the command line (not ``None``), lists turned into tuples where ``cls`` wants them."""
    kinds = field_types(cls)
    values = {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}
    return {k: tuple(v) if typing.get_origin(kinds[k]) is tuple else v for k, v in values.items()}


# --- device and dtype -------------------------------------------------------------------------
DTYPE_NAMES = ("float32", "float16", "bfloat16")


def resolve_device(device: str | None) -> str:
    """``None`` or ``"auto"`` -> ``"cuda"`` when a GPU is visible, else ``"cpu"``; anything else as is."""
    if device not in (None, "", "auto"):
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(dtype: str | None, device: str) -> str:
    """``None``/``""``/``"auto"`` -> half precision on CUDA (bfloat16 where supported, else float16),
    float32 elsewhere; a dtype name is kept."""
    if dtype not in (None, "", "auto"):
        return dtype
    if not str(device).startswith("cuda"):
        return "float32"
    import torch

    return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"


def release_memory() -> None:
    """Collect released models now and hand cached CUDA memory back to the device."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def torch_dtype(dtype: Any):
    """A ``torch.dtype`` from a dtype, its name (``"float16"``) or ``None`` (float32)."""
    import torch

    if dtype is None or dtype == "":
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"unknown torch dtype {dtype!r}; choose one of {', '.join(DTYPE_NAMES)}")
    return getattr(torch, dtype)
