"""The command line every entry point shares: `--config FILE.yaml`, `--set KEY=VALUE`, keys in --help.

    parser = config_parser("python -m rl.pretrain", __doc__, PretrainConfig, ranges=RANGES)
    parser.add_argument("--out", ...)          # the entry point's own flags
    args, cfg = parse_config(parser, PretrainConfig, argv)

--help ends with every key of the config (dotted, grouped by section): its default, type or
choices, allowed range and one-line meaning, all read from the dataclass (core/config/schema.py).
"""
from __future__ import annotations

import argparse
import dataclasses
import textwrap
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

import yaml

from core.config.loading import ConfigError, load_yaml, to_dict
from core.config.schema import Range, config_keys, meaning_of, nested_dataclass

T = TypeVar("T")

_WIDTH = 100


def show_value(value: Any) -> str:
    """A value as one line of YAML flow style: what a config file or `--set` would hold."""
    text = yaml.safe_dump(to_dict(value), default_flow_style=True, width=10**9, sort_keys=False).strip()
    return text.removesuffix("...").strip()


def type_text(tp: Any) -> str:
    """How --help shows a type: float, tiny | flux_fill, list of str, int or null, ..."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        text = " or ".join(type_text(a) for a in args if a is not type(None))
        return text + " or null" if type(None) in args else text
    if origin is typing.Literal:
        return " | ".join(str(a) for a in args)
    if origin in (list, tuple):
        return f"list of {type_text(args[0])}" if args else "list"
    if origin is dict:
        return f"mapping of {type_text(args[0])} to {type_text(args[1])}" if args else "mapping"
    if dataclasses.is_dataclass(tp):
        return "mapping of the keys below"
    return getattr(tp, "__name__", str(tp))


def section_meanings(cls: type) -> dict[str, str]:
    """{section name: its meaning} for the top-level sections of `cls`."""
    hints = typing.get_type_hints(cls)
    return {f.name: meaning_of(f) for f in dataclasses.fields(cls) if nested_dataclass(hints[f.name]) is not None}


def keys_help(cls: type, ranges: Mapping[str, Range] | None = None) -> str:
    """The key list that --help prints after the usage, grouped under `cls`'s sections (if any)."""
    ranges = ranges or {}
    sections = section_meanings(cls)
    nested = " (nested by section)" if sections else ""
    lines = [f"config keys: set them in the --config YAML file{nested} or with --set KEY=VALUE;",
             "each is listed as KEY = DEFAULT  (type, allowed range), then its meaning."]
    current = None
    for key in config_keys(cls):
        if key.section != current:
            current = key.section
            lines += ["", f"{current}: {sections.get(current, '')}".rstrip()] if current else [""]
        detail = type_text(key.type) + (f", in {ranges[key.path]}" if key.path in ranges else "")
        lines.append(f"  {key.path} = {show_value(key.default)}  ({detail})")
        if key.meaning:
            lines.append(textwrap.fill(key.meaning, _WIDTH, initial_indent=" " * 6, subsequent_indent=" " * 6))
    return "\n".join(lines)


def config_parser(prog: str, description: str, cls: type, *, ranges: Mapping[str, Range] | None = None,
                  example: str = "", config_help: str = "YAML file of config keys (default: the built-in defaults)"
                  ) -> argparse.ArgumentParser:
    """An ArgumentParser with --config and --set whose --help ends with every key of `cls`.

    `example` is a KEY=VALUE shown in the --set help (default: the first key at its default).
    """
    if not example:
        first = next(config_keys(cls))
        example = f"{first.path}={show_value(first.default)}"
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     epilog=keys_help(cls, ranges),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", metavar="FILE.yaml", help=config_help)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override a config key (listed below), e.g. --set {example.replace('%', '%%')}; "
                             "repeatable, applied after --config")
    return parser


def parse_config(parser: argparse.ArgumentParser, cls: type[T], argv: list[str] | None = None
                 ) -> tuple[argparse.Namespace, T]:
    """Parse the command line and load the config; a bad key or value exits with status 2, naming it."""
    args = parser.parse_args(argv)
    try:
        cfg = load_yaml(cls, args.config, args.overrides)
    except ConfigError as e:
        parser.exit(2, f"{parser.prog}: config error: {e}\n")
    return args, cfg
