"""Plots of a run: reward curves (per task and overall) and where the time of a step goes."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

#: the series name of the reward over all tasks (task names are the other series)
OVERALL = "all tasks"

Series = tuple[list[int], list[float]]


def smoothing_window(n_points: int, share: float = 0.1, minimum: int = 5) -> int:
    """Moving-average window for `n_points` points: `share` of them, at least `minimum`."""
    return max(minimum, round(share * n_points))


def moving_average(values: list[float], window: int) -> list[float]:
    """Centred moving average (a trailing one would lag the curve by half a window); near the ends
    it averages the points that exist."""
    half_before, half_after = (window - 1) // 2, window // 2
    out = []
    for i in range(len(values)):
        chunk = values[max(0, i - half_before):i + half_after + 1]
        out.append(sum(chunk) / len(chunk))
    return out


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def reward_series(metrics: list[dict[str, Any]], prefix: str = "") -> dict[str, Series]:
    """Per-task reward points (steps, values) and the overall ones under OVERALL, from metrics.jsonl
    records; `prefix="heldout/"` reads the held-out evaluations instead of the training batches.
    Missing and non-finite values (logged as null) are left out."""
    out: dict[str, Series] = {}

    def add(name: str, step: int, value: Any) -> None:
        if _finite(value):
            xs, ys = out.setdefault(name, ([], []))
            xs.append(step)
            ys.append(float(value))

    for m in metrics:
        if "step" not in m:
            continue
        add(OVERALL, m["step"], m.get(f"{prefix}reward"))
        for task, value in sorted((m.get(f"{prefix}reward_by_task") or {}).items()):
            add(task, m["step"], value)
    return out


def smoothed_rewards(metrics: list[dict[str, Any]], window: int | None = None) -> dict[str, Series]:
    """Moving averages of the training reward per task and overall (window: `smoothing_window` of
    the series' length unless given)."""
    return {name: (xs, moving_average(ys, window or smoothing_window(len(ys))))
            for name, (xs, ys) in reward_series(metrics).items()}


def reward_figure(metrics: list[dict[str, Any]], title: str = "reward") -> Figure | None:
    """Left: the training reward per task (raw points faint, moving average bold) with held-out
    evaluations as markers; right: the same for all tasks together. None without reward records.

    Each step samples its own mixture of tasks and tasks differ in how hard they are, so the
    overall curve moves with the mixture; the per-task curves are the ones to read."""
    train = reward_series(metrics)
    if not train:
        return None
    smooth = smoothed_rewards(metrics)
    heldout = reward_series(metrics, "heldout/")
    tasks = [t for t in train if t != OVERALL]
    colours = {t: plt.get_cmap("tab10")(i % 10) for i, t in enumerate(tasks)}
    colours[OVERALL] = "black"
    fig, (ax_task, ax_all) = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    panels = ((ax_task, tasks, "per task"), (ax_all, [OVERALL] if OVERALL in train else [],
                                              "all tasks (the task mixture varies per step)"))
    for ax, names, panel_title in panels:
        for name in names:
            xs, ys = train[name]
            window = smoothing_window(len(ys))
            ax.plot(xs, ys, color=colours[name], alpha=0.2, linewidth=0.8)
            ax.plot(xs, smooth[name][1], color=colours[name], linewidth=2,
                    label=f"{name} (mean of {window})")
            if name in heldout:
                hx, hy = heldout[name]
                ax.plot(hx, hy, linestyle="none", marker="D", markersize=6, color=colours[name],
                        markeredgecolor="white", label=f"{name} held-out")
        ax.set(xlabel="step", title=panel_title)
        ax.grid(alpha=0.3)
        if names:
            ax.legend(fontsize=8)
    ax_task.set_ylabel("judge reward")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_reward_curves(metrics: list[dict[str, Any]], path: Path, title: str = "reward") -> dict[str, Series]:
    """Write `reward_figure` to `path`; returns the smoothed training series it drew (empty, and no
    file, without reward records)."""
    fig = reward_figure(metrics, title)
    if fig is None:
        return {}
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return smoothed_rewards(metrics)


def plot_time_split(metrics: list[dict[str, Any]], path: Path) -> dict[str, float]:
    """Mean seconds per step in rollout / judge / update (and the judge's refresh, when the run has one),
    as a bar chart; returns the means."""
    keys = ("time_rollout", "time_judge", "time_update")
    rows = [m for m in metrics if all(_finite(m.get(k)) for k in keys)]
    if not rows:
        return {}
    if all(_finite(m.get("time_refresh")) for m in rows):
        keys += ("time_refresh",)
    means = {k.removeprefix("time_"): sum(m[k] for m in rows) / len(rows) for k in keys}
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar(list(means), list(means.values()), color=["#4c72b0", "#dd8452", "#55a868", "#c44e52"][:len(means)])
    ax.set(ylabel="seconds per step", title="time split")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return means


def plot_monitor(history: list[dict[str, Any]], warnings: list[dict[str, Any]], path: Path,
                 signal_label: str = "ground truth", best_step: int | None = None) -> bool:
    """monitor.png of the hacking monitor (rl/evaluation/monitor.py): one panel per task with the
    training judge's held-out reward (left axis, black) and the monitor's signals (right axis, in
    their own units) against the step (the base model at -1); a red line marks each warning's step,
    a green one the best monitored step. Returns False (and writes nothing) without history.

    Two y axes because the signals' units differ (PSNR in dB, accuracies in [0, 1]); what matters
    is the direction of each curve, which is what the warnings compare."""
    if not history:
        return False
    tasks = list(history[-1]["signal"]) or list(history[-1]["judge"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.8), squeeze=False)
    steps = [p["step"] for p in history]
    for ax, task in zip(axes[0], tasks):
        judge = [p["judge"].get(task, math.nan) for p in history]
        ax.plot(steps, judge, color="black", marker="o", markersize=3, linewidth=1.5, label="training judge")
        ax.set(xlabel="step (base at -1)", title=task)
        ax.grid(alpha=0.3)
        twin = ax.twinx()
        metrics = list(history[-1]["signal"].get(task, {}))
        for i, metric in enumerate(metrics):
            values = [p["signal"].get(task, {}).get(metric, math.nan) for p in history]
            twin.plot(steps, values, color=plt.get_cmap("tab10")(i % 10), marker="s", markersize=3,
                      linestyle="--", linewidth=1.5, label=f"{signal_label}: {metric}")
        for w in warnings:
            if w["task"] == task:
                ax.axvline(w["to_step"], color="red", alpha=0.5, linewidth=1)
        if best_step is not None:
            ax.axvline(best_step, color="green", linestyle=":", linewidth=1.5)
        lines = ax.get_legend_handles_labels()
        more = twin.get_legend_handles_labels()
        ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=7, loc="best")
    axes[0][0].set_ylabel("training judge (held-out)")
    twin.set_ylabel(f"{signal_label} (own units)")
    fig.suptitle(f"reward-hacking monitor: training judge vs {signal_label} (red: warning, green: best)")
    fig.tight_layout()
    # written whole, then renamed: a viewer refreshing the file never reads half a PNG
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    tmp.replace(path)
    return True
