"""The tables and plots of `python -m rl.compare`: curves over seeds, intervals, time to target.

Input: per algorithm, per seed, per wall-clock point, the held-out evaluation of that snapshot
(`PointResult`), and the base model's (the t = 0 point of every curve). Every number is a mean over
seeds with a 95% t-interval over seeds (the seeds are the independent replicates; the held-out
conditions and their noise are the same for every snapshot, so they are not a source of spread
between curves). With one seed an interval is "n/a".
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import matplotlib

from core.synthetic.metrics import MAIN_METRICS

matplotlib.use("Agg")
import matplotlib.pyplot as plt

#: the ground-truth metric that says whether a task got better (all metrics go into compare.json)
MAIN_METRIC = {task: metrics[0] for task, metrics in MAIN_METRICS.items()}

#: two-sided 95% Student t quantiles for 1..30 degrees of freedom (no scipy in the dependencies)
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


@dataclasses.dataclass
class PointResult:
    """One snapshot's held-out evaluation: means over the held-out conditions."""

    seconds: float                                   # measured training seconds when it was taken
    step: int                                        # the last optimiser step before it (-1: none)
    reward: float                                    # judge reward over all tasks
    reward_by_task: dict[str, float]
    truth_by_task: dict[str, dict[str, float]]       # task -> ground-truth metric -> mean ({} without truth)


def t_quantile(df: int) -> float:
    """The 97.5% quantile of Student's t with `df` degrees of freedom (table to 30, then a
    Cornish-Fisher expansion around the normal's 1.96, accurate to ~1e-3)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def interval(values: list[float]) -> dict[str, Any]:
    """Mean with a 95% t-interval over the values (seeds); low / high are None for one value."""
    if not values:
        raise ValueError("an interval of no values")
    n = len(values)
    mean = sum(values) / n
    if n == 1:
        return {"mean": mean, "low": None, "high": None, "n": 1}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile(n - 1) * sd / math.sqrt(n)
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": n}


def time_to_target(seconds: list[float], rewards: list[float], target: float) -> float | None:
    """The first time the curve (seconds, rewards) reaches `target`, linearly interpolated between
    points; 0 when its first point already does; None when it never does."""
    for i, (t, r) in enumerate(zip(seconds, rewards)):
        if r >= target:
            if i == 0:
                return float(t)
            t0, r0 = seconds[i - 1], rewards[i - 1]
            return float(t0 + (target - r0) / (r - r0) * (t - t0))  # r > target > r0: no division by zero
    return None


def _curve(base: PointResult, per_seed: list[list[PointResult]], tasks: list[str]) -> list[dict[str, Any]]:
    """Point 0 (the base model) and every wall-clock point, each a mean over seeds with intervals."""
    rows = [{"point": 0, "seconds": 0.0, "steps": 0.0, "reward": interval([base.reward]),
             "reward_by_task": {t: interval([base.reward_by_task[t]]) for t in tasks},
             "truth_by_task": {t: {m: interval([v]) for m, v in base.truth_by_task.get(t, {}).items()}
                               for t in tasks}}]
    for k in range(len(per_seed[0])):
        at = [seed[k] for seed in per_seed]
        rows.append({
            "point": k + 1, "seconds": sum(p.seconds for p in at) / len(at),
            "steps": sum(p.step + 1 for p in at) / len(at), "reward": interval([p.reward for p in at]),
            "reward_by_task": {t: interval([p.reward_by_task[t] for p in at]) for t in tasks},
            "truth_by_task": {t: {m: interval([p.truth_by_task[t][m] for p in at])
                                  for m in at[0].truth_by_task.get(t, {})} for t in tasks}})
    return rows


def build_report(base: PointResult, results: dict[str, list[list[PointResult]]], tasks: list[str],
                 settings: dict[str, Any]) -> dict[str, Any]:
    """compare.json: the curves of every algorithm, the target and each algorithm's time to it.

    `results[algorithm][seed][point]`; the target is GRPO's final held-out judge reward (mean over
    seeds) when grpo was compared, else the first algorithm's."""
    curves = {alg: _curve(base, per_seed, tasks) for alg, per_seed in results.items()}
    reference = "grpo" if "grpo" in curves else next(iter(curves))
    target = curves[reference][-1]["reward"]["mean"]

    def seconds_to(alg: str) -> float | None:
        rows = curves[alg]
        return time_to_target([r["seconds"] for r in rows], [r["reward"]["mean"] for r in rows], target)

    reference_time = seconds_to(reference)
    timing = {}
    for alg in curves:
        t = seconds_to(alg)
        # a ratio needs both times positive: a time of 0 means the base model already reaches the target
        ratio = reference_time / t if t and reference_time else None
        timing[alg] = {"final_reward": curves[alg][-1]["reward"]["mean"], "seconds": t, "speedup": ratio}
    return {"settings": settings, "tasks": tasks, "base": dataclasses.asdict(base), "curves": curves,
            "per_seed": {alg: [[dataclasses.asdict(p) for p in seed] for seed in per_seed]
                         for alg, per_seed in results.items()},
            "target": {"algorithm": reference, "reward": target, "seconds": reference_time,
                       "why": "grpo's final reward" if reference == "grpo"
                       else f"grpo was not compared: the first algorithm's ({reference}) final reward",
                       # a target the base model already meets times nothing: say so rather than print 0 s
                       "uninformative": target <= base.reward},
            "time_to_target": timing}


