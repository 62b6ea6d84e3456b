"""Parameter counts from the real diffusers / transformers / peft classes, built on the meta device.

`torch.device("meta")` gives every parameter a shape and a dtype but no storage: the FLUX
transformer, T5-XXL or a 7B VLM build in well under a second, with no weights, GPU or download,
and the counts are those of the modules the run would load (tied weights counted once).
Results are cached per config: a plan and its what-if variants build each model once.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import re
from collections.abc import Sequence

import torch
from torch import nn

from rl.planning.architectures import Component, PlanError, VLMArchitecture


@dataclasses.dataclass(frozen=True)
class ParamCount:
    """A model's parameters and the bytes they take in the dtype it is loaded in."""

    class_name: str
    params: int
    bytes: int


@dataclasses.dataclass(frozen=True)
class LoraCount:
    """The adapter parameters peft adds (the only trainable ones) and the Linears they wrap."""

    params: int
    layers: int


@contextlib.contextmanager
def _quiet():
    """Building from a config logs notes (unused keys, defaults); a plan prints its own table."""
    loggers = [logging.getLogger(name) for name in ("diffusers", "transformers", "peft")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def build_on_meta(component: Component) -> nn.Module:
    """The component's module, built from its config on the meta device."""
    import diffusers
    import transformers

    library = {"diffusers": diffusers, "transformers": transformers}.get(component.library)
    cls = getattr(library, component.class_name, None) if library is not None else None
    if cls is None:
        raise PlanError(f"{component.name}: unknown class {component.library}.{component.class_name}")
    with _quiet(), torch.device("meta"):
        if component.library == "diffusers":
            return cls.from_config(component.config)
        return cls(cls.config_class.from_dict(component.config))


def _build_vlm(arch: VLMArchitecture) -> nn.Module:
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = dict(arch.config)
    if "model_type" not in config:
        raise PlanError(f"judge.model {arch.name}: its config.json has no model_type")
    with _quiet():
        try:
            hf_config = AutoConfig.for_model(config.pop("model_type"), **config)
            with torch.device("meta"):
                return AutoModelForImageTextToText.from_config(hf_config)
        except (ValueError, KeyError) as err:
            raise PlanError(f"judge.model {arch.name}: not a chat VLM transformers can build ({err})") from None


def _fp32_patterns(model: nn.Module, library: str, dtype: torch.dtype) -> list[re.Pattern]:
    """Parameters the loader keeps in float32 although the model loads in `dtype`: transformers'
    `_keep_in_fp32_modules` (fp16 only) and `_keep_in_fp32_modules_strict` (fp16 and bf16);
    diffusers' `_keep_in_fp32_modules` (any reduced dtype). Patterns match anywhere in the name."""
    if dtype == torch.float32:
        return []
    names = set()
    if library == "diffusers" or dtype == torch.float16:
        names |= set(getattr(model, "_keep_in_fp32_modules", None) or [])
    if library == "transformers":
        names |= set(getattr(model, "_keep_in_fp32_modules_strict", None) or [])
    return [re.compile(n.replace("*", ".*")) for n in names]


def count_module(model: nn.Module, library: str, dtype: torch.dtype) -> ParamCount:
    """Parameters of `model` and their bytes in `dtype` (its keep-in-float32 parts in float32)."""
    keep = _fp32_patterns(model, library, dtype)
    params = total = 0
    for name, p in model.named_parameters():
        size = 4 if any(k.search(name) for k in keep) else dtype.itemsize
        params += p.numel()
        total += p.numel() * size
    return ParamCount(type(model).__name__, params, total)


@functools.cache
def count_component(component: Component, dtype: torch.dtype) -> ParamCount:
    return count_module(build_on_meta(component), component.library, dtype)


@functools.cache
def count_vlm(arch: VLMArchitecture, dtype: torch.dtype) -> ParamCount:
    return count_module(_build_vlm(arch), "transformers", dtype)


@functools.cache
def count_lora(transformer: Component, r: int, alpha: float, targets: Sequence[str], init: str) -> LoraCount:
    """What `Policy.add_lora` adds: peft adapters on `targets`, built on the meta transformer."""
    from core.policies.lora import lora_config, lora_layers

    model = build_on_meta(transformer)
    try:
        config = lora_config(model, r=r, alpha=alpha, targets=list(targets), init=init)
    except ValueError as err:
        raise PlanError(f"model.lora: {err}") from None
    with _quiet(), torch.device("meta"):
        model.requires_grad_(False)
        model.add_adapter(config, adapter_name="default")
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return LoraCount(params, len(lora_layers(model)))


@dataclasses.dataclass(frozen=True)
class BlockCount:
    """How FSDP2 (rl/plumbing/fsdp.py) cuts the FLUX transformer: its largest block, and the root's own
    parameters (embedders, final norm and projection: outside every block)."""

    largest_block: int
    root_own: int
    blocks: int


@functools.cache
def count_flux_blocks(transformer: Component) -> BlockCount:
    from rl.plumbing.fsdp import BLOCK_LISTS

    model = build_on_meta(transformer)
    blocks = [b for name in BLOCK_LISTS for b in getattr(model, name, ())]
    sizes = [sum(p.numel() for p in b.parameters()) for b in blocks]
    total = sum(p.numel() for p in model.parameters())
    return BlockCount(max(sizes, default=0), total - sum(sizes), len(blocks))
