"""Evaluation reports: tables (report.md, report.json) and plots, from one or two EvalResults.

Per task and dimension: mean judge score with a 95% bootstrap interval; usability rate (share of
edits whose every dimension clears a threshold); ground-truth metrics where the data has them.
With a second model: paired differences with intervals, and good / same / bad counts per task
from the pairwise judge asked in both orders (OneReward's GSB figure).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from rl.evaluation.heldout import EvalResult  # noqa: E402
from rl.evaluation.stats import bootstrap_mean  # noqa: E402


def _dimensions(result: EvalResult, idx: list[int]) -> list[str]:
    """The dimensions scored on any of these edits, in first-seen order."""
    return list(dict.fromkeys(d for i in idx for d in result.by_dimension[i]))


def _scored(result: EvalResult, idx: list[int], dim: str) -> list[int]:
    """The edits among `idx` that have `dim` (extend without a prompt has no text alignment), so a
    dimension's n can be smaller than its task's."""
    return [i for i in idx if dim in result.by_dimension[i]]


def model_section(result: EvalResult, usability_threshold: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for task in result.tasks():
        idx = result.indices(task)
        dims = _dimensions(result, idx)
        usable = [float(all(v >= usability_threshold for v in result.by_dimension[i].values())) for i in idx]
        section: dict[str, Any] = {
            "n": len(idx),
            "reward": bootstrap_mean(result.reward[idx]).as_dict(),
            "usability": bootstrap_mean(usable).as_dict(),
            "dimensions": {d: bootstrap_mean([result.by_dimension[i][d] for i in _scored(result, idx, d)]
                                             ).as_dict() for d in dims},
        }
        if result.ground_truth is not None:
            metrics = result.ground_truth[idx[0]].keys()
            section["ground_truth"] = {m: bootstrap_mean([result.ground_truth[i][m] for i in idx]).as_dict()
                                       for m in metrics}
        out[task] = section
    return out


def paired_section(a: EvalResult, b: EvalResult) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for task in a.tasks():
        idx = a.indices(task)
        dims = _dimensions(a, idx)
        section = {"reward_diff": bootstrap_mean(a.reward[idx] - b.reward[idx]).as_dict(),
                   "dimension_diff": {d: bootstrap_mean([a.by_dimension[i][d] - b.by_dimension[i][d]
                                                         for i in _scored(a, idx, d)]).as_dict() for d in dims}}
        if a.ground_truth is not None and b.ground_truth is not None:
            section["ground_truth_diff"] = {
                m: bootstrap_mean([a.ground_truth[i][m] - b.ground_truth[i][m] for i in idx]).as_dict()
                for m in a.ground_truth[idx[0]]}
        out[task] = section
    return out


def gsb_counts(preference: torch.Tensor, tasks: list[str], margin: float) -> dict[str, dict[str, int]]:
    """preference[i] = P(A better than B) averaged over both orders and the task's dimensions."""
    out: dict[str, dict[str, int]] = {}
    for task in dict.fromkeys(tasks):
        p = preference[[i for i, t in enumerate(tasks) if t == task]]
        out[task] = {"good": int((p > 0.5 + margin).sum()), "same": int(((p - 0.5).abs() <= margin).sum()),
                     "bad": int((p < 0.5 - margin).sum())}
    return out


def _fmt(iv: dict[str, float], signed: bool = False) -> str:
    f = "{:+.3f}" if signed else "{:.3f}"
    return f"{f.format(iv['mean'])} [{f.format(iv['low'])}, {f.format(iv['high'])}]"


def markdown(report: dict[str, Any]) -> str:
    lines = ["# Evaluation report\n", f"- model A: {report['models']['A']}"]
    if "B" in report["models"]:
        lines.append(f"- model B: {report['models']['B']}")
    lines += [f"- judge: {report['judge']}; {report['n_per_task']} held-out conditions per task, "
              f"same conditions and noise for every model; intervals are 95% bootstrap intervals",
              f"- usability: every dimension of an edit scores >= {report['usability_threshold']}\n"]
    for name in report["models"]:
        lines.append(f"## Model {name}\n")
        lines.append("| task | reward | usability | " + "dimensions |")
        lines.append("|---|---|---|---|")
        for task, s in report[name].items():
            dims = "; ".join(f"{d} {_fmt(v)}" for d, v in s["dimensions"].items())
            lines.append(f"| {task} | {_fmt(s['reward'])} | {_fmt(s['usability'])} | {dims} |")
        if any("ground_truth" in s for s in report[name].values()):
            lines.append("\nGround truth (synthetic world):\n")
            lines.append("| task | metrics |")
            lines.append("|---|---|")
            for task, s in report[name].items():
                gt = "; ".join(f"{m} {_fmt(v)}" for m, v in s.get("ground_truth", {}).items())
                lines.append(f"| {task} | {gt} |")
        lines.append("")
    if "paired" in report:
        lines.append("## A - B, paired\n")
        lines.append("| task | reward diff | good / same / bad | ground-truth diffs |")
        lines.append("|---|---|---|---|")
        for task, s in report["paired"].items():
            g = report["gsb"][task]
            gt = "; ".join(f"{m} {_fmt(v, True)}" for m, v in s.get("ground_truth_diff", {}).items())
            lines.append(f"| {task} | {_fmt(s['reward_diff'], True)} | {g['good']} / {g['same']} / {g['bad']} | {gt} |")
        lines.append("\nA judge gain that the ground truth does not share is a sign of reward hacking.")
    return "\n".join(lines) + "\n"


def plot_dimensions(report: dict[str, Any], path: Path) -> None:
    tasks = list(report["A"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.6), squeeze=False)
    names = list(report["models"])
    for ax, task in zip(axes[0], tasks):
        dims = list(report["A"][task]["dimensions"])
        width = 0.8 / len(names)
        for k, name in enumerate(names):
            ivs = [report[name][task]["dimensions"][d] for d in dims]
            xs = [i + k * width for i in range(len(dims))]
            means = [v["mean"] for v in ivs]
            err = [[v["mean"] - v["low"] for v in ivs], [v["high"] - v["mean"] for v in ivs]]
            ax.bar(xs, means, width, yerr=err, capsize=3, label=name)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(dims))], [d.replace("_", "\n") for d in dims],
                      fontsize=8)
        ax.set(ylim=(0, 1), title=task)
    axes[0][0].set_ylabel("judge score")
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_gsb(gsb: dict[str, dict[str, int]], path: Path) -> None:
    tasks = list(gsb)
    fig, ax = plt.subplots(figsize=(6, 0.6 + 0.5 * len(tasks)))
    left = [0.0] * len(tasks)
    for key, colour in (("good", "#55a868"), ("same", "#bbbbbb"), ("bad", "#c44e52")):
        share = [gsb[t][key] / max(1, sum(gsb[t].values())) for t in tasks]
        ax.barh(tasks, share, left=left, color=colour, label=key)
        left = [a + b for a, b in zip(left, share)]
    ax.set(xlim=(0, 1), xlabel="share of conditions (A vs B)", title="good / same / bad")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_reward_vs_truth(results: dict[str, EvalResult], path: Path, metric: str = "psnr_mask") -> None:
    """Judge reward against a ground-truth metric, per image: the two should rise together."""
    fig, ax = plt.subplots(figsize=(5, 4))
    for name, r in results.items():
        if r.ground_truth is None:
            continue
        ax.scatter([g[metric] for g in r.ground_truth], r.reward.tolist(), s=10, alpha=0.6, label=name)
    ax.set(xlabel=f"ground truth: {metric}", ylabel="judge reward", title="judge vs ground truth")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
