"""Typed configs from YAML with dotted command-line overrides; unknown keys are errors.

Shared by every entry point (rl.train, rl.pretrain, reward.train), so it lives in core/ where both
rl/ and reward/ may import it. Works on any tree of dataclasses: `from_dict(cls, data)` builds one
from nested dicts (checking every key and coercing scalar types), `apply_overrides(cfg, ["a.b=3",
...])` sets dotted keys, and `to_dict(cfg)` gives back plain data for saving the resolved config
next to a run.
"""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override names an unknown key or holds a value of the wrong type."""


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: cannot be {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, prefix=where)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        kt, vt = args or (Any, Any)
        return {_coerce(k, kt, where): _coerce(v, vt, f"{where}.{k}") for k, v in value.items()}
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        items = [_coerce(v, inner, where) for v in value]
        return tuple(items) if origin is tuple else items
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(float(value)) if float(value).is_integer() else int(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass `cls` from nested dicts; unknown keys raise ConfigError naming them."""
    fields, hints = _fields(cls), _hints(cls)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"in {prefix!r} " if prefix else ""
        raise ConfigError(f"unknown config key(s) {unknown} {where}— valid keys: {sorted(fields)}")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> Any:
    """Plain nested dicts / lists / scalars of a dataclass tree (what YAML and JSON can hold)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def _parse_scalar(text: str) -> Any:
    """YAML scalar parsing for overrides (`1e-4`, `true`, `null`, `[a, b]`, `{a: 1}`)."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    # YAML 1.1 reads "1e-4" as a string; numbers are what a user means
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def apply_overrides(cfg: T, overrides: list[str]) -> T:
    """Apply ["section.key=value", ...] to a dataclass tree (returns a new tree)."""
    data = to_dict(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.path=value")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        node, cls = data, type(cfg)
        for i, part in enumerate(parts):
            fields = _fields(cls) if dataclasses.is_dataclass(cls) else None
            if fields is not None and part not in fields:
                raise ConfigError(
                    f"unknown config key {'.'.join(parts[:i + 1])!r} in override {item!r} — "
                    f"valid keys here: {sorted(fields)}"
                )
            if i == len(parts) - 1:
                node[part] = _parse_scalar(text)
            else:
                if fields is not None:
                    cls = _hints(cls)[part]
                    cls = next((a for a in typing.get_args(cls) if dataclasses.is_dataclass(a)), cls)
                else:
                    cls = None
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
    return from_dict(type(cfg), data)


def load_yaml(cls: type[T], path: str | os.PathLike | None, overrides: list[str] | None = None) -> T:
    """Defaults of `cls`, updated by the YAML file (if any), then by the overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        loaded = yaml.safe_load(p.read_text())
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level of a config must be a mapping")
        data = loaded or {}
    base = to_dict(cls())
    merged = _merge(cls, base, data)
    cfg = from_dict(cls, merged)
    return apply_overrides(cfg, overrides or [])


def _merge(cls: Any, base: Any, update: Any) -> Any:
    """`update` over `base` section by section: a dataclass section keeps the defaults of the keys
    the file leaves out, but any other value — a dict-valued key such as data.mixture included —
    is replaced whole (a file's `mixture: {fill: 1.0}` means fill only, not fill plus the defaults)."""
    if dataclasses.is_dataclass(cls) and isinstance(base, dict) and isinstance(update, dict):
        hints, out = _hints(cls), dict(base)
        for k, v in update.items():
            if k not in base:
                out[k] = v  # from_dict names the unknown key
                continue
            tp = hints.get(k)
            section = next((a for a in (tp, *typing.get_args(tp)) if dataclasses.is_dataclass(a)), None)
            out[k] = _merge(section, base[k], v) if section is not None else v
        return out
    return update


def save_yaml(cfg: Any, path: str | os.PathLike) -> None:
    """Write the tree as YAML in field order, loadable again by `load_yaml`."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
