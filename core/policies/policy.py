"""The one interface every editor implements: the built-in toy FLUX.1 Fill and FLUX.1 Fill [dev] (both
FluxFillPolicy), FLUX.1 Kontext [dev] (FluxKontextPolicy: instruction editing, no mask).

Conventions shared by the whole library:
- images are float tensors [B, 3, H, W] in [0, 1]; masks are [B, 1, H, W] with 1 = generate;
- the model works on packed latents [B, L, C] (FLUX layout: 2x2 patches of the codec's latents);
- time t runs from 1 (noise) to 0 (data): x_t = (1 - t) x0 + t eps, v = eps - x0.

Trainers keep extra copies of the trainable weights (old/sampling policy, EMA, reference) as plain
tensor dicts and pass them to `velocity(..., weights=...)`, which evaluates the model with those
values: one set of modules, any number of weight sets, and the
same code for a full fine-tune and for LoRA (where the dicts hold only adapter tensors).
(`swapped_weights` does the swap; unlike functional_call it can wrap code that calls the model. A
model sharded by FSDP2 takes copies sharded like its weights, swapped by value into its shards.)
"""
from __future__ import annotations

import abc
import contextlib
import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn


@dataclasses.dataclass
class Condition:
    """Everything the velocity model needs for one batch of edits, already encoded.

    Fields named in BATCHED carry the batch on dim 0 and follow indexing; the others are shared.
    """

    prompt_embeds: Tensor            # [B, Lt, D] text sequence for joint attention
    pooled: Tensor | None            # [B, Dp] pooled text embedding (None: the model has none, Qwen-Image)
    cond_latents: Tensor             # [B, L, Cc] FLUX Fill: masked-image | folded mask; Kontext: source tokens
    x0_known: Tensor                 # [B, L, C] packed latents of the source (kept region)
    blend_mask: Tensor               # [B, L, C] or [B, L, 1], 1 = generate (for the blend step; all ones: no mask)
    img_ids: Tensor                  # [L, 3] FLUX position ids of image tokens (Kontext: [2L, 3], + source)
    text_ids: Tensor                 # [Lt, 3] position ids of text tokens
    latent_hw: tuple[int, int]       # unpacked latent height and width
    image_hw: tuple[int, int]        # pixel height and width
    guidance: Tensor | None = None   # [B] distilled-guidance value (FLUX dev) or None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # tensors here are batched (dim 0) too

    BATCHED = ("prompt_embeds", "pooled", "cond_latents", "x0_known", "blend_mask", "guidance")

    @property
    def batch_size(self) -> int:
        return self.cond_latents.shape[0]

    def _map(self, fn) -> "Condition":
        updates = {k: fn(getattr(self, k)) for k in self.BATCHED if getattr(self, k) is not None}
        if any(isinstance(v, Tensor) for v in self.extra.values()):
            updates["extra"] = {k: fn(v) if isinstance(v, Tensor) else v for k, v in self.extra.items()}
        return dataclasses.replace(self, **updates)

    def index(self, idx: Tensor | slice | list[int]) -> "Condition":
        return self._map(lambda x: x[idx])

    def repeat_interleave(self, n: int) -> "Condition":
        """Each condition n times in a row: the layout of a rollout group."""
        return self._map(lambda x: x.repeat_interleave(n, dim=0))

    def to(self, device: torch.device | str) -> "Condition":
        moved = self._map(lambda x: x.to(device))
        return dataclasses.replace(moved, img_ids=self.img_ids.to(device), text_ids=self.text_ids.to(device))

    @staticmethod
    def cat(conds: list["Condition"]) -> "Condition":
        first = conds[0]
        updates = {}
        for k in Condition.BATCHED:
            vals = [getattr(c, k) for c in conds]
            updates[k] = None if vals[0] is None else torch.cat(vals, 0)
        if any(isinstance(v, Tensor) for v in first.extra.values()):
            updates["extra"] = {k: torch.cat([c.extra[k] for c in conds], 0) if isinstance(v, Tensor) else v
                                for k, v in first.extra.items()}
        return dataclasses.replace(first, **updates)


