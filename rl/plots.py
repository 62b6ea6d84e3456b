"""Plots of a run: reward curves (overall and per task) and where the time of a step goes."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _smooth(values: list[float], k: int) -> list[float]:
    out, acc = [], []
    for v in values:
        acc.append(v)
        if len(acc) > k:
            acc.pop(0)
        out.append(sum(acc) / len(acc))
    return out


def plot_reward_curves(metrics: list[dict[str, Any]], path: Path, title: str = "reward") -> None:
    """Training reward per step (raw and smoothed) and the per-task rewards, one panel each."""
    steps = [m["step"] for m in metrics if "reward" in m]
    if not steps:
        return
    rewards = [m["reward"] for m in metrics if "reward" in m]
    tasks = sorted({t for m in metrics for t in m.get("reward_by_task", {})})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    k = max(1, len(steps) // 20)
    axes[0].plot(steps, rewards, alpha=0.35, label="per step")
    axes[0].plot(steps, _smooth(rewards, k), label=f"mean of {k}")
    axes[0].set(xlabel="step", ylabel="judge reward", title=title)
    axes[0].legend()
    for t in tasks:
        pts = [(m["step"], m["reward_by_task"][t]) for m in metrics if t in m.get("reward_by_task", {})]
        xs, ys = zip(*pts)
        axes[1].plot(xs, _smooth(list(ys), k), label=t)
    axes[1].set(xlabel="step", ylabel="reward (smoothed)", title="by task")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_time_split(metrics: list[dict[str, Any]], path: Path) -> dict[str, float]:
    """Mean seconds per step in rollout / judge / update, as a bar chart; returns the means."""
    keys = ("time_rollout", "time_judge", "time_update")
    rows = [m for m in metrics if all(k in m for k in keys)]
    if not rows:
        return {}
    means = {k.removeprefix("time_"): sum(m[k] for m in rows) / len(rows) for k in keys}
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar(list(means), list(means.values()), color=["#4c72b0", "#dd8452", "#55a868"])
    ax.set(ylabel="seconds per step", title="time split")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return means