def _fmt(iv: dict[str, Any], digits: int = 3, base: bool = False) -> str:
    if iv["low"] is None:  # the base model is one model, not a mean over seeds: no interval to speak of
        return f"{iv['mean']:.{digits}f}" + ("" if base else " (n/a)")
    return f"{iv['mean']:.{digits}f} [{iv['low']:.{digits}f}, {iv['high']:.{digits}f}]"


def _rows(report: dict[str, Any]):
    """(label, row, is_base) of the base model once, then every algorithm's points after t = 0."""
    first = next(iter(report["curves"].values()))
    yield "base", first[0], True
    for alg, rows in report["curves"].items():
        for row in rows[1:]:
            yield alg, row, False


def markdown(report: dict[str, Any]) -> str:
    """compare.md: the settings, the judge-reward table, the ground-truth table, time to target."""
    s, tasks, points = report["settings"], report["tasks"], report["settings"]["points"]
    seeds = s["seeds"]
    spread = "95% t-interval over seeds" if seeds > 1 else "one seed: no interval (n/a)"
    lines = [
        "# rl.compare", "",
        (f"Algorithms {', '.join(report['curves'])}; {s['seconds']:g} s of training each (set-up and evaluation "
         f"not counted), {seeds} seed(s), snapshots at {points} points; held-out: {s['per_task']} conditions per "
         f"task, the same conditions and noise for every snapshot; evaluation: {s['evaluation']}."),
        (f"Numbers are means over seeds, {spread}. `seconds` is the measured training time at the snapshot "
         "(mean over seeds; a chunk ends after the first step past its budget)."), "",
        "## Held-out judge reward", "",
        "| algorithm | point | seconds | steps | all tasks | " + " | ".join(tasks) + " |",
        "|---|---|---|---|---|" + "---|" * len(tasks)]
    for label, row, base in _rows(report):
        lines.append(f"| {label} | {row['point']}/{points} | {row['seconds']:.1f} | {row['steps']:.0f} | "
                     f"{_fmt(row['reward'], base=base)} | "
                     + " | ".join(_fmt(row["reward_by_task"][t], base=base) for t in tasks) + " |")
    truth_tasks = [t for t in tasks if MAIN_METRIC.get(t) in report["curves"][next(iter(report["curves"]))][0]
                   ["truth_by_task"].get(t, {})]
    if truth_tasks:
        lines += ["", "## Ground truth (main metric per task; every metric is in compare.json)", "",
                  "| algorithm | point | seconds | " + " | ".join(f"{t} {MAIN_METRIC[t]}" for t in truth_tasks) + " |",
                  "|---|---|---|" + "---|" * len(truth_tasks)]
        for label, row, base in _rows(report):
            lines.append(f"| {label} | {row['point']}/{points} | {row['seconds']:.1f} | " + " | ".join(
                _fmt(row["truth_by_task"][t][MAIN_METRIC[t]], 2 if MAIN_METRIC[t] == "psnr_mask" else 3, base)
                for t in truth_tasks) + " |")
    target = report["target"]
    ref = target["algorithm"]
    lines += ["", "## Time to target", "",
              (f"Target: {target['reward']:.3f}, {target['why']} (held-out judge reward, mean over seeds). "
               "Seconds to reach it: linear interpolation between points (the base model at 0 s); "
               f"`{ref} time / time` is how many times faster than {ref} an algorithm got there.")
              + (f" **{ref}'s final reward is not above the base model's ({report['base']['reward']:.3f}): every "
                 "algorithm meets the target at 0 s and the ratios say nothing; compare the curves instead.**"
                 if target.get("uninformative") else ""), "",
              f"| algorithm | final reward | seconds to target | {ref} time / time |", "|---|---|---|---|"]
    for alg, t in report["time_to_target"].items():
        secs = ("not reached" if t["seconds"] is None else "0 (the base model)" if t["seconds"] == 0
                else f"{t['seconds']:.1f}")
        speed = "n/a" if t["speedup"] is None else f"{t['speedup']:.2f}x"
        lines.append(f"| {alg} | {t['final_reward']:.3f} | {secs} | {speed} |")
    return "\n".join(lines) + "\n"


