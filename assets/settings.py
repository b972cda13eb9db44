"""Dagster run config derived from the library's settings dataclasses (:mod:`fc_pipeline.settings`).

``config_class(TrainConfig, ...)`` is a ``dg.Config`` with one field per dataclass field: same
name (or a given Dagster name), same type (tuples as lists), the library's default (or a
Dagster-side default, e.g. the CPU demo preset) and the library's help text and paper value as
the description the launchpad shows. The library's bounds and choices are checked when a config
is built, and :func:`check_run_config` builds every step's config of a run in its first step, so
a bad value fails the run before anything is computed; the Dagster side keeps no bounds of its own.
"""

import dataclasses
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any

import dagster as dg
from pydantic import Field, ValidationError, create_model, model_validator

from fc_pipeline.settings import SettingError, check_value, default_of, describe


def _members(hint: Any) -> tuple:
    """The types of a union (``X | None``), or the type itself."""
    union = isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
    return typing.get_args(hint) if union else (hint,)


def _dagster_type(hint: Any, choices: tuple | None = None) -> Any:
    """The type Dagster config understands: ``tuple[X, ...]`` -> ``list[X]``, a closed set of
    ``choices`` -> ``Literal`` (an enum in the launchpad, checked when a run is launched); also
    inside ``| None``."""
    members = _members(hint)
    if len(members) > 1:
        return typing.Union[tuple(_dagster_type(m, choices) for m in members)]  # noqa: UP007 (built from a list)
    if hint is type(None):
        return hint
    if choices is not None:
        return typing.Literal[choices]
    if typing.get_origin(hint) is tuple:
        return list[typing.get_args(hint)[0]]
    return hint


def config_class(
    settings: type,
    name: str,
    doc: str,
    *,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
    rename: Mapping[str, str] | None = None,
    defaults: Mapping[str, Any] | None = None,
) -> type[dg.Config]:
    """A ``dg.Config`` subclass named ``name`` with a field per field of the dataclass ``settings``
    (only ``include`` if given, never ``exclude``); ``rename`` maps a library name to its Dagster
    name, ``defaults`` overrides library defaults (by library name). The library's bounds and
    choices are checked when the config is built, i.e. before the step body runs. Subclass it to
    add asset-only fields."""
    rename, defaults = rename or {}, defaults or {}
    hints = typing.get_type_hints(settings)
    fields, checked = {}, {}
    for field in dataclasses.fields(settings):
        if field.name in exclude or (include is not None and field.name not in include):
            continue
        checked[rename.get(field.name, field.name)] = field
        default = defaults.get(field.name, default_of(field))
        if default is dataclasses.MISSING:
            raise ValueError(f"{settings.__name__}.{field.name} has no default; exclude it from {name}")
        default = list(default) if isinstance(default, tuple) else default
        fields[rename.get(field.name, field.name)] = (
            _dagster_type(hints[field.name], field.metadata.get("choices")),
            Field(default=default, description=describe(field)),
        )

    def check_bounds(config):
        for key, field in checked.items():
            try:
                check_value(field, getattr(config, key))
            except SettingError as error:
                raise ValueError(f"{key} {error.problem}") from None
        return config

    validators = {"check_bounds": model_validator(mode="after")(check_bounds)}
    return create_model(name, __base__=dg.Config, __doc__=doc, __module__=__name__, __validators__=validators, **fields)


def to_settings(settings: type, config: dg.Config, rename: Mapping[str, str] | None = None, **extra: Any) -> Any:
    """The dataclass ``settings`` from a config made by :func:`config_class` (only the fields both
    know; lists back to tuples where the dataclass wants them) plus ``extra``; a value the dataclass
    rejects fails the step with that one-line reason."""
    rename = rename or {}
    hints = typing.get_type_hints(settings)
    options = {}
    for field in dataclasses.fields(settings):
        key = rename.get(field.name, field.name)
        if key in type(config).model_fields:
            value = getattr(config, key)
            tuple_wanted = any(typing.get_origin(m) is tuple for m in _members(hints[field.name]))
            options[field.name] = tuple(value) if tuple_wanted and isinstance(value, list) else value
    try:
        return settings(**{**options, **extra})
    except ValueError as error:
        raise dg.Failure(f"invalid config: {error}") from None


# op name -> its config class, for every step of the code location with config (filled by the asset modules)
STEP_CONFIGS: dict[str, type[dg.Config]] = {}


def check_run_config(context: dg.AssetExecutionContext) -> None:
    """Build the config of every step of this run, so a value the library rejects fails the run's
    first step, before any work is done (Dagster checks only the types when a run is launched)."""
    for name, entry in (context.run_config.get("ops") or {}).items():
        config_type = STEP_CONFIGS.get(name)
        if config_type is None or not isinstance(entry, dict):
            continue
        try:
            config_type(**(entry.get("config") or {}))
        except ValidationError as error:
            problem = error.errors()[0]
            where = ".".join(map(str, problem["loc"]))
            message = problem["msg"].removeprefix("Value error, ")
            raise dg.Failure(f"invalid config of step {name}: {where + ' ' if where else ''}{message}") from None


def library_field(settings: type, name: str) -> Any:
    """A pydantic field (resource or config) with the default, description and bounds of the
    library's ``settings.name``, for a Dagster class that holds one library setting under its own name."""
    field = next(f for f in dataclasses.fields(settings) if f.name == name)
    meta = field.metadata
    return Field(
        default=default_of(field),
        description=describe(field),
        ge=meta.get("min"),
        le=meta.get("max"),
        gt=meta.get("above"),
    )
