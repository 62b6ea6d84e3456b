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
    """dst <- decay * dst + (1 - decay) * src, in place. Under FSDP2 both are sharded alike (DTensors, or
    a copy's shards in host memory): the update is elementwise on the local shards, no communication."""
    for name, value in dst.items():
        mine = _local(value)
        mine.lerp_(_local(src[name].detach()).to(mine.device, value.dtype), 1.0 - decay)


def old_policy_decay(step: int, rate: float, maximum: float) -> float:
    return min(rate * step, maximum)


def always_on_policy(rate: float, maximum: float) -> bool:
    """The decay is 0 at every step: the old policy is the trained one until each optimiser step."""
    return rate == 0 or maximum == 0


def ema_decay(step: int, maximum: float) -> float:
    return min((1.0 + step) / (10.0 + step), maximum)


def clone(weights: Mapping[str, Tensor], where: str = "device") -> dict[str, Tensor]:
    """A copy of `weights`: beside them (where="device"), or in host memory (where="cpu": pinned when the
    weights are on a GPU). A sharded weight's copy is a DTensor of the same sharding either way (under
    "cpu" its local shard lives in host memory), so checkpoints can save and reshard it."""
    return {k: _copy(v.detach(), where) for k, v in weights.items()}


def _copy(t: Tensor, where: str) -> Tensor:
    if where == "device" or (t.device.type == "cpu" and not _is_sharded(t)):
        return t.clone()
    from torch.distributed.tensor import DTensor

    local = _local(t)
    host = torch.empty(local.shape, dtype=local.dtype, pin_memory=torch.cuda.is_available()).copy_(local)
    if not isinstance(t, DTensor):
        return host
    return DTensor.from_local(host, t.device_mesh, t.placements, run_check=False, shape=t.shape, stride=t.stride())


def _is_sharded(t: Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _local(t: Tensor) -> Tensor:
    return t.to_local() if _is_sharded(t) else t


def local_bytes(weights: Mapping[str, Tensor]) -> int:
    """Bytes this process holds of `weights` (a sharded tensor's local shard)."""
    return sum(_local(t).numel() * t.element_size() for t in weights.values())
