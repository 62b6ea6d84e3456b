"""Watching for reward hacking while training (the `monitor.*` keys of rl.train).

Every `monitor.every` steps the EMA edits a fixed held-out set (the first `monitor.per_task`
conditions of each task, each with its own keyed noise, so evaluations differ only by the model),
scored twice: by the training judge (its eval_mode question) and by an independent signal — the
built-in world's ground truth (`MAIN_METRICS`) or a second judge (`monitor.judge`). The base
model (the trainer's initial weights) is the first point of the history, at step -1.

A **warning** fires for a task when, over the last `monitor.window` evaluations, the training
judge rises by more than `monitor.judge_rise` while one of the task's signals falls by more than
its tolerance (`monitor.drop_fraction` for accuracies and IoU, `monitor.drop_db` for PSNR,
`monitor.drop_judge` for a second judge): the policy is pleasing the judge at the expense of
what the judge is meant to measure. The **score** of an evaluation is the mean over tasks of the
mean over the task's signals of (value - base value) / tolerance, i.e. how many tolerances better
than the base model it is; the best-scoring EMA is exported to RUN/best/ with best/best.json.

The history, the best record and the warnings are plain data, saved in every trainer checkpoint
(`state_dict`), so a resumed run continues with exactly what an uninterrupted one would hold.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from core.synthetic.metrics import MAIN_METRICS as TRUTH_METRICS
from reward.judge import Judge
from rl.evaluation.heldout import EvalResult, score_images

#: the ground-truth metrics (core.synthetic.metrics.sample_metrics) the `truth` signal watches, per task
MAIN_METRICS: dict[str, tuple[str, ...]] = TRUTH_METRICS
#: the signal name of the second judge's reward (`monitor.signal: judge`)
JUDGE_SIGNAL = "judge"
#: the unit of each signal, for messages
UNITS: dict[str, str] = {**{m: "" for ms in TRUTH_METRICS.values() for m in ms}, "psnr_mask": "dB", "psnr_keep": "dB",
                         JUDGE_SIGNAL: ""}
#: RUN/<BEST_DIR>/ holds the best monitored model, RUN/<BEST_DIR>/best.json its record
BEST_DIR, BEST_FILE = "best", "best.json"
#: the plot of both curves per task, written into the run directory at every evaluation
PLOT_FILE = "monitor.png"
_TMP_PREFIX, _OLD_PREFIX = ".tmp-best-", ".old-best-"

Point = dict[str, Any]  # {"step": int, "judge": {task: reward}, "signal": {task: {metric: value}}, "score": float}


def tolerances(mcfg) -> dict[str, float]:
    """How far each signal may fall over a window before a rising judge makes it a warning
    (also the unit of the monitor's score), from a MonitorConfig."""
    return {"shape_acc": mcfg.drop_fraction, "object_iou": mcfg.drop_fraction, "glyph_acc": mcfg.drop_fraction,
            "psnr_mask": mcfg.drop_db, JUDGE_SIGNAL: mcfg.drop_judge}


def window_change(steps: Sequence[float], values: Sequence[float]) -> float | None:
    """The change of `values` over the span of `steps`, from their Theil-Sen slope (the median of
    the slopes between every pair of points) times the span; None with fewer than two finite values.

    Why Theil-Sen: a least-squares slope gives the last evaluation of a window most leverage, so
    one bad held-out draw at the end moves it by ~80% of the outlier (window 5), and the means of
    the first and last few points move by outlier / few. The median of the pairwise slopes ignores
    one outlying evaluation entirely from five points on (it enters only 4 of the 10 slopes), yet
    on a steady trend it equals that trend exactly."""
    pts = [(float(x), float(y)) for x, y in zip(steps, values) if y is not None and math.isfinite(y)]
    if len(pts) < 2:
        return None
    slopes = [(yj - yi) / (xj - xi) for i, (xi, yi) in enumerate(pts) for xj, yj in pts[i + 1:] if xj != xi]
    if not slopes:
        return None
    return statistics.median(slopes) * (pts[-1][0] - pts[0][0])


@dataclasses.dataclass(frozen=True)
class HackingEvent:
    """One warning: over steps from_step..to_step the training judge of `task` rose by judge_change
    while the signal `metric` changed by signal_change (below -tolerance)."""

    task: str
    metric: str
    judge_change: float
    signal_change: float
    tolerance: float
    judge_rise: float
    from_step: int
    to_step: int
    evaluations: int

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def message(self) -> str:
        unit = UNITS.get(self.metric, "")
        unit = f" {unit}" if unit else ""
        return (f"reward hacking? {self.task}: the training judge rose {self.judge_change:+.3f} (> {self.judge_rise:g}) "
                f"while {self.metric} changed {self.signal_change:+.3f}{unit} (tolerance -{self.tolerance:g}{unit}) over "
                f"steps {self.from_step}..{self.to_step} ({self.evaluations} evaluations)")


def detect_hacking(history: Sequence[Point], window: int, judge_rise: float,
                   tolerance: Mapping[str, float]) -> list[HackingEvent]:
    """The warnings of the newest evaluation: per task and signal, over the last `window` points of
    `history` (oldest first), judge change > judge_rise and signal change < -tolerance[signal]
    (window_change of each). Nothing before `window` points exist."""
    if window < 2:
        raise ValueError(f"a window needs at least two evaluations, got {window}")
    if len(history) < window:
        return []
    recent = list(history)[-window:]
    steps = [p["step"] for p in recent]
    events = []
    for task, signals in recent[-1]["signal"].items():
        judge = window_change(steps, [p["judge"].get(task) for p in recent])
        if judge is None or not judge > judge_rise:
            continue
        for metric in signals:
            change = window_change(steps, [p["signal"].get(task, {}).get(metric) for p in recent])
            tol = tolerance[metric]
            if change is not None and change < -tol:
                events.append(HackingEvent(task, metric, judge, change, tol, judge_rise, steps[0], steps[-1],
                                           len(recent)))
    return events


def monitor_score(point: Point, base: Point, tolerance: Mapping[str, float]) -> float:
    """How many tolerances better than `base` `point`'s signals are: per task the mean over its
    signals of (value - base) / tolerance (a zero tolerance counts in the signal's own units), then
    the mean over tasks, so that each task weighs the same whatever its number of signals."""
    per_task = []
    for task, signals in point["signal"].items():
        terms = []
        for metric, value in signals.items():
            ref = base["signal"].get(task, {}).get(metric)
            if value is None or ref is None or not (math.isfinite(value) and math.isfinite(ref)):
                continue
            terms.append((value - ref) / (tolerance[metric] or 1.0))
        if terms:
            per_task.append(sum(terms) / len(terms))
    return sum(per_task) / len(per_task) if per_task else 0.0


def evaluate_point(trainer, weights, label: str, mcfg, second_judge: Judge | None) -> tuple[Point, EvalResult]:
    """Edit the monitor's held-out set with `weights` and score it with the training judge and the
    monitor's signal; returns the point (without step and score) and the evaluation (images, rewards)."""
    from rl.evaluation.run_summary import evaluate_weights

    result = evaluate_weights(trainer, weights, label, per_task=mcfg.per_task)
    judge = result.reward_by_task()
    if mcfg.signal == "truth":
        truth = result.ground_truth_means()
        signal = {t: {k: truth[t][k] for k in MAIN_METRICS.get(t, ()) if k in truth.get(t, {})} for t in judge}
    else:
        others = None
        if mcfg.judge.eval_mode == "pairwise":  # the second judge compares against the base model's edits too
            from rl.evaluation.run_summary import base_edits

            others = base_edits(trainer, result.samples)
        second = score_images(second_judge, result.samples, result.images, with_truth=False,
                              mode=mcfg.judge.eval_mode, others=others)
        signal = {t: {JUDGE_SIGNAL: v} for t, v in second.reward_by_task().items()}
    return {"judge": judge, "signal": signal}, result


@dataclasses.dataclass
class MonitorReport:
    """What one monitor evaluation found: the metrics to log, its warnings, whether it was the best."""

    metrics: dict[str, Any]
    events: list[HackingEvent]
    new_best: bool
    result: EvalResult | None


class HackingMonitor:
    """The monitor of one run: history, best record, warnings; evaluation, detection, best export, plot.

    Only the process that evaluates (rank 0) calls `observe`; every process may hold one."""

    def __init__(self, cfg, run_dir: Path, second_judge: Judge | None = None):
        self.mcfg, self.run_dir = cfg.monitor, Path(run_dir)
        self.second_judge = second_judge
        self.tolerance = tolerances(self.mcfg)
        self.history: list[Point] = []
        self.best: dict[str, Any] | None = None
        self.warnings: list[dict[str, Any]] = []

    @staticmethod
    def check_data(data) -> None:
        """Refuse (ConfigError) data without held-out conditions, before any work rather than at the
        first evaluation."""
        from core.config.loading import ConfigError

        if not any(data.held_out(task, 1) for task in data.tasks):
            raise ConfigError("monitor.every needs held-out conditions, and the data has none: add records with "
                              '"split": "heldout" to data.jsonl, or set monitor.every=0')

    def due(self, step: int) -> bool:
        """Whether the monitor evaluates after `step` (0-based): when step + 1 is a multiple of monitor.every."""
        return bool(self.mcfg.every) and (step + 1) % self.mcfg.every == 0

    # -- checkpoint state ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"history": [dict(p) for p in self.history], "best": self.best, "warnings": list(self.warnings)}

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        """Continue from a checkpoint's monitor state (None: a checkpoint without one)."""
        state = state or {}
        self.history = [dict(p) for p in state.get("history", [])]
        self.best = state.get("best")
        self.warnings = list(state.get("warnings", []))

    # -- one evaluation -----------------------------------------------------------------------
    def observe(self, trainer, step: int) -> MonitorReport:
        """Evaluate the EMA after `step`: record the point, detect warnings, export a new best, plot."""
        if not self.history:  # the base model is the history's first point (evaluated once per run)
            base, _ = evaluate_point(trainer, trainer.ref, "monitor base", self.mcfg, self.second_judge)
            self.history.append({"step": -1, **base, "score": 0.0})
        point, result = evaluate_point(trainer, trainer.ema, f"monitor step {step}", self.mcfg, self.second_judge)
        point = {"step": step, **point}
        point["score"] = monitor_score(point, self.history[0], self.tolerance)
        self.history.append(point)
        events = detect_hacking(self.history, self.mcfg.window, self.mcfg.judge_rise, self.tolerance)
        self.warnings.extend(e.as_dict() for e in events)
        new_best = self.mcfg.keep_best and (self.best is None or point["score"] > self.best["score"])
        if new_best:
            self.best = {"step": step, "score": point["score"], "judge": point["judge"], "signal": point["signal"]}
            export_best(trainer, self.run_dir, self.best_record())
        self.plot()
        metrics: dict[str, Any] = {
            "monitor/judge_by_task": point["judge"], "monitor/signal_by_task": point["signal"],
            "monitor/score": point["score"], "monitor/hacking_warnings": len(events)}
        if self.best is not None:
            metrics["monitor/best_step"] = self.best["step"]
        if events:
            metrics["monitor/hacking"] = [e.as_dict() for e in events]
        return MonitorReport(metrics, events, new_best, result)

    def best_record(self) -> dict[str, Any]:
        """best.json: the best evaluation's step and numbers, the base model's, and how they were scored."""
        base = self.history[0]
        return {"step": self.best["step"], "score": self.best["score"], "beats_base": self.best["score"] > 0,
                "signal_kind": self.mcfg.signal, "judge_by_task": self.best["judge"],
                "signal_by_task": self.best["signal"], "base": {"judge_by_task": base["judge"],
                                                                "signal_by_task": base["signal"]},
                "score_meaning": "mean over tasks of the mean over the task's signals of (value - base) / "
                                 "tolerance (monitor.drop_*)",
                "tolerance": {k: v for k, v in self.tolerance.items()
                              if any(k in s for s in base["signal"].values())}}

    def summary(self, stopped_at: int | None) -> dict[str, Any]:
        """The monitor's part of summary.json."""
        return {"evaluations": len(self.history) - 1 if self.history else 0, "warnings": self.warnings,
                "best": None if self.best is None else {k: self.best[k] for k in ("step", "score")},
                "stopped_on_hacking_at": stopped_at}

    def plot(self) -> None:
        """monitor.png: per task, the training judge and the signal vs step, warnings marked."""
        from rl.evaluation.plots import plot_monitor

        label = "ground truth" if self.mcfg.signal == "truth" else "second judge"
        plot_monitor(self.history, self.warnings, self.run_dir / PLOT_FILE, signal_label=label,
                     best_step=None if self.best is None else self.best["step"])

    def stop_message(self, step: int, events: Sequence[HackingEvent], checkpoint: Path | None) -> str:
        """What a monitored stop says: why, where the best model is, how to go on."""
        what = "; ".join(f"{e.task} {e.metric} {e.signal_change:+.3f} while the judge rose {e.judge_change:+.3f}"
                         for e in events)
        if self.best is None:
            best = "no best model was kept (monitor.keep_best is false)"
        else:
            better = "" if self.best["score"] > 0 else "; no evaluation beat the base model"
            best = (f"the best monitored model is {self.run_dir / BEST_DIR} (step {self.best['step']}, "
                    f"{self.best['score']:+.2f} tolerances vs the base{better})")
        held = f"the checkpoint {checkpoint} holds step {step}" if checkpoint else f"step {step} was checkpointed"
        return (f"stopped on reward hacking at step {step} (monitor.stop_on_hacking): {what}. {best[0].upper()}"
                f"{best[1:]}; {held}. To train on anyway: python -m rl.train --resume {self.run_dir} "
                f"--set monitor.stop_on_hacking=false")


def read_best(run_dir: Path) -> dict[str, Any] | None:
    """RUN/best/best.json, or None when the run kept no best model."""
    path = Path(run_dir) / BEST_DIR / BEST_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def export_best(trainer, run_dir: Path, record: dict[str, Any]) -> Path:
    """Export the EMA (trainer.export) with `record` as best.json into RUN/best, replacing it
    atomically: written whole in a temporary directory, then swapped in by two renames (the old one
    is set aside first, and `recover_best_dir` puts it back if a crash falls between them)."""
    from rl.plumbing.checkpoint import disk_error

    run_dir = Path(run_dir)
    final = run_dir / BEST_DIR
    try:
        tmp = Path(tempfile.mkdtemp(dir=run_dir, prefix=_TMP_PREFIX))
        try:
            trainer.export(tmp)
            (tmp / BEST_FILE).write_text(json.dumps(record, indent=2) + "\n")
            old = None
            if final.exists():
                old = run_dir / f"{_OLD_PREFIX}{uuid.uuid4().hex[:8]}"
                os.rename(final, old)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as err:
        raise disk_error(err, run_dir) from err
    return final


def reconcile_best(run_dir: Path, resumed_step: int) -> None:
    """Before a resumed run continues after checkpoint step `resumed_step`: finish an interrupted
    best/ swap, then remove a best/ exported after that checkpoint. Such a best/ belongs to steps
    the resumed run redoes (a bit-exact resume exports it again when it gets there), and keeping it
    would let best/ describe a step that the resumed run's history does not hold."""
    run_dir = Path(run_dir)
    recover_best_dir(run_dir)
    record = read_best(run_dir)
    if record is not None and record.get("step", -1) > resumed_step:
        shutil.rmtree(run_dir / BEST_DIR, ignore_errors=True)
        print(f"[rl.train] removed {run_dir / BEST_DIR} (step {record['step']}): the resume redoes the steps "
              f"after {resumed_step}", file=sys.stderr)


def recover_best_dir(run_dir: Path) -> None:
    """After a killed writer: put a set-aside best/ back when the new one never arrived, and
    remove unfinished temporaries."""
    run_dir = Path(run_dir)
    for old in sorted(run_dir.glob(f"{_OLD_PREFIX}*")):
        if not (run_dir / BEST_DIR).exists():
            os.rename(old, run_dir / BEST_DIR)
        else:
            shutil.rmtree(old, ignore_errors=True)
    for tmp in run_dir.glob(f"{_TMP_PREFIX}*"):
        shutil.rmtree(tmp, ignore_errors=True)
