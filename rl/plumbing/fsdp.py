"""FSDP2 for the trainers (`dist.strategy: fsdp2`): sharding, sharded checkpoints, export, memory report.

- `shard_model`: `fully_shard` on every FLUX transformer block (`transformer_blocks`, then
  `single_transformer_blocks`), then on the root, with `MixedPrecisionPolicy(dist.param_dtype,
  dist.reduce_dtype)` and, with `dist.cpu_offload`, `CPUOffloadPolicy`. Parameters become DTensors
  sharded on dim 0; a block's weights are gathered for its forward and again for its backward, and
  gradients are reduce-scattered as averages, so (as with DDP) N processes on their shares of a step
  make the update of one process on the whole step. The root reshards after every forward, so a
  forward with a weight copy (core.policies.policy.swapped_weights, which swaps sharded weights by value)
  always gathers what is in the shards now.
- The old / EMA / reference copies are DTensor clones of the weights' shards (rl/algorithms/weight_copies.py:
  `dist.copies` device or cpu); their update is elementwise on local shards, with no communication.
- Checkpoints (`save_sharded` / `load_sharded`): torch.distributed.checkpoint with `get_state_dict` /
  `set_state_dict` (trainable weights, AdamW state) and the copies. Every process writes its own shards
  as safetensors through DCP's `HuggingFaceStorageWriter`, whose metadata sits as JSON in the safetensors
  headers (DCP's default format pickles its `.metadata`: loading would run code, which no checkpoint of
  this project may do); rank 0 writes the rest (step, RNG, AdamW's param groups) with `save_tree`.
  Loading reshards, so a run can resume on another number of processes. `read_full` assembles whole
  tensors without a process group (rl.edit, rl.eval, rl.compare read a sharded run's EMA through it).
- `export_sharded`: the EMA swapped in, its full state gathered to rank 0's CPU (`full_state_dict`),
  written as the same diffusers directory (or LoRA file) as a DDP run's.

All of it needs a file system every process sees (the usual shared run directory of a cluster).
"""
from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

#: the FLUX transformer's block lists, sharded one block at a time, in this order, before the root
BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks")
#: the checkpoint's tensor trees written as shards
SHARDED_TREES = ("weights", "optimizer", "old", "ema", "ref")
SHARDS_DIR = "shards"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def local(t: Tensor) -> Tensor:
    """A DTensor's local shard (the same storage), or the tensor itself."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def shard_model(model: nn.Module, dist_cfg, device: torch.device) -> int:
    """fully_shard the FLUX transformer `model` in place (see the module docstring); returns the blocks sharded."""
    from torch.distributed.fsdp import (
        CPUOffloadPolicy,
        MixedPrecisionPolicy,
        fully_shard,
    )

    blocks = [b for name in BLOCK_LISTS for b in getattr(model, name, ())]
    if not blocks:
        raise ValueError(f"dist.strategy=fsdp2 shards a FLUX transformer's blocks ({', '.join(BLOCK_LISTS)}); "
                         f"{type(model).__name__} has none: use dist.strategy=ddp")
    kwargs: dict[str, Any] = {"mp_policy": MixedPrecisionPolicy(param_dtype=_DTYPES.get(dist_cfg.param_dtype),
                                                                reduce_dtype=_DTYPES.get(dist_cfg.reduce_dtype))}
    if dist_cfg.cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=device.type == "cuda")
    # FLUX's single blocks return slices of one tensor; FSDP2 warns that an in-place op on such a view
    # would skip its pre-backward hook. Nothing here writes to them in place (tests/rl/test_fsdp2.py
    # checks the gradients against one process), so the warning would only be noise.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    # every process shards its own copy: start from rank 0's trainable weights, as DDP does (a LoRA adapter's
    # random initialisation differs between processes whose random states differ)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                dist.broadcast(param.data, src=0)
    for block in blocks:
        fully_shard(block, **kwargs)
    fully_shard(model, reshard_after_forward=True, **kwargs)
    return len(blocks)


def memory_line(trainer) -> str:
    """This process's share of the training state, for the start-up log."""
    from core.config.loading import to_dict
    from rl.algorithms.weight_copies import local_bytes
    from rl.planning.memory_plan import human_bytes

    d = trainer.cfg.dist
    weights = local_bytes(trainer.params)
    copies = sum(local_bytes(getattr(trainer, k)) for k in ("old", "ema", "ref"))
    where = "in host memory" if (d.copies == "cpu" or d.cpu_offload) else "beside the weights"
    n = trainer.ctx.world_size
    how = f"sharded over {n} processes" if trainer.sharded else "one process: nothing to shard"
    settings = {k: v for k, v in to_dict(d).items() if k != "strategy"}
    return (f"[rl.train] dist.strategy=fsdp2, {how} ({settings}); rank {trainer.ctx.rank} holds: trainable "
            f"weights {human_bytes(weights)}, gradients up to {human_bytes(weights)}, AdamW state "
            f"{human_bytes(2 * weights)} (after the first step), copies old + EMA + reference "
            f"{human_bytes(copies)} {where}")


