"""LoRA adapters (peft) on a diffusers transformer: configuration checks and a merged export.

Trainers treat LoRA like a full fine-tune with fewer trainable tensors: the adapter's A/B matrices
are the model's only parameters with requires_grad, so `Policy.trainable_parameters()`, weight
snapshots and `swapped_weights` see exactly the adapter. peft starts B at zero for the "default"
and "gaussian" inits, so the initial snapshot IS the frozen base model (the reference policy).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from torch import Tensor, nn

#: Edit-R1 / DiffusionNFT's targets on FLUX: attention projections of the image and text streams
FLUX_ATTENTION_TARGETS: tuple[str, ...] = (
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")

#: init_lora_weights values we accept: B = 0 at the start (the adapter is a no-op) except for False
LORA_INITS = {"default": True, True: True, "gaussian": "gaussian", False: False}


def lora_config(model: nn.Module, *, r: int, alpha: float, targets: Sequence[str] = FLUX_ATTENTION_TARGETS,
                init: str | bool = "gaussian") -> LoraConfig:
    """A checked LoraConfig for `model`.

    `init`: "gaussian" (A ~ N(0, 1/r), B = 0; DiffusionNFT's choice), "default"/True (peft's
    Kaiming A, B = 0), or False (A and B random: the adapter changes the model from the start;
    for tests, and it breaks "initial weights = frozen base").
    """
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"LoRA rank r must be an int >= 1, got {r!r}")
    if not alpha > 0:
        raise ValueError(f"LoRA alpha must be > 0, got {alpha!r} (the update is scaled by alpha / r)")
    if init not in LORA_INITS:
        raise ValueError(f"unknown LoRA init {init!r}; expected one of 'gaussian', 'default', True, False")
    targets = list(targets)
    if not targets:
        raise ValueError("LoRA targets are empty; FLUX attention has " + ", ".join(FLUX_ATTENTION_TARGETS))
    names = [n for n, _ in model.named_modules()]
    unknown = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if unknown:
        raise ValueError(f"LoRA targets {unknown} name no module of {type(model).__name__}; FLUX attention "
                         f"has {', '.join(FLUX_ATTENTION_TARGETS)}")
    return LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=LORA_INITS[init])


def lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


@torch.no_grad()
def merged_state_dict(model: nn.Module, adapter: str = "default", device: str | torch.device = "cpu"
                      ) -> dict[str, Tensor]:
    """The state dict of `model` with the adapter folded in (W + scale B A), under the base
    model's key names, on `device`. Built tensor by tensor, so peak memory is the output plus
    one layer (no deep copy of the model). Reads the parameters in place, so it honours
    `swapped_weights`."""
    layers = lora_layers(model)
    out: dict[str, Tensor] = {}
    for key, value in model.state_dict().items():
        if ".lora_" in key:
            continue
        out[key.replace(".base_layer", "")] = value.detach().to(device)
    for name, layer in layers.items():
        if adapter not in layer.lora_A:
            raise ValueError(f"adapter {adapter!r} not found on {name}; adapters: {list(layer.lora_A)}")
        base = layer.get_base_layer().weight
        delta = layer.get_delta_weight(adapter)
        out[f"{name}.weight"] = (base.float() + delta.float()).to(base.dtype).to(device)
    return out