class Policy(abc.ABC):
    """A mask-guided flow-matching editor seen by samplers, judges and trainers."""

    #: the module whose parameters `weights=` dicts refer to
    model: nn.Module

    @abc.abstractmethod
    def encode(self, images: Tensor, masks: Tensor, prompts: list[str]) -> Condition:
        """Source images [B,3,H,W] in [0,1], masks [B,1,H,W] (1 = generate), prompts -> Condition."""

    @abc.abstractmethod
    def _velocity(self, x_t: Tensor, t: Tensor, cond: Condition) -> Tensor:
        """The model's velocity for packed x_t [B, L, C] at times t [B] (run the network through
        `self.call_model(...)`, not `self.model(...)`, so trainers can wrap it)."""

    @abc.abstractmethod
    def decode(self, x0: Tensor, cond: Condition) -> Tensor:
        """Packed clean latents -> images [B, 3, H, W] in [0, 1] (differentiable)."""

    @property
    @abc.abstractmethod
    def latent_channels(self) -> int:
        """C of the packed latents [B, L, C]."""

    def velocity(
        self, x_t: Tensor, t: Tensor | float, cond: Condition, *, weights: Mapping[str, Tensor] | None = None
    ) -> Tensor:
        """Velocity at (x_t, t); with `weights`, the named parameters of `model` take those values."""
        if not isinstance(t, Tensor) or t.dim() == 0:
            t = torch.full((x_t.shape[0],), float(t), device=x_t.device, dtype=torch.float32)
        if weights is None:
            return self._velocity(x_t, t, cond)
        with swapped_weights(self.model, weights):
            return self._velocity(x_t, t, cond)

    def call_model(self, *args, **kwargs):
        """Run `self.model`; implementations call this in `_velocity` so that a trainer can route
        the trained forward through a wrapper such as DistributedDataParallel (`route_model`)."""
        runner = getattr(self, "_model_runner", None)
        return (runner if runner is not None else self.model)(*args, **kwargs)

    @contextlib.contextmanager
    def route_model(self, runner):
        """Within the block, `call_model` goes through `runner` (e.g. a DDP wrapper of `model`)."""
        previous = getattr(self, "_model_runner", None)
        self._model_runner = runner
        try:
            yield self
        finally:
            self._model_runner = previous

    def schedule(self, steps: int) -> Tensor:
        """The model's default sampling times (steps + 1 values, 1 -> 0); plain linear here, models
        override it (FLUX's resolution-dependent dynamic shift)."""
        from core.sampling.schedules import flux_sigmas

        return flux_sigmas(steps)

    def initial_noise(self, cond: Condition, generator: torch.Generator | None = None) -> Tensor:
        shape = cond.x0_known.shape
        return torch.randn(shape, generator=generator, device=cond.x0_known.device, dtype=cond.x0_known.dtype)

    # -- LoRA (peft adapters on `model`): shared by every policy --------------------------------
    #: adapter name used by add_lora
    LORA_ADAPTER = "default"

    @property
    def has_lora(self) -> bool:
        return bool(getattr(self.model, "peft_config", None))

    def add_lora(self, *, r: int, alpha: float, targets=None, init: str | bool = "gaussian") -> None:
        """Put a LoRA adapter (peft) on `model`'s `targets` (default: FLUX's attention projections,
        Edit-R1's choice); from then on only its tensors are trainable, kept in float32 even when the
        model runs in reduced precision (small updates vanish in bf16)."""
        from core.policies.lora import FLUX_ATTENTION_TARGETS, lora_config

        if self.has_lora:
            raise ValueError(f"this {type(self).__name__} already has a LoRA adapter; add_lora once per policy")
        config = lora_config(self.model, r=r, alpha=alpha, targets=targets or FLUX_ATTENTION_TARGETS, init=init)
        self.model.requires_grad_(False)
        self.model.add_adapter(config, adapter_name=self.LORA_ADAPTER)
        self._lora_to_float32()

    def _lora_to_float32(self) -> None:
        for p in self.trainable_parameters().values():
            if p.dtype in (torch.float16, torch.bfloat16):
                p.data = p.data.float()

    @contextlib.contextmanager
    def base(self):
        """Within the block the LoRA adapter is off: the frozen base model (the reference policy)
        without a second copy. A full fine-tune passes `weights=<initial snapshot>` instead."""
        if not self.has_lora:
            raise ValueError("base() needs a LoRA adapter; for a full fine-tune pass weights=<initial snapshot>")
        self.model.disable_adapters()
        try:
            yield self
        finally:
            self.model.enable_adapters()

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """Named parameters that RL updates (all of them for a full fine-tune, adapters for LoRA)."""
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def snapshot(self) -> dict[str, Tensor]:
        """A detached copy of the trainable weights (for old-policy, EMA and reference copies)."""
        return {n: p.detach().clone() for n, p in self.trainable_parameters().items()}


