"""The one config loader: dataclass defaults, then a YAML file, then ``key.sub=value`` overrides.

A YAML file may start from another with ``base: other.yaml`` (relative to the including file) and
state only what differs; bases chain, and the overrides apply last.

Every value is type-checked against the dataclass field it lands in, so a typo or a wrong type
fails at start-up with the full dotted key in the message instead of deep inside a run.
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import yaml

from catalog.errors import UserError, short_repr
from catalog.paths import read_bytes

T = TypeVar("T")


class ConfigError(UserError, ValueError):
    """A config key is unknown or holds a value of the wrong type or out of range."""


def load_config(cls: type[T], path: str | None = None, overrides: Sequence[str] = ()) -> T:
    """Build ``cls`` from its defaults, an optional YAML file (with its ``base:`` chain) and overrides."""
    raw: dict[str, Any] = read_config_file(path) if path else {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {short_repr(item)} must look like key.sub=value")
        _set_dotted(raw, key.strip(), yaml.safe_load(value))
    return from_dict(cls, raw)


BASE_KEY = "base"


def read_config_file(path: str, _chain: tuple[str, ...] = ()) -> dict[str, Any]:
    """The mapping in YAML file ``path``, on top of the file its ``base:`` key names (if any).

    ``base`` is a path relative to the including file (or absolute, or a URL); the base may itself have
    a base. The including file wins: mappings merge key by key, any other value (a list included)
    replaces the base's. A file that includes itself through the chain is an error.
    """
    here = _canonical(path)
    if here in _chain:
        raise ConfigError("config files include each other in a cycle: " + " -> ".join([*_chain, here]))
    try:
        loaded = yaml.safe_load(read_bytes(path)) or {}
    except FileNotFoundError:
        included_by = f" (the base of {_chain[-1]})" if _chain else ""
        raise ConfigError(f"config file {path}{included_by} does not exist") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: the top level of a config file must be a mapping")
    base = loaded.pop(BASE_KEY, None)
    if base is None:
        return loaded
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{path}: {BASE_KEY} must name another YAML file, got {base!r}")
    return _merge(read_config_file(_relative_to(path, base), (*_chain, here)), loaded)


def _relative_to(including: str, base: str) -> str:
    if "://" in base or os.path.isabs(base):
        return base
    if "://" in including:
        return _canonical(posixpath.join(posixpath.dirname(including), base))
    return os.path.join(os.path.dirname(including), base)


def _canonical(path: str) -> str:
    """One spelling per file, so a cycle is found however its paths are written."""
    if "://" in path:
        protocol, _, rest = path.partition("://")
        return f"{protocol}://{posixpath.normpath(rest)}"
    return os.path.realpath(path)


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def from_dict(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """Instantiate a (nested) dataclass from a mapping, rejecting unknown keys and wrong types."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix + unknown[0]!r} (known keys here: {', '.join(sorted(fields))})"
        )
    kwargs = {name: _coerce(hints[name], data[name], prefix + name) for name in data}
    try:
        return cls(**kwargs)
    except ValueError as e:  # a range check in the dataclass's __post_init__
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {e}") from None


def to_dict(obj: Any) -> Any:
    """Plain-data form of a config (for manifests and YAML dumps)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def _set_dotted(target: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    for part in parts[:-1]:
        target = target.setdefault(part, {})
        if not isinstance(target, dict):
            raise ConfigError(f"override {key!r}: {part!r} is not a section")
    target[parts[-1]] = value


def _coerce(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, key + ".")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {short_repr(value)}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key}: must be one of {list(args)}, got {short_repr(value)}")
        return value
    if origin in (list, tuple, Sequence):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {short_repr(value)}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        coerced = [_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(coerced) if origin is tuple else coerced
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {short_repr(value)}")
        kt, vt = args if args else (Any, Any)
        return {_coerce(kt, k, key): _coerce(vt, v, f"{key}.{k}") for k, v in value.items()}
    if hint is float:
        if isinstance(value, str):  # YAML reads "1e-5" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {type(value).__name__} {short_repr(value)}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {type(value).__name__} {short_repr(value)}")
        return value
    if hint in (str, bool):
        if not isinstance(value, hint):
            raise ConfigError(f"{key}: expected {hint.__name__}, got {type(value).__name__} {short_repr(value)}")
        return value
    raise ConfigError(f"{key}: unsupported config type {hint!r}")


def at_least(config: object, minimum: float, *names: str) -> None:
    """Range check for a config's ``__post_init__``: each named field is None or ``>= minimum``."""
    for name in names:
        value = getattr(config, name)
        if value is not None and value < minimum:
            raise ConfigError(f"{name} must be at least {minimum}, got {short_repr(value)}")


def above(config: object, minimum: float, *names: str) -> None:
    """Range check for a config's ``__post_init__``: each named field is None or ``> minimum``."""
    for name in names:
        value = getattr(config, name)
        if value is not None and value <= minimum:
            raise ConfigError(f"{name} must be more than {minimum}, got {short_repr(value)}")
