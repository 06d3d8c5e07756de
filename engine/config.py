"""Typed configuration: YAML files and `--set dotted.key=value` overrides validated into dataclasses.

A config section is a dataclass; its fields and type hints are the schema. `build_config` walks a
plain dict into the dataclass tree and reports every problem as a `ConfigError` that names the key,
the nearest valid key for a misspelling, the expected type, or the valid choices of a `Literal`.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from engine.errors import ConfigError

T = TypeVar("T")


def load_yaml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML mapping, with clear errors for a missing file or invalid YAML.

    A top-level `base: other.yaml` (relative to this file) reads that file first and overlays this one on it,
    section by section, so a config can state only what differs from another.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass an existing YAML file to --config")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values, not {type(data).__name__}")
    if "base" not in data:
        return data
    base = data.pop("base")
    if not isinstance(base, str):
        raise ConfigError(f"config file {path}: base must be the path of another YAML file, not {base!r}")
    base_path = path.parent / base
    if base_path.resolve() in _seen or base_path.resolve() == path.resolve():
        raise ConfigError(f"config file {path}: base {base} leads back to itself; remove the cycle")
    if not base_path.is_file():
        raise ConfigError(f"config file {path}: its base {base_path} does not exist; "
                          "base is read relative to the file that names it")
    return _overlay(load_yaml(base_path, (*_seen, path.resolve())), data)


def _overlay(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` on `base`: sections merged key by key, any other value replaced."""
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _overlay(merged[key], value)
        else:
            merged[key] = value
    return merged


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one `dotted.key=value` override in place; the value is parsed as YAML."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} must look like dotted.key=value, e.g. train.steps=100")
    key, raw = assignment.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {assignment!r}: {part!r} holds a value, not a section")
        node = child
    node[parts[-1]] = value


def build_config(cls: type[T], data: Any, where: str = "") -> T:
    """Validate `data` against dataclass `cls`, recursively; raise ConfigError on the first problem."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping of keys to values, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = get_type_hints(cls)
    for key in data:
        if key not in fields:
            near = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"; did you mean {_join(where, near[0])!r}?" if near else ""
            raise ConfigError(
                f"unknown config key {_join(where, key)!r}{hint} Valid keys here: {', '.join(sorted(fields))}"
            )
    values = {}
    for name, field in fields.items():
        path = _join(where, name)
        if name in data:
            values[name] = _coerce(hints[name], data[name], path)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"config key {path!r} is required")
    return cls(**values)


def to_dict(config: Any) -> dict[str, Any]:
    """The plain-dict form of a config dataclass, suitable for YAML."""
    return dataclasses.asdict(config)


def _join(where: str, key: Any) -> str:
    return f"{where}.{key}" if where else str(key)


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is list:
        return f"list of {_type_name(get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(tp: Any, value: Any, path: str) -> Any:
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return build_config(tp, value if value is not None else {}, path)
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            near = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise ConfigError(
                f"{path} = {value!r} is not valid{hint}; choose one of: {', '.join(map(str, choices))}"
            )
        return value
    if origin in (Union, types.UnionType):
        for arg in get_args(tp):
            try:
                return _coerce(arg, value, path)
            except ConfigError:
                continue
        raise ConfigError(f"{path} = {value!r} has the wrong type; expected {_type_name(tp)}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path} = {value!r} has the wrong type; expected {_type_name(tp)}")
        (item,) = get_args(tp)
        return [_coerce(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:  # YAML reads 1e-3 (no dot) as a string
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is typing.Any:
        return value
    raise ConfigError(f"{path} = {value!r} has the wrong type; expected {_type_name(tp)}")
