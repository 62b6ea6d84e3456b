"""End-of-run evaluation for `rl.train`: base vs final on the held-out set, plots, summary.json.

The final model is the evaluation EMA (what `final/` exports). Base and final are evaluated on the
same held-out conditions with the same noise, so per-condition differences are paired; intervals
are percentile bootstraps of the paired mean difference.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import Tensor

from core.io.tensor_store import load_tree, save_tree
from rl.evaluation.heldout import EvalResult, evaluate, held_out_samples
from rl.evaluation.plots import plot_reward_curves, plot_time_split
from rl.evaluation.stats import bootstrap_mean
from rl.plumbing.run_log import read_metrics

GRID_ROWS_PER_TASK = 2


def evaluate_weights(trainer, weights: dict[str, Tensor] | None, label: str,
                     per_task: int | None = None) -> EvalResult | None:
    """Edit the first `per_task` held-out conditions of every task (default train.eval_per_task) with
    `weights` (None: the policy's own), each with its own keyed noise, and score them with the
    training judge's eval_mode question (and the ground truth where the data has it).
    A model sharded by FSDP2 (trainer.sharded) needs every process in each forward: every process
    calls this, the same images are made everywhere, rank 0 scores them and the others return None."""
    cfg = trainer.cfg
    per_task = cfg.train.eval_per_task if per_task is None else per_task
    samples = held_out_samples(trainer.data, trainer.data.tasks, per_task)
    sigmas, method = _eval_sampler(trainer)
    others = base_edits(trainer, samples) if cfg.judge.eval_mode == "pairwise" else None
    if getattr(trainer, "sharded", False) and not trainer.ctx.is_main:
        from rl.evaluation.heldout import generate_images

        generate_images(trainer.policy, samples, weights=weights, sigmas=sigmas, method=method,
                        seed=cfg.train.seed + 12345, device=trainer.device)
        return None
    progress = None
    if cfg.train.progress:
        from tqdm import tqdm

        progress = tqdm(total=len(samples), desc=f"held-out eval [{label}]", unit="img", leave=False)
    try:
        return evaluate(trainer.policy, trainer.judge, samples, weights=weights, sigmas=sigmas,
                        method=method, seed=cfg.train.seed + 12345, device=trainer.device,
                        with_truth=trainer.data.has_truth, progress=progress, mode=cfg.judge.eval_mode,
                        others=others)
    finally:
        if progress is not None:
            progress.close()


def _eval_sampler(trainer) -> tuple[Tensor, str]:
    """Held-out evaluations sample with sampler.eval_steps and without noise (sde: its ODE, euler)."""
    from rl.plumbing.builders import rollout_sigmas

    s = trainer.cfg.sampler
    return rollout_sigmas(trainer.policy, s.eval_steps, s.shift), "euler" if s.method == "sde" else s.method


def base_edits(trainer, samples) -> Tensor:
    """The base model's (trainer.ref: the initial weights) edits of `samples` with the evaluation's
    keyed noise: what judge.eval_mode pairwise compares against. Made once per sample set (every
    process takes part under FSDP2) and kept on the trainer."""
    from rl.evaluation.heldout import generate_images

    sigmas, method = _eval_sampler(trainer)
    key = tuple(s.key for s in samples)
    cache = trainer.__dict__.setdefault("_base_edits", {})
    if key not in cache:
        cache[key] = generate_images(trainer.policy, samples, weights=trainer.ref, sigmas=sigmas, method=method,
                                     seed=trainer.cfg.train.seed + 12345, device=trainer.device)
    return cache[key]


def eval_fingerprint(cfg) -> dict[str, Any]:
    """What a held-out evaluation depends on: the base model, the data, the judge and the sampler."""
    from core.config.loading import to_dict

    return {"model": to_dict(cfg.model), "data": to_dict(cfg.data), "judge_kind": cfg.judge.kind, "judge_eval_mode": cfg.judge.eval_mode,
            "judge_model": cfg.judge.model, "sampler": to_dict(cfg.sampler), "seed": cfg.train.seed,
            "eval_per_task": cfg.train.eval_per_task}


def save_eval(result: EvalResult, path: Path, fingerprint: dict[str, Any] | None = None) -> None:
    """`path`.json + `path`.safetensors (no pickle); `fingerprint` records what the result depends on."""
    save_tree({"images": result.images, "reward": result.reward, "by_dimension": result.by_dimension,
               "ground_truth": result.ground_truth, "keys": [s.key for s in result.samples],
               "fingerprint": fingerprint}, path.parent, path.name)


def load_eval(path: Path) -> dict[str, Any]:
    return load_tree(path.parent, path.name)


def _base_images(base, n: int) -> Tensor | None:
    if base is None:
        return None
    return (base.images if isinstance(base, EvalResult) else base["images"])[:n]


def grid_columns(trainer, base) -> tuple[Tensor, Tensor, dict[str, Tensor], list]:
    """Rows for the sample grid: a few held-out conditions per task, base vs current (EMA).

    Returns sources, masks, the named image columns, and the samples of the rows (for their labels)."""
    from core.synthetic.world import collate
    from rl.evaluation.heldout import generate_images

    cfg = trainer.cfg
    per_task = max(1, cfg.train.eval_per_task)
    samples = held_out_samples(trainer.data, trainer.data.tasks, per_task)
    chosen = [i for t in trainer.data.tasks for i in [j for j, s in enumerate(samples) if s.task == t]
              [:GRID_ROWS_PER_TASK]]
    rows = [samples[i] for i in chosen]
    sigmas, method = _eval_sampler(trainer)
    current = generate_images(trainer.policy, rows, weights=trainer.ema, sigmas=sigmas, method=method,
                              seed=cfg.train.seed + 999, device=trainer.device)
    batch = collate(rows)
    columns: dict[str, Tensor] = {}
    base_imgs = _base_images(base, len(samples))
    if base_imgs is not None:
        columns["base"] = base_imgs[chosen]
    columns["current"] = current
    return batch.images, batch.masks, columns, rows


def _reward_of(result) -> Tensor:
    return result.reward if isinstance(result, EvalResult) else result["reward"]


def final_summary(trainer, run_dir: Path, base, steps_done: int,
                  extra: dict[str, Any] | None = None, final: EvalResult | None = None) -> dict[str, Any]:
    """Plots, the final held-out evaluation against `base`, and summary.json (with `extra` added).
    `final`: the final evaluation when the caller made it (FSDP2: with every process), else made here."""
    cfg = trainer.cfg
    metrics = read_metrics(run_dir / "metrics.jsonl")
    plot_reward_curves(metrics, run_dir / "reward_curve.png", title=f"{cfg.train.algorithm} training reward")
    time_split = plot_time_split(metrics, run_dir / "time_split.png")
    summary: dict[str, Any] = {"run_dir": str(run_dir), "steps": steps_done, "algorithm": cfg.train.algorithm,
                               "time_split_s": time_split,
                               "train_wall_time_s": metrics[-1]["wall_time"] if metrics else 0.0}
    if base is not None and cfg.train.eval_per_task > 0:
        if final is None:
            final = evaluate_weights(trainer, trainer.ema, "final")
        save_eval(final, run_dir / "eval_final", eval_fingerprint(cfg))
        b, f = _reward_of(base), final.reward
        summary["reward_base"] = float(b.mean())
        summary["reward_final"] = float(f.mean())
        gain = bootstrap_mean(f - b)
        summary["reward_gain"] = gain.as_dict()
        per_task = {}
        for task in final.tasks():
            idx = final.indices(task)
            per_task[task] = {"base": float(b[idx].mean()), "final": float(f[idx].mean()),
                              "gain": bootstrap_mean(f[idx] - b[idx]).as_dict()}
        summary["by_task"] = per_task
        summary["final_dimensions"] = final.dimension_means()
        if final.ground_truth is not None:
            base_gt = base.ground_truth_means() if isinstance(base, EvalResult) else _gt_means(base, final)
            summary["ground_truth"] = {"base": base_gt, "final": final.ground_truth_means()}
    summary.update(extra or {})
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    _print_summary(summary)
    return summary


def _gt_means(stored: dict[str, Any], like: EvalResult) -> dict[str, dict[str, float]]:
    tmp = EvalResult(like.samples, stored["images"], stored["reward"], stored["by_dimension"],
                     stored["ground_truth"])
    return tmp.ground_truth_means()


def _print_summary(s: dict[str, Any]) -> None:
    lines = [f"\n== {s['algorithm']} run: {s['steps']} steps in {s['train_wall_time_s']:.0f} s =="]
    if s.get("time_split_s"):
        ts = s["time_split_s"]
        total = sum(ts.values()) or 1.0
        lines.append("time per step: " + ", ".join(f"{k} {v:.2f} s ({100 * v / total:.0f}%)" for k, v in ts.items()))
    if "by_task" in s:
        lines.append(f"{'task':10s} {'base':>7s} {'final':>7s}   gain [95% CI]")
        for task, r in s["by_task"].items():
            g = r["gain"]
            lines.append(f"{task:10s} {r['base']:7.3f} {r['final']:7.3f}   {g['mean']:+.3f} "
                         f"[{g['low']:+.3f}, {g['high']:+.3f}]")
        g = s["reward_gain"]
        lines.append(f"{'all':10s} {s['reward_base']:7.3f} {s['reward_final']:7.3f}   {g['mean']:+.3f} "
                     f"[{g['low']:+.3f}, {g['high']:+.3f}]")
    print("\n".join(lines))
