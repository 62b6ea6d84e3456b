"""torch.distributed for the trainers: one process, or many under `torchrun` (gloo on CPU, NCCL on GPU).

Every rank builds the same conditions and noise for a step (they are functions of the seed and
step) and works on its contiguous share of the step's images; judge scores are gathered so group
statistics see whole groups; the trained policy runs through DistributedDataParallel so gradients
are averaged. With equal shares this gives the update of one process on the combined batch.
"""
from __future__ import annotations

import dataclasses
import os

import torch
import torch.distributed as dist
from torch import Tensor


@dataclasses.dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, n: int) -> slice:
        """This rank's contiguous slice of n items (n must divide evenly)."""
        if n % self.world_size:
            raise ValueError(
                f"{n} images per step cannot be split evenly over {self.world_size} processes: make "
                "nft.groups_per_step * nft.group_size (or refl.batch_size) a multiple of the process count")
        k = n // self.world_size
        return slice(self.rank * k, (self.rank + 1) * k)

    def all_gather_cat(self, x: Tensor) -> Tensor:
        """Concatenate equally shaped tensors from all ranks along dim 0, in rank order."""
        if not self.enabled:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, 0)

    def all_reduce_sum(self, x: Tensor) -> Tensor:
        if self.enabled:
            x = x.clone()
            dist.all_reduce(x, op=dist.ReduceOp.SUM)
        return x

    def all_gather_objects(self, obj) -> list:
        """Every process's picklable `obj`, in rank order (a one-item list on one process)."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj):
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"model.device is {name!r} but no CUDA device is available: use 'cpu' or 'auto'")
    return device


def init_distributed(device_name: str = "auto") -> DistContext:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); otherwise one process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device_name)
    if world_size <= 1:
        return DistContext(0, 1, device)
    rank = int(os.environ["RANK"])
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistContext(rank, world_size, device)


def shutdown(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