def _band(ax, xs: list[float], ivs: list[dict[str, Any]], label: str, colour,
          limits: tuple[float, float] = (-math.inf, math.inf)) -> None:
    """A mean curve and its interval band, the band clipped to the metric's range (a t-interval over
    two seeds easily spans past an accuracy's 0 and 1)."""
    ax.plot(xs, [iv["mean"] for iv in ivs], marker="o", color=colour, label=label)
    lo_lim, hi_lim = limits
    spans = [(x, max(iv["low"], lo_lim), min(iv["high"], hi_lim)) for x, iv in zip(xs, ivs) if iv["low"] is not None]
    if spans:
        ax.fill_between([x for x, _, _ in spans], [lo for _, lo, _ in spans], [hi for _, _, hi in spans],
                        color=colour, alpha=0.2)


def plot_reward(report: dict[str, Any], path: Path) -> None:
    """reward.png: held-out judge reward vs training seconds per algorithm (bands: the intervals),
    and the time-to-target line."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (alg, rows) in enumerate(report["curves"].items()):
        _band(ax, [r["seconds"] for r in rows], [r["reward"] for r in rows], alg, plt.get_cmap("tab10")(i % 10),
              limits=(0.0, 1.0))
    target = report["target"]
    ax.axhline(target["reward"], color="grey", linestyle="--", linewidth=1, label=f"target ({target['algorithm']} final)")
    ax.set(xlabel="training seconds", ylabel="held-out judge reward (all tasks)", title="rl.compare: judge reward")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_truth(report: dict[str, Any], path: Path) -> bool:
    """truth.png: one panel per task, its main ground-truth metric vs training seconds; False (no
    file) when the data has no ground truth."""
    curves = report["curves"]
    base_truth = next(iter(curves.values()))[0]["truth_by_task"]
    tasks = [t for t in report["tasks"] if MAIN_METRIC.get(t) in base_truth.get(t, {})]
    if not tasks:
        return False
    cols = min(2, len(tasks))
    fig, axes = plt.subplots(math.ceil(len(tasks) / cols), cols, figsize=(6 * cols, 4 * math.ceil(len(tasks) / cols)),
                             squeeze=False)
    for ax, task in zip(axes.flat, tasks):
        metric = MAIN_METRIC[task]
        for i, (alg, rows) in enumerate(curves.items()):
            _band(ax, [r["seconds"] for r in rows], [r["truth_by_task"][task][metric] for r in rows], alg,
                  plt.get_cmap("tab10")(i % 10), limits=(0.0, 1.0) if metric != "psnr_mask" else (0.0, math.inf))
        ax.set(xlabel="training seconds", ylabel=metric, title=f"{task}: {metric}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(tasks):]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
