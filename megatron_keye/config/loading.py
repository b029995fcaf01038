"""Building a `TrainConfig` from YAML recipes and dotted command-line overrides.

`load_config("tiny-cpu-text", ["parallel.tensor=2"])` reads `recipes/tiny-cpu-text.yaml` (or a
path), applies the overrides, fills the model fields from the named flavor, and type-checks every
value against the dataclass annotations, so `--parallel.tensor=two` fails with the field's name.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from megatron_keye.config.flavors import flavor_fields, vision_flavor_fields
from megatron_keye.config.schema import TrainConfig

RECIPE_DIR = Path(__file__).resolve().parent.parent / "recipes"


class ConfigError(ValueError):
    """A configuration value that cannot work; the message starts with the field to change."""

    def __init__(self, field_name: str, message: str):
        self.field = field_name
        super().__init__(f"{field_name}: {message}")


def recipe_path(name_or_path: str) -> Path:
    """Resolve a recipe name (`tiny-cpu-text`) or a YAML path to a file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    candidate = RECIPE_DIR / f"{name_or_path}.yaml"
    if candidate.exists():
        return candidate
    known = sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))
    raise ConfigError("recipe", f"no recipe {name_or_path!r}; known recipes: {known}")


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn `["parallel.tensor=2", "--model.flavor=small"]` into a nested dict."""
    nested: dict[str, Any] = {}
    for item in overrides:
        text = item[2:] if item.startswith("--") else item
        if "=" not in text:
            raise ConfigError(text, "an override must look like section.field=value")
        key, raw = text.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else None
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(key, "conflicts with another override")
        node[parts[-1]] = value
    return nested


def merge_dicts(base: dict, update: dict) -> dict:
    """Recursive dict merge; `update` wins."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_dicts(out[key], value)
        else:
            out[key] = value
    return out


def load_config(recipe: str | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a recipe, apply overrides and return the typed config."""
    raw: dict = {}
    if recipe is not None:
        with open(recipe_path(recipe)) as f:
            raw = yaml.safe_load(f) or {}
    raw = merge_dicts(raw, parse_overrides(overrides or []))
    return config_from_dict(raw)


def config_from_dict(raw: dict) -> TrainConfig:
    """Build a `TrainConfig` from a (possibly partial) nested dict, resolving the model flavor."""
    raw = dict(raw)
    model = dict(raw.get("model") or {})
    flavor = model.get("flavor", "tiny")
    try:
        base = flavor_fields(flavor)
    except ValueError as err:
        raise ConfigError("model.flavor", str(err).split(": ", 1)[-1]) from None
    vision = model.get("vision")
    if isinstance(vision, dict):
        vision_flavor = vision.get("flavor", "tiny")
        try:
            vision_base = vision_flavor_fields(vision_flavor)
        except ValueError as err:
            raise ConfigError("model.vision.flavor", str(err).split(": ", 1)[-1]) from None
        model["vision"] = {**vision_base, **vision, "flavor": vision_flavor}
    raw["model"] = {**base, **model, "flavor": flavor}
    return _build(TrainConfig, raw, "")


def config_to_dict(config: Any) -> dict:
    """The resolved config as plain YAML-able data (saved with every checkpoint)."""
    return dataclasses.asdict(config)


def _build(cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(where or "config", f"expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            guess = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {guess[0]!r}?" if guess else f"; known fields: {sorted(names)}"
            raise ConfigError(_join(where, key), f"unknown field{hint}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        name = _join(where, f.name)
        if f.name in raw:
            kwargs[f.name] = _coerce(hints[f.name], raw[f.name], name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            if dataclasses.is_dataclass(hints[f.name]):
                kwargs[f.name] = _build(hints[f.name], {}, name)
            else:
                raise ConfigError(name, "is required")
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, name: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value if value is not None else {}, name)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, name)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(name, f"{value!r} fits none of {tp}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(name, f"{value!r} is not one of {list(choices)}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list | tuple):
            raise ConfigError(name, f"expected a list, got {value!r}")
        return [_coerce(item_tp, v, f"{name}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(name, f"expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(name, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            # YAML reads 1e6 (no dot) as a string.
            try:
                return float(value)
            except (TypeError, ValueError):
                raise ConfigError(name, f"expected a number, got {value!r}") from None
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(name, f"expected a string, got {value!r}")
        return value
    raise ConfigError(name, f"unsupported type {tp}")


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


__all__ = [
    "ConfigError",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "parse_overrides",
    "recipe_path",
]
