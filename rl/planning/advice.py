"""What to change when a plan does not fit: each change re-planned, so every line carries its total.

The changes the code supports today come first (gradient checkpointing, micro-batch, LoRA and its
rank, a served judge, a smaller ReFL batch, FSDP2 sharding and its host-memory offloads, more GPUs);
then what would help but is not implemented (offloading the text encoders to the CPU).
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

from rl.planning.memory_plan import MemoryPlan, human_bytes, make_plan
from rl.plumbing.config import LoraConfig, RunConfig

Change = Callable[[RunConfig], RunConfig]


def _replace(cfg: RunConfig, section: str, **changes) -> RunConfig:
    return dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **changes)})


def what_ifs(cfg: RunConfig, gpus: int) -> list[tuple[str, Change, int]]:
    """(what to set, the change, GPUs after it) for each supported change that applies to `cfg`."""
    out: list[tuple[str, Change, int]] = []
    m = cfg.model
    if not m.gradient_checkpointing:
        out.append(("--set model.gradient_checkpointing=true",
                    lambda c: _replace(c, "model", gradient_checkpointing=True), gpus))
    if cfg.train.algorithm != "refl" and cfg.optim.micro_batch != 1:
        out.append(("--set optim.micro_batch=1", lambda c: _replace(c, "optim", micro_batch=1), gpus))
    if m.lora is None:
        out.append(("--set model.lora.r=32 (LoRA instead of a full fine-tune)",
                    lambda c: _replace(c, "model", lora=LoraConfig()), gpus))
    elif m.lora.r > 4:
        r = m.lora.r // 2
        out.append((f"--set model.lora.r={r}",
                    lambda c: _replace(c, "model", lora=dataclasses.replace(c.model.lora, r=r)), gpus))
    if cfg.judge.kind == "transformers" and cfg.judge.device != "cpu" and cfg.train.algorithm != "refl":
        out.append(("serve the judge on its own GPU (judge.kind=openai, see configs/flux_fill_nft_vllm.yaml)",
                    lambda c: _replace(c, "judge", kind="openai", base_url="http://127.0.0.1:8000/v1"), gpus))
    half = cfg.refl.batch_size // 2
    if cfg.train.algorithm == "refl" and half >= gpus and half % gpus == 0:  # ReFL back-propagates its whole share
        out.append((f"--set refl.batch_size={half}", lambda c: _replace(c, "refl", batch_size=half), gpus))
    d, sharded_gpus = cfg.dist, max(gpus, 2)
    if d.strategy == "ddp":
        what = (f"--set dist.strategy=fsdp2{'' if gpus > 1 else ' --gpus 2'} (FSDP2: the transformer and the "
                "training state sharded over the GPUs)")
        out.append((what, lambda c: _replace(c, "dist", strategy="fsdp2"), sharded_gpus))
    else:
        if d.copies != "cpu" and not d.cpu_offload:
            out.append(("--set dist.copies=cpu (the old / EMA / reference shards in host memory)",
                        lambda c: _replace(c, "dist", copies="cpu"), sharded_gpus))
        if not d.cpu_offload:
            out.append(("--set dist.cpu_offload=true (weight shards, gradients and AdamW state in host memory)",
                        lambda c: _replace(c, "dist", cpu_offload=True), sharded_gpus))
    # DDP replicates every weight: more GPUs shrink only the per-GPU rollout (and backward, unless micro-batched);
    # under FSDP2 they also shrink every shard
    more = 2 * max(gpus, 1) if d.strategy == "ddp" else 2 * sharded_gpus
    what = ("DDP: fewer images per GPU, the same weights" if d.strategy == "ddp"
            else "FSDP2: fewer images and smaller shards per GPU")
    out.append((f"--gpus {more} ({what})", lambda c: c, more))
    return out


def _outcome(plan: MemoryPlan, other: MemoryPlan) -> str:
    saved = plan.total_bytes - other.total_bytes
    return f"{human_bytes(other.total_bytes)} per GPU ({other.verdict}; saves {human_bytes(saved)})"


def advise(cfg: RunConfig, plan: MemoryPlan) -> list[str]:
    """Lines saying what to change, with the re-planned total of each; empty when the plan fits."""
    if plan.verdict == "fits":
        return []
    lines = []
    changes = what_ifs(cfg, plan.gpus)
    for what, change, gpus in changes:
        lines.append(f"{what}: " + _outcome(plan, make_plan(change(cfg), gpus, plan.gpu_memory_gib)))
    if len(changes) > 1:
        together = functools.reduce(lambda c, item: item[1](c), changes, cfg)
        gpus = changes[-1][2]
        where = f" (on {gpus} GPUs)" if gpus != plan.gpus else ""
        lines.append(f"all of these together{where}: " + _outcome(plan, make_plan(together, gpus, plan.gpu_memory_gib)))
    weights = sum(r.bytes for r in plan.rows if r.label.startswith("text encoder"))
    lines.append(f"offload of the text encoders (not implemented yet): they ({human_bytes(weights)}) only encode "
                 "prompts and could live on the CPU")
    return lines
