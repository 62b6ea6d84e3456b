"""`python -m rl.pretrain`: pretrain the built-in tiny Fill model on the synthetic world.

Flow matching on a uniform mixture of the world's four tasks: x0 = codec(target), the condition
from (source, mask, prompt), x_t = (1 - t) x0 + t eps, loss = weighted MSE(v_pred, eps - x0).

- t: logit-normal(0, 1) with a 10% uniform share. The logit-normal puts most samples in the middle
  of the path, where the velocity is hardest to predict (the SD3 finding); the uniform share keeps
  the ends trained, which few-step samplers visit on every call (their first step is at t = 1).
  Training does not bake in a shift, so the sampler's shift is chosen afterwards by evaluation.
- Weighting: elements inside the mask count 1, the known region `known_weight` (0.1): the sampler
  overwrites the known region with the re-noised source at every step, so errors there never reach
  an image. Each sample is normalised by its own weight sum, so small masks (text) are not drowned.
- The text encoder trains jointly; the saved model is the EMA of both networks.

The output directory (--out, required: `--out core/assets/tiny_fill` rebuilds the shipped model)
is written atomically: model, quality.json (held-out ground-truth metrics) and samples.png go to a
temporary directory that then replaces the old one. Settings are config keys (PretrainConfig):
`--config FILE.yaml` and `--set KEY=VALUE`, listed with their defaults by `--help`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor
from tqdm import tqdm

from core import packing
from core.config_cli import config_parser, parse_config
from core.config_io import ConfigError
from core.config_schema import POSITIVE, UNIT, Range, at_least, check_ranges, opt
from core.image_io import image_grid, save_image
from core.metrics import ground_truth_metrics, summarize
from core.samplers import METHODS, sample_policy
from core.schedules import flux_sigmas
from core.tasks import TASKS, TaskMixture
from core.tensor_store import has_tree, load_tree, save_tree
from core.tiny_fill import DEFAULT_TRANSFORMER, TinyFillPolicy, rope_axes
from core.world import SyntheticWorld, collate
from rl.algorithms.lr_schedule import lr_factor

UNIFORM_T_SHARE = 0.1
QUALITY_FILE = "quality.json"
GRID_FILE = "samples.png"


@dataclasses.dataclass
class PretrainConfig:
    """Every setting of `python -m rl.pretrain` (--config FILE.yaml, --set KEY=VALUE)."""

    steps: int = opt(4000, "optimiser steps")
    batch: int = opt(32, "edits per step")
    lr: float = opt(1e-3, "peak learning rate (AdamW)")
    warmup: int = opt(200, "linear warmup steps before the cosine decay")
    weight_decay: float = opt(0.01, "AdamW weight decay of the matrices (norms and biases get none)")
    ema_decay: float = opt(0.999, "max EMA decay of the saved weights")
    known_weight: float = opt(0.1, "loss weight of the known (unmasked) region")
    seed: int = opt(0, "seed of initialisation, data order and noise")
    world_seed: int = opt(0, "seed of the synthetic world")
    double_blocks: int = opt(DEFAULT_TRANSFORMER["num_layers"], "FLUX double-stream blocks")
    single_blocks: int = opt(DEFAULT_TRANSFORMER["num_single_layers"], "FLUX single-stream blocks")
    heads: int = opt(DEFAULT_TRANSFORMER["num_attention_heads"], "attention heads")
    head_dim: int = opt(DEFAULT_TRANSFORMER["attention_head_dim"],
                        "attention head dim (a multiple of 4, >= 8; split over the three rope axes)")
    eval_per_task: int = opt(64, "held-out conditions per task for quality.json")
    eval_steps: int = opt(8, "sampler steps for the evaluation (saved as the model's default)")
    eval_method: Literal[METHODS] = opt("dpm2", "sampler for the evaluation (RL's default: dpm2)")
    shift: float = opt(1.0, "static time shift of the sampler (saved as the default)")
    threads: int = opt(0, "torch CPU threads (0 = torch's default)")
    checkpoint_every: int = opt(250, "save the training state every N steps (0 = never), for --resume")
    log_every: int = opt(250, "print a line with per-task losses every N steps")

    def __post_init__(self) -> None:
        check_ranges(self, RANGES, "rl/pretrain.py RANGES")
        if self.head_dim % 4:
            raise ConfigError(f"head_dim must be a multiple of 4 (three rope axes), got {self.head_dim}")
        if self.double_blocks + self.single_blocks < 1:
            raise ConfigError("the model needs a block: set double_blocks or single_blocks >= 1")


#: allowed values of every numeric key of PretrainConfig (a test asserts that none is missing)
RANGES: dict[str, Range] = {
    "steps": at_least(1),
    "batch": at_least(1),
    "lr": Range(0, 1, open_lo=True),
    "warmup": at_least(0),
    "weight_decay": UNIT,
    "ema_decay": Range(0, 1, open_hi=True, note="1 would freeze the saved weights"),
    "known_weight": at_least(0, "the generated region weighs 1"),
    "seed": at_least(0),
    "world_seed": at_least(0),
    "double_blocks": at_least(0),
    "single_blocks": at_least(0),
    "heads": at_least(1),
    "head_dim": at_least(8, "a multiple of 4"),
    "eval_per_task": at_least(1),
    "eval_steps": Range(1, 1000),
    "shift": POSITIVE,
    "threads": at_least(0, "0 = torch's default"),
    "checkpoint_every": at_least(0, "0 = never"),
    "log_every": at_least(1),
}


def parser() -> argparse.ArgumentParser:
    """The command line: the config keys plus where to write and how far to go."""
    p = config_parser("python -m rl.pretrain", __doc__.split("\n\n")[0], PretrainConfig, ranges=RANGES,
                      example="steps=2000")
    p.add_argument("--out", type=Path, required=True,
                   help="output model directory (required; to rebuild the shipped model, name it: "
                        "--out core/assets/tiny_fill)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the saved training state of --out if there is one")
    p.add_argument("--stop-after", type=int, default=0, metavar="STEP",
                   help="stop after this step, keeping the state for --resume (0 = run to the end)")
    p.add_argument("--eval-only", action="store_true",
                   help="evaluate the model in --out and rewrite its quality.json and grid")
    return p


def sample_times(n: int, generator: torch.Generator) -> Tensor:
    """Logit-normal(0, 1) times with a uniform share (see the module docstring)."""
    t = torch.sigmoid(torch.randn(n, generator=generator))
    uniform = torch.rand(n, generator=generator)
    pick = torch.rand(n, generator=generator) < UNIFORM_T_SHARE
    return torch.where(pick, uniform, t)


def flow_matching_loss(policy: TinyFillPolicy, batch, generator: torch.Generator, known_weight: float
                       ) -> Tensor:
    """Per-sample weighted velocity MSE [B] for one collated batch of world samples."""
    cond = policy.encode(batch.images, batch.masks, batch.prompts)
    x0 = packing.pack(policy.codec.encode(batch.targets.to(cond.x0_known.device)))
    eps = torch.randn(x0.shape, generator=generator).to(x0.device)
    t = sample_times(x0.shape[0], generator).to(x0.device)
    x_t = (1 - t[:, None, None]) * x0 + t[:, None, None] * eps
    v = policy.velocity(x_t, t, cond)
    w = cond.blend_mask + known_weight * (1 - cond.blend_mask)
    return (w * (v - (eps - x0)) ** 2).sum((1, 2)) / w.sum((1, 2))


@torch.no_grad()
def sample_edits(policy: TinyFillPolicy, batch, *, steps: int, shift: float, method: str = "dpm2",
                 generator: torch.Generator | None = None) -> Tensor:
    """Edited images [B, 3, H, W], sampled with the mask-aware blend of the known region."""
    cond = policy.encode(batch.images, batch.masks, batch.prompts)
    x0 = sample_policy(policy, cond, sigmas=flux_sigmas(steps, shift=shift), method=method, blend=True,
                       generator=generator)
    return policy.decode(x0, cond)


def evaluate(policy: TinyFillPolicy, world: SyntheticWorld, *, per_task: int, steps: int, shift: float,
             method: str = "dpm2", seed: int = 1234, chunk: int = 48) -> tuple[dict, Tensor]:
    """Held-out ground-truth metrics (means per task) and a sample grid (3 per task)."""
    generator = torch.Generator().manual_seed(seed)
    summary, rows = {}, []
    for task in TASKS:
        samples = world.held_out(task, per_task)
        edited = torch.cat([sample_edits(policy, collate(samples[i:i + chunk]), steps=steps, shift=shift,
                                         method=method, generator=generator) for i in range(0, len(samples), chunk)])
        summary[task] = summarize(ground_truth_metrics(samples, edited))[task]
        row = []
        for s, e in zip(samples[:3], edited[:3]):
            shown = s.source * (1 - 0.5 * s.mask)  # the region to edit darkened
            row += [shown, e.cpu(), s.target]
        rows.append(row)
    return summary, image_grid(rows)


def format_table(summary: dict[str, dict[str, float]]) -> str:
    lines = [f"{'task':<9} metrics (held out)"]
    for task, metrics in summary.items():
        lines.append(f"{task:<9} " + "  ".join(f"{k}={v:.3f}" for k, v in metrics.items()))
    return "\n".join(lines)


#: arguments a resumed run must share with the run that saved the state
RESUME_KEYS = ("steps", "batch", "lr", "warmup", "weight_decay", "ema_decay", "known_weight", "seed",
               "world_seed", "double_blocks", "single_blocks", "heads", "head_dim")


def state_path(out: Path) -> Path:
    """Where an unfinished run keeps its training state (next to the output directory)."""
    out = out.resolve()
    return out.parent / f".{out.name}.pretrain-state"


def _save_state(path: Path, state: dict) -> None:
    """Tensors as safetensors and the rest as JSON (core/tensor_store.py: no pickle), replaced whole."""
    write_atomically(path, lambda tmp: (tmp.mkdir(parents=True), save_tree(state, tmp)))


def train(cfg: PretrainConfig, out: Path, *, resume: bool = False, stop_after: int = 0
          ) -> tuple[TinyFillPolicy, dict] | None:
    """Pretrain; returns (EMA policy, info), or None when stopped early by `stop_after`.

    The training state lives next to `out` (`state_path`); `resume` continues from it.
    """
    size = dict(num_layers=cfg.double_blocks, num_single_layers=cfg.single_blocks, num_attention_heads=cfg.heads,
                attention_head_dim=cfg.head_dim, axes_dims_rope=rope_axes(cfg.head_dim))
    policy = TinyFillPolicy.create(seed=cfg.seed, default_steps=cfg.eval_steps, default_shift=cfg.shift,
                                   transformer=size)
    text_model = policy.prompt_encoder.text_model
    text_model.requires_grad_(True).train()
    policy.model.train()
    params = {f"transformer.{n}": p for n, p in policy.model.named_parameters()}
    params.update({f"text_encoder.{n}": p for n, p in text_model.named_parameters()})
    decay = [p for p in params.values() if p.dim() >= 2]
    no_decay = [p for p in params.values() if p.dim() < 2]  # norms and biases
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    # total + 1: the cosine reaches 0 one step after the last (the schedule the shipped model used)
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg.steps + 1, cfg.warmup, "cosine"))
    ema = {n: p.detach().clone() for n, p in params.items()}

    world = SyntheticWorld(seed=cfg.world_seed)
    mixture = TaskMixture({t: 1.0 for t in TASKS})
    rng = random.Random(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    first, smoothed, elapsed = 0, None, 0.0
    saved = state_path(out)
    settings = {k: getattr(cfg, k) for k in RESUME_KEYS}
    if resume and has_tree(saved):
        state = load_tree(saved)
        if state["settings"] != settings:
            diff = {k: (state["settings"].get(k), v) for k, v in settings.items() if state["settings"].get(k) != v}
            raise ValueError(f"{saved} was saved by a run with other settings (saved, now): {diff}; "
                             "rerun with the saved settings or delete the state file to start afresh")
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(state["params"][n])
                ema[n].copy_(state["ema"][n])
        optimizer.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        rng.setstate(state["rng"])
        generator.set_state(state["generator"])
        first, smoothed, elapsed = state["step"], state["smoothed"], state["elapsed"]
        tqdm.write(f"resuming from step {first} ({saved})", file=sys.stdout)
    elif resume:
        tqdm.write(f"no saved state at {saved}: starting from step 0", file=sys.stdout)

    def snapshot(step: int) -> dict:
        return {"step": step, "settings": settings, "smoothed": smoothed, "elapsed": elapsed + time.time() - start,
                "params": {n: p.detach().clone() for n, p in params.items()}, "ema": ema,
                "optimizer": optimizer.state_dict(), "scheduler": sched.state_dict(), "rng": rng.getstate(),
                "generator": generator.get_state()}

    task_loss = {t: [] for t in TASKS}
    start = time.time()
    bar = tqdm(range(first, cfg.steps), initial=first, total=cfg.steps, desc="pretrain", dynamic_ncols=True,
               mininterval=2.0)
    for step in bar:
        batch = collate(world.batch(mixture.sample(rng, cfg.batch), rng))
        per_sample = flow_matching_loss(policy, batch, generator, cfg.known_weight)
        loss = per_sample.mean()
        if not torch.isfinite(loss):
            raise RuntimeError(f"non-finite loss at step {step}: lower lr (--set lr=...)")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
        optimizer.step()
        sched.step()
        with torch.no_grad():
            d = min(cfg.ema_decay, (1 + step) / (10 + step))
            for n, p in params.items():
                ema[n].lerp_(p.detach(), 1 - d)
        for task, value in zip(batch.tasks, per_sample.tolist()):
            task_loss[task].append(value)
        smoothed = loss.item() if smoothed is None else 0.98 * smoothed + 0.02 * loss.item()
        bar.set_postfix(loss=f"{smoothed:.4f}", lr=f"{sched.get_last_lr()[0]:.2e}", refresh=False)
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            per_task = "  ".join(f"{t}={sum(v) / max(len(v), 1):.4f}" for t, v in task_loss.items())
            tqdm.write(f"step {done}/{cfg.steps}  loss {smoothed:.4f}  {per_task}  "
                       f"{elapsed + time.time() - start:.0f}s", file=sys.stdout)
            task_loss = {t: [] for t in TASKS}
        if done == stop_after:
            _save_state(saved, snapshot(done))
            tqdm.write(f"stopped after step {done}; continue with --resume", file=sys.stdout)
            return None
        if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.steps:
            _save_state(saved, snapshot(done))
    with torch.no_grad():  # the saved model is the EMA
        for n, p in params.items():
            p.copy_(ema[n])
    text_model.requires_grad_(False).eval()
    policy.model.eval()
    policy.prompt_encoder.clear_cache()
    info = {"steps": cfg.steps, "batch": cfg.batch, "lr": cfg.lr, "seed": cfg.seed,
            "world_seed": cfg.world_seed, "known_weight": cfg.known_weight, "ema_decay": cfg.ema_decay,
            "transformer": {k: list(v) if isinstance(v, tuple) else v for k, v in size.items()},
            "parameters": sum(p.numel() for p in policy.model.parameters()),
            "final_loss": round(smoothed, 5), "minutes": round((elapsed + time.time() - start) / 60, 1)}
    return policy, info


def write_atomically(out: Path, fill) -> None:
    """Run fill(tmp_dir), then replace `out` with it (the old directory survives a failure)."""
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        fill(tmp)
        if out.exists():
            out.rename(old)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    """`python -m rl.pretrain --out DIR [--config FILE.yaml] [--set KEY=VALUE ...] [...]`."""
    p = parser()
    args, cfg = parse_config(p, PretrainConfig, argv)
    if args.stop_after < 0:
        p.error(f"--stop-after must be >= 0, got {args.stop_after}")
    out: Path = args.out
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    world = SyntheticWorld(seed=cfg.world_seed)
    if args.eval_only:
        policy = TinyFillPolicy.from_pretrained(out)
        previous = json.loads((out / QUALITY_FILE).read_text()) if (out / QUALITY_FILE).is_file() else {}
        info = previous.get("training", {})
        policy.default_steps, policy.default_shift = cfg.eval_steps, cfg.shift
    else:
        trained = train(cfg, out, resume=args.resume, stop_after=args.stop_after)
        if trained is None:
            return
        policy, info = trained
    summary, grid = evaluate(policy, world, per_task=cfg.eval_per_task, steps=cfg.eval_steps, shift=cfg.shift,
                             method=cfg.eval_method)
    quality = {"held_out_per_task": cfg.eval_per_task,
               "sampler": {"method": cfg.eval_method, "steps": cfg.eval_steps, "shift": cfg.shift, "blend": True},
               "metrics": {t: {k: round(v, 4) for k, v in m.items()} for t, m in summary.items()},
               "training": info}

    def fill(tmp: Path) -> None:
        policy.save_pretrained(tmp)
        (tmp / QUALITY_FILE).write_text(json.dumps(quality, indent=2) + "\n")
        save_image(grid, tmp / GRID_FILE)

    write_atomically(out, fill)
    shutil.rmtree(state_path(out), ignore_errors=True)
    print(format_table(summary))
    print(f"saved to {out}")


if __name__ == "__main__":
    main()