def check_edit_batch(images: Tensor, masks: Tensor, prompts: list[str]) -> None:
    """One [B, 1, H, W] mask and one prompt per image, else a ValueError saying what to pass."""
    if masks.dim() != 4 or masks.shape[1] != 1:
        raise ValueError(f"masks must be [B, 1, H, W] (1 = generate), got {tuple(masks.shape)}")
    if isinstance(prompts, str) or len(prompts) != images.shape[0] or masks.shape[0] != images.shape[0]:
        n = 1 if isinstance(prompts, str) else len(prompts)
        raise ValueError(f"batch sizes differ: {images.shape[0]} images, {masks.shape[0]} masks, {n} prompts; "
                         "give one mask and one prompt (a list of str) per image")


@contextlib.contextmanager
def swapped_weights(model: nn.Module, weights: Mapping[str, Tensor]):
    """Within the block, the named parameters of `model` take the given values.

    Like `torch.func.functional_call`, but usable around any code that calls the model; the
    originals are back on exit, also after an exception. A value on its parameter's device replaces
    the Parameter object (no copy). Two cases are swapped by value instead: a parameter sharded by
    FSDP2 (a DTensor: FSDP gathers a forward's weights from its own shard storage, so a replaced
    object would be ignored; the value is a DTensor of the same sharding or its local shard) and a
    value kept on another device (a copy in host memory): the value's shard is copied into the
    parameter's storage, the parameter's own values are stashed and copied back on exit. Use the
    by-value case without gradients (as every forward with a weight copy is) and never across a
    pending backward of the trained weights.
    """
    saved, by_value = [], []
    try:
        for name, value in weights.items():
            mod_name, _, attr = name.rpartition(".")
            mod = model.get_submodule(mod_name) if mod_name else model
            if attr not in mod._parameters:
                raise KeyError(f"{name!r} is not a parameter of {type(model).__name__}")
            param = mod._parameters[attr]
            if _is_sharded(param) or value.device != param.device:
                by_value.append((name, param, value))
            else:
                saved.append((mod, attr, param))
                mod._parameters[attr] = value
        with _by_value(model, by_value):
            yield model
    finally:
        for mod, attr, param in reversed(saved):
            mod._parameters[attr] = param


def _is_sharded(t: Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _local(t: Tensor) -> Tensor:
    """A DTensor's local shard (the same storage), or the tensor itself."""
    return t.to_local() if _is_sharded(t) else t


@contextlib.contextmanager
def _by_value(model: nn.Module, items: list[tuple[str, Tensor, Tensor]]):
    """Copy each (name, parameter, value)'s value into the parameter's (local) storage for the block."""
    if not items:
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    # a sharded module must gather again: weights it still holds gathered would be the old values
    fsdp = [m for m in model.modules() if isinstance(m, FSDPModule)]
    stash = []
    try:
        with torch.no_grad():
            for m in fsdp:
                m.reshard()
            for name, param, value in items:
                dst, src = _local(param.detach()), _local(value.detach())
                if dst.shape != src.shape:
                    raise ValueError(f"{name!r}: value of shape {tuple(src.shape)} for a parameter whose "
                                     f"{'local shard' if _is_sharded(param) else 'shape'} is {tuple(dst.shape)} "
                                     "(a sharded model takes copies sharded like its weights)")
                stash.append((dst, dst.clone()))
                dst.copy_(src)
        yield
    finally:
        with torch.no_grad():
            for m in fsdp:
                m.reshard()
            for dst, own in reversed(stash):
                dst.copy_(own)
