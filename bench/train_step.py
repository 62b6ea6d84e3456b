"""Training-step timing: one DiffusionNFT step of the built-in toy FLUX.1 Fill, split into rollout / judge / update.

The default CPU job's budget is set by this split (README: the time printed at the end of a run);
on a GPU it shows how far the toy model is from being launch-bound.
"""
from __future__ import annotations

import statistics
import time

import torch

COLUMNS = [("groups x size", "batch", "{}"), ("sampler steps", "steps", "{}"), ("rollout s", "rollout_s", "{:.3f}"),
           ("judge s", "judge_s", "{:.3f}"), ("update s", "update_s", "{:.3f}"), ("step s", "step_s", "{:.3f}"),
           ("images/s", "images_per_s", "{:.1f}")]


def run(device: torch.device, quick: bool, log) -> list[dict]:
    from rl.algorithms.nft import NFTTrainer
    from rl.plumbing.builders import (
        build_data,
        build_judge,
        build_policy,
        rollout_sigmas,
    )
    from rl.plumbing.config import load_config
    from rl.plumbing.distributed import DistContext

    shapes = [(2, 8)] if quick else [(2, 8), (6, 8), (12, 8)]
    repeats = 2 if quick else 4
    rows = []
    for groups, size in shapes:
        cfg = load_config(None, [f"nft.groups_per_step={groups}", f"nft.group_size={size}",
                                 f"model.device={device.type}"])
        ctx = DistContext(device=device)
        policy = build_policy(cfg.model, device)
        trainer = NFTTrainer(cfg, policy, build_judge(cfg.judge, device), build_data(cfg.data), ctx,
                             rollout_sigmas(policy, cfg.sampler.steps, cfg.sampler.shift))
        trainer.train_step(0)  # warm-up (first calls compile kernels, fill caches)
        times: dict[str, list[float]] = {"rollout": [], "judge": [], "update": [], "step": []}
        for step in range(1, repeats + 1):
            if device.type == "cuda":
                torch.cuda.synchronize()
            tic = time.perf_counter()
            m = trainer.train_step(step)
            if device.type == "cuda":
                torch.cuda.synchronize()
            for k in ("rollout", "judge", "update"):
                times[k].append(m[f"time_{k}"])
            times["step"].append(time.perf_counter() - tic)
        med = {k: statistics.median(v) for k, v in times.items()}
        row = {"batch": f"{groups} x {size}", "steps": cfg.sampler.steps, "rollout_s": med["rollout"],
               "judge_s": med["judge"], "update_s": med["update"], "step_s": med["step"],
               "images_per_s": groups * size / med["step"]}
        log(f"  {row['batch']}: step {row['step_s']:.2f} s (rollout {row['rollout_s']:.2f}, "
            f"judge {row['judge_s']:.2f}, update {row['update_s']:.2f})")
        rows.append(row)
    return rows