# -- checkpoints ------------------------------------------------------------------------------------
def _options(full: bool = False, trainable_only: bool = True):
    """Sharded (checkpoints) or whole on rank 0's CPU (export); the trainable weights only, by default: a
    checkpoint's frozen weights (a LoRA run's base model) come from model.path again, as in a DDP checkpoint."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=full, cpu_offload=full, ignore_frozen_params=trainable_only)


def _trees(trainer) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The trainer's tensors as the checkpoint's trees (DTensors when sharded) and AdamW's param groups."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    weights, optim = get_state_dict(trainer.policy.model, trainer.optimizer, options=_options())
    trees = {"weights": weights, "optimizer": optim["state"],
             "old": trainer.old, "ema": trainer.ema, "ref": trainer.ref}
    return trees, optim["param_groups"]


def sharded_state(trainer) -> tuple[dict[str, Any], dict[str, Any]]:
    """(what every process writes as shards, what rank 0 writes with save_tree)."""
    trees, groups = _trees(trainer)
    return trees, {"optimizer_param_groups": groups,
                   "sharded": {"format": "dcp-safetensors", "world_size": trainer.ctx.world_size}}


def nonfinite_shards(trees: dict[str, Any]) -> list[str]:
    """Names "copy/param" of this process's weight shards holding a NaN or an infinity."""
    bad = []
    for copy in ("weights", "old", "ema", "ref"):
        for name, t in trees[copy].items():
            part = local(t)
            if part.is_floating_point() and not bool(torch.isfinite(part).all()):
                bad.append(f"{copy}/{name}")
    return bad


def write_shards(trees: dict[str, Any], directory: Path) -> None:
    """Every process writes its shards of `trees` into `directory` (a collective call)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    with _single_process_is_meant():
        dcp.save(trees, storage_writer=HuggingFaceStorageWriter(str(directory), save_distributed=True),
                 no_dist=_alone())


def load_sharded(trainer, checkpoint_dir: Path, tree: dict[str, Any]) -> None:
    """Restore the trainer from a sharded checkpoint (every process; reshards to this world size)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint.state_dict import set_state_dict

    shards = Path(checkpoint_dir) / SHARDS_DIR
    trees, _ = _trees(trainer)  # get_state_dict gives AdamW state to load into, created if the optimiser has none
    with _single_process_is_meant():
        dcp.load(trees, storage_reader=HuggingFaceStorageReader(str(shards)), no_dist=_alone())
    set_state_dict(trainer.policy.model, trainer.optimizer, model_state_dict=trees["weights"],
                   optim_state_dict={"state": trees["optimizer"], "param_groups": tree["optimizer_param_groups"]},
                   options=_options())


def _alone() -> bool:
    """No process group (dist.strategy=fsdp2 on one process): DCP reads and writes without collectives."""
    return not (dist.is_available() and dist.is_initialized())


@contextlib.contextmanager
def _single_process_is_meant():
    """DCP warns whenever it reads or writes without collectives, which is what no_dist asks for."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.distributed is disabled, unavailable or uninitialized")
        yield


def read_full(checkpoint_dir: Path, trees=("weights", "old", "ema", "ref")) -> dict[str, dict[str, Tensor]]:
    """Whole CPU tensors of `trees` from a sharded checkpoint, in this process alone (no collectives)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    shards = str(Path(checkpoint_dir) / SHARDS_DIR)
    out: dict[str, dict[str, Tensor]] = {t: {} for t in trees}
    for key, meta in HuggingFaceStorageReader(shards).read_metadata().state_dict_metadata.items():
        tree, _, name = key.partition(".")
        if tree in out:
            out[tree][name] = torch.empty(meta.size, dtype=meta.properties.dtype)
    with _single_process_is_meant():
        dcp.load(out, storage_reader=HuggingFaceStorageReader(shards), no_dist=True)
    return out


# -- export -----------------------------------------------------------------------------------------
def export_sharded(trainer, out_dir) -> None:
    """Every process: gather the EMA's full weights to rank 0's CPU; rank 0 writes what Trainer.export writes."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    from core.policies.policy import swapped_weights

    policy, ctx = trainer.policy, trainer.ctx
    lora = bool(getattr(policy, "has_lora", False))
    with torch.no_grad(), swapped_weights(policy.model, trainer.ema):
        # LoRA: the adapter alone (the trainable tensors); a full fine-tune: every weight
        full = get_model_state_dict(policy.model, options=_options(full=True, trainable_only=lora))
    error = None
    if ctx.is_main:
        try:
            if lora:
                policy.save_lora_weights(out_dir, state_dict=full)
            elif trainer.cfg.model.kind == "flux_fill":
                policy.save_pretrained(out_dir, transformer_only=True, transformer_state=full)
            else:
                policy.save_pretrained(out_dir, transformer_state=full)
        except Exception as err:  # noqa: BLE001 (every process must learn of it, or the others wait forever)
            error = err
    failed = ctx.broadcast_object(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    if failed is not None:
        raise RuntimeError(f"rank 0 could not export to {out_dir}: {failed}")
