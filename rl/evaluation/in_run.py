"""What a training run evaluates while it trains: the base model once (cached in the run directory),
the EMA on the held-out set every train.eval_every steps, and the labelled sample grids."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from rl.plumbing.run_log import RunLog, sample_label, save_sample_grid


def cached_base_eval(trainer, run_dir: Path):
    """Evaluate the initial weights once per run (a resumed run reuses the stored result)."""
    from core.io.tensor_store import has_tree
    from rl.evaluation.run_summary import (
        eval_fingerprint,
        evaluate_weights,
        load_eval,
        save_eval,
    )

    path = run_dir / "eval_base"
    fingerprint = eval_fingerprint(trainer.cfg)
    stored = load_eval(path) if trainer.ctx.is_main and has_tree(path.parent, path.name) else None
    reuse = stored is not None and stored.get("fingerprint") == fingerprint
    if trainer.sharded:  # FSDP2: every process evaluates, or none; rank 0 knows
        reuse = trainer.ctx.broadcast_object(reuse)
    if reuse:
        return stored
    if stored is not None:
        print("[rl.train] the stored base evaluation was made with other settings: evaluating again",
              file=sys.stderr)
    result = evaluate_weights(trainer, trainer.ref, "base")
    if trainer.ctx.is_main:
        save_eval(result, path, fingerprint)
    return result


def periodic_eval(trainer, step: int, result=None) -> dict[str, Any]:
    """Held-out judge reward (and ground truth where known) of the EMA, for train.eval_every;
    `result`: this step's evaluation of the same held-out set, when the monitor already made it."""
    from rl.evaluation.run_summary import evaluate_weights

    if result is None:
        result = evaluate_weights(trainer, trainer.ema, f"step {step}")
    if result is None:  # FSDP2, not rank 0: it took part in the forwards, rank 0 has the numbers
        return {}
    out: dict[str, Any] = {"heldout/reward": float(result.reward.mean()),
                           "heldout/reward_by_task": result.reward_by_task()}
    if result.ground_truth is not None:
        out["heldout/truth_by_task"] = result.ground_truth_means()
    return out


def sample_grid(trainer, run_dir: Path, step: int, base, log: RunLog | None = None) -> None:
    """samples/step-*.png (labelled with each row's task and prompt), also sent to the run's trackers."""
    from rl.evaluation.run_summary import grid_columns

    sources, masks, columns, rows = grid_columns(trainer, base)
    if not trainer.ctx.is_main:  # FSDP2: the other processes only take part in the forwards
        return
    (run_dir / "samples").mkdir(exist_ok=True)
    grid = save_sample_grid(run_dir / "samples" / f"step-{step:06d}.png", sources, masks, columns,
                            row_labels=[sample_label(s.task, s.prompt) for s in rows])
    if log is not None:
        log.log_images(step, {"samples": grid})
