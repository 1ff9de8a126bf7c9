"""Typed values from plain dicts: a section's dataclass built from its keys, each value coerced to its field's type
(YAML-parsed override strings included), and errors that name the key and what would be valid."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Union

import yaml


class ConfigError(ValueError):
    """A config key or value is wrong; the message names the key and what would be valid."""


def build_dataclass(cls: type, values: dict, prefix: str):
    hints = getattr(cls, "_hints", None) or typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise ConfigError(unknown_key_message(prefix, key, names))
        kwargs[key] = coerce(value, hints.get(key, Any), f"{prefix}.{key}")
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ConfigError(f"section {prefix!r}: {err}") from None


def unknown_key_message(prefix: str, key: str, valid: list[str]) -> str:
    full = f"{prefix}.{key}" if prefix else key
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(f'{prefix}.{c}' if prefix else c) for c in close)}?" if close else ""
    return f"unknown config key {full!r}.{hint} Valid keys{' of ' + prefix if prefix else ''}: {', '.join(valid)}"


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Coerce a YAML-parsed value to the annotated type, or raise naming the key and the expected type."""
    if tp is Any or tp is typing.Any:
        return value
    origin = typing.get_origin(tp)
    if origin is Union or origin is types.UnionType:  # Optional[X] and X | None
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        candidates = [arg for arg in args if arg is not type(None)]
        for arg in candidates:
            try:
                return coerce(value, arg, key)
            except ConfigError:
                if len(candidates) == 1 and dataclasses.is_dataclass(arg):  # model.lora: its key names the problem
                    raise
        raise ConfigError(f"config key {key!r} expects {_type_name(tp)}, got {value!r}")
    if origin in (list, tuple) or tp in (list, tuple):
        if isinstance(value, str):
            value = yaml.safe_load(value.replace("(", "[").replace(")", "]"))
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key!r} expects a list like [a, b], got {value!r}")
        args = typing.get_args(tp)
        item_tp = args[0] if args else Any
        items = [coerce(v, item_tp, key) for v in value]
        return tuple(items) if (origin or tp) is tuple else items
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"config key {key!r} expects true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not (
            isinstance(value, int) or (isinstance(value, str) and value.lstrip("-").isdigit())
        ):
            raise ConfigError(f"config key {key!r} expects an integer, got {value!r}")
        return int(value)
    if tp is float:
        try:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config key {key!r} expects a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"config key {key!r} expects a string, got {value!r}")
        return str(value)
    if dataclasses.is_dataclass(tp):  # a nested section (model.lora)
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r} expects a mapping of its keys, got {value!r}")
        built = build_dataclass(tp, value, key)
        try:
            getattr(built, "check", lambda: None)()
        except ValueError as err:
            raise ConfigError(str(err)) from None
        return built
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r} expects a mapping, got {value!r}")
        return value
    return value


def _type_name(tp) -> str:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return " or ".join(getattr(a, "__name__", str(a)) for a in args) or str(tp)
