"""`python -m reward.training.accuracy_curve`: how a judge's held-out accuracy grows with its training pairs.

Trains one judge (`python -m reward.train`'s settings, `--set KEY=VALUE`) on the first N training
records of one preference file for each N of `--pairs`, every one evaluated on the same held-out
records, and writes `curve.json` (the accuracy table of every N) and `curve.png` (overall and per
task against N, log scale). Without `--data` the demo data of `demo_pairs` pairs is built first.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from core.config.cli import config_parser, parse_config
from reward.train import RewardTrainConfig, demo_data, train_reward_model
from reward.training.preference_data import read_preferences


def subsets(data: Path, counts: list[int], out: Path) -> dict[int, Path]:
    """A JSONL per count: its first `count` training records and every held-out record."""
    records = read_preferences(data)
    train = [r for r in records if r.split != "heldout"]
    heldout = [r for r in records if r.split == "heldout"]
    if not heldout:
        raise ValueError(f"{data} has no held-out records (\"split\": \"heldout\"): the curve needs one fixed "
                         "held-out set")
    too_many = [n for n in counts if n > len(train)]
    if too_many:
        raise ValueError(f"--pairs {too_many} exceed the {len(train)} training records of {data}")
    paths = {}
    for n in counts:  # image paths relative to `out` where they can be, else absolute
        path = out / f"pairs_{n}.jsonl"
        path.write_text("".join(json.dumps(r.to_json(out)) + "\n" for r in train[:n] + heldout))
        paths[n] = path
    return paths


def run_curve(cfg: RewardTrainConfig, counts: list[int], out: Path) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    data = Path(cfg.data) if cfg.data is not None else demo_data(cfg, out)
    points = {}
    for n, path in subsets(data, sorted(counts), out).items():
        result = train_reward_model(dataclasses.replace(cfg, data=str(path), out=str(out / f"judge_{n}")))
        points[n] = result.metrics["after"]
        print(f"{n} pairs: held-out accuracy {100 * points[n]['overall']['accuracy']:.1f}%", flush=True)
    curve = {"pairs": sorted(points), "tables": {str(n): t for n, t in points.items()}}
    (out / "curve.json").write_text(json.dumps(curve, indent=2) + "\n")
    plot_curve(curve, out / "curve.png")
    return curve


def task_accuracy(table: dict[str, Any], task: str) -> float:
    """A task's accuracy over all its (pair, dimension)s."""
    cells = table["cells"][task].values()
    return sum(c["accuracy"] * c["n"] for c in cells) / sum(c["n"] for c in cells)


def plot_curve(curve: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = curve["pairs"]
    tables = [curve["tables"][str(n)] for n in pairs]
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for task in tables[-1]["cells"]:
        ax.plot(pairs, [100 * task_accuracy(t, task) for t in tables], marker="o", label=task)
    ax.plot(pairs, [100 * t["overall"]["accuracy"] for t in tables], marker="s", color="black", lw=2, label="all")
    ax.axhline(50, color="grey", ls=":", lw=1)
    ax.set(xscale="log", xlabel="training preference pairs", ylabel="held-out pairwise accuracy (%)",
           title="judge accuracy vs preference pairs")
    ax.set_xticks(pairs, [str(n) for n in pairs])
    ax.minorticks_off()  # the log axis' own minor labels collide with the counts
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """`python -m reward.training.accuracy_curve --pairs 240,480,960 --out DIR [--config FILE] [--set KEY=VALUE]`."""
    from reward.train import RANGES

    p = config_parser("python -m reward.training.accuracy_curve", __doc__.split("\n\n")[0], RewardTrainConfig,
                      ranges=RANGES, example="demo_pairs=2400", config_help="YAML file of reward.train keys")
    p.add_argument("--pairs", required=True, help="comma-separated training pair counts, e.g. 240,480,960")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    args, cfg = parse_config(p, RewardTrainConfig, argv)
    try:
        counts = [int(n) for n in args.pairs.split(",")]
    except ValueError:
        counts = []
    if not counts or any(n < 1 for n in counts):
        p.error(f"--pairs must be positive counts separated by commas, got {args.pairs!r}")
    return run_curve(cfg, counts, Path(args.out))


if __name__ == "__main__":
    main()
