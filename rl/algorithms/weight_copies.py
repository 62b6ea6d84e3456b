"""Extra copies of the trainable weights and their update schedules.

- old (sampling) policy, DiffusionNFT: after every step `old = d old + (1 - d) current` with
  d = min(rate * step, max): rollouts start on-policy and the sampler smooths as training goes on.
- evaluation EMA: `ema = d ema + (1 - d) current`, d = min((1 + s) / (10 + s), max), every step;
  used only for evaluation, sample grids and the exported model.
- reference: the initial weights (frozen; KL anchor, OneReward's static reference), or for
  OneReward's dynamic variant an EMA of the policy with its own decay.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor


@torch.no_grad()
def lerp_(dst: dict[str, Tensor], src: Mapping[str, Tensor], decay: float) -> None:
    """dst <- decay * dst + (1 - decay) * src, in place."""
    for name, value in dst.items():
        value.lerp_(src[name].detach().to(value.dtype), 1.0 - decay)


def old_policy_decay(step: int, rate: float, maximum: float) -> float:
    return min(rate * step, maximum)


def always_on_policy(rate: float, maximum: float) -> bool:
    """The decay is 0 at every step: the old policy is the trained one until each optimiser step."""
    return rate == 0 or maximum == 0


def ema_decay(step: int, maximum: float) -> float:
    return min((1.0 + step) / (10.0 + step), maximum)


def clone(weights: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in weights.items()}
