"""What a config key means and which values it takes, readable by code.

Every entry point's config is a dataclass tree whose fields are declared with `opt(default,
"meaning")` (sections with `section(cls, "meaning")`): the meaning sits in the field's metadata, so
the source file and `--help` (core/config/cli.py) read the same text. `Range` and `check_ranges`
give each numeric key its allowed values, with errors that name the key.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import typing
from collections.abc import Iterator, Mapping
from typing import Any

from core.config.loading import ConfigError

HELP = "help"


def opt(default: Any, meaning: str) -> Any:
    """A dataclass field with default `default` and the one-line `meaning` that --help prints."""
    metadata = {HELP: meaning}
    if type(default).__hash__ is None:
        # lists and dicts: every instance needs its own copy, as with default_factory
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def section(cls: type, meaning: str) -> Any:
    """A field holding a nested config dataclass (built with its defaults), with its meaning."""
    return dataclasses.field(default_factory=cls, metadata={HELP: meaning})


def meaning_of(f: dataclasses.Field) -> str:
    """The one-line meaning declared with `opt` / `section` ("" when there is none)."""
    return f.metadata.get(HELP, "")


@dataclasses.dataclass(frozen=True)
class Key:
    """One settable key of a config tree, as --help lists it."""

    path: str          # dotted, e.g. "optim.lr"
    type: Any          # the annotation
    default: Any       # the value with every default in place
    meaning: str
    section: str       # the top-level section ("" for a key of the root)


def nested_dataclass(tp: Any) -> type | None:
    """The dataclass inside `tp` (itself, or X in `X | None`), else None."""
    if dataclasses.is_dataclass(tp):
        return tp
    return next((a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)), None)


def config_keys(cls: type, default: Any = None, prefix: str = "", top: str = "") -> Iterator[Key]:
    """Every key of the dataclass tree `cls` in declaration order.

    A section that is always present is not itself a key (its keys are); an optional one (`X |
    None`, e.g. model.lora) is, and its keys follow with the defaults they take once it is set.
    """
    default = cls() if default is None else default
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path, tp, value = f"{prefix}{f.name}", hints[f.name], getattr(default, f.name)
        inner = nested_dataclass(tp)
        where = top or (f.name if inner is not None and not prefix else "")
        if inner is None or inner is not tp:
            yield Key(path, tp, value, meaning_of(f), where)
        if inner is not None:
            yield from config_keys(inner, value if isinstance(value, inner) else inner(), path + ".", where)


@dataclasses.dataclass(frozen=True)
class Range:
    """lo/hi bounds (None = unbounded); `open_lo`/`open_hi` exclude the bound itself."""

    lo: float | None = None
    hi: float | None = None
    open_lo: bool = False
    open_hi: bool = False
    note: str = ""

    def __contains__(self, x: float) -> bool:
        if not math.isfinite(x):
            return False
        if self.lo is not None and (x < self.lo or (self.open_lo and x == self.lo)):
            return False
        if self.hi is not None and (x > self.hi or (self.open_hi and x == self.hi)):
            return False
        return True

    def __str__(self) -> str:
        left = "(" if self.open_lo or self.lo is None else "["
        right = ")" if self.open_hi or self.hi is None else "]"
        lo = "-inf" if self.lo is None else f"{self.lo:g}"
        hi = "inf" if self.hi is None else f"{self.hi:g}"
        return f"{left}{lo}, {hi}{right}" + (f" ({self.note})" if self.note else "")


def at_least(lo: float, note: str = "") -> Range:
    """[lo, inf)."""
    return Range(lo=lo, note=note)


POSITIVE = Range(lo=0, open_lo=True)
UNIT = Range(0, 1)


def numeric_values(cfg: Any, prefix: str = "") -> dict[str, list[float]]:
    """{"section.key": [numbers]} for every int / float (or list / dict of them) set in the tree."""
    out: dict[str, list[float]] = {}
    for f in dataclasses.fields(cfg):
        key = f"{prefix}{f.name}"
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out.update(numeric_values(value, key + "."))
            continue
        items = list(value.values()) if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else [value]
        numbers = [v for v in items if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if numbers:
            out[key] = numbers
    return out


def check_ranges(cfg: Any, ranges: Mapping[str, Range], declared_in: str) -> None:
    """Raise ConfigError naming the key when a number lies outside its range.

    A numeric key without a declared range is an error too (`declared_in` says where to add it),
    so a new key cannot skip the check.
    """
    for key, values in numeric_values(cfg).items():
        allowed = ranges.get(key)
        if allowed is None:
            raise ConfigError(f"{key} has no declared range ({declared_in})")
        for v in values:
            if v not in allowed:
                raise ConfigError(f"{key} must be in {allowed}, got {v}")
