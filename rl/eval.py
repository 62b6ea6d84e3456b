"""`python -m rl.eval`: per-task, per-dimension scores, usability, ground truth, and A-vs-B GSB.

    python -m rl.eval --model RUN_DIR [--against base] [--config FILE] [--set key=value ...]
                      [--per-task N] [--out DIR]

A and B are `base` (the configured base model, by default the shipped toy FLUX.1 Fill), a run
directory, a checkpoint or a model directory. Both edit the same held-out conditions (the synthetic
world's held-out split, or the `heldout` records of a JSONL file with data.source=jsonl) with the
same noise. The judge, data and sampler settings come from the run config (defaults: the built-in
job's). Writes report.md, report.json, dimensions.png, gsb.png, judge_vs_truth.png and
comparison grids into --out.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from core.config.loading import ConfigError
from core.synthetic.world import collate
from rl.evaluation.heldout import (
    EvalResult,
    generate_images,
    held_out_samples,
    score_images,
)
from rl.evaluation.report import (
    gsb_counts,
    markdown,
    model_section,
    paired_section,
    plot_dimensions,
    plot_gsb,
    plot_reward_vs_truth,
)
from rl.plumbing.builders import build_data, build_judge, rollout_sigmas
from rl.plumbing.config import RunConfig, load_config
from rl.plumbing.distributed import resolve_device
from rl.plumbing.model_ref import resolve_model
from rl.plumbing.run_log import sample_label, save_sample_grid


def _edit(spec: str, cfg: RunConfig, samples, device, label: str) -> tuple[torch.Tensor, str]:
    from tqdm import tqdm

    policy, weights, desc = resolve_model(spec, device, cfg.model, cfg.data.image_size)
    sigmas = rollout_sigmas(policy, cfg.sampler.eval_steps, cfg.sampler.shift)
    method = "euler" if cfg.sampler.method == "sde" else cfg.sampler.method
    with tqdm(total=len(samples), desc=f"sampling {label}", unit="img") as bar:
        images = generate_images(policy, samples, weights=weights, sigmas=sigmas, method=method,
                                 seed=cfg.train.seed + 12345, device=device, progress=bar)
    return images, desc


@torch.no_grad()
def pairwise_preference(judge, samples, a: torch.Tensor, b: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """P(A better than B) per condition, averaged over the task's dimensions. Position bias is the
    judge's business: with judge.both_orders it asks each question in both orders (the one place
    where "both orders" is decided)."""
    from rl.algorithms.reward_scoring import judge_images

    out = []
    for start in range(0, len(samples), batch):
        end = min(start + batch, len(samples))
        table = judge_images(judge, samples[start:end], a[start:end], mode="pairwise", others=b[start:end])
        out.append(table.per_image.detach().float().cpu())
    return torch.cat(out)


def evaluate_models(cfg: RunConfig, model: str, against: str | None, out_dir: Path, per_task: int,
                    usability_threshold: float = 0.6, gsb_margin: float = 0.05) -> dict[str, Any]:
    device = resolve_device(cfg.model.device)
    data = build_data(cfg.data)
    judge = build_judge(cfg.judge, device)
    samples = held_out_samples(data, data.tasks, per_task)
    out_dir.mkdir(parents=True, exist_ok=True)

    results: dict[str, EvalResult] = {}
    models: dict[str, str] = {}
    edits = {}
    for name, spec in (("B", against), ("A", model)):
        if spec is not None:
            edits[name], models[name] = _edit(spec, cfg, samples, device, name)
    # judge.eval_mode pairwise (a judge trained on comparisons only): each model against B
    others = edits["B"] if cfg.judge.eval_mode == "pairwise" else None
    for name in ("A", "B"):
        if name in edits:
            results[name] = score_images(judge, samples, edits[name], with_truth=data.has_truth,
                                         mode=cfg.judge.eval_mode, others=others)

    report: dict[str, Any] = {"models": models, "judge": f"{cfg.judge.kind} ({cfg.judge.eval_mode})",
                              "n_per_task": per_task, "usability_threshold": usability_threshold}
    for name, r in results.items():
        report[name] = model_section(r, usability_threshold)
    if "B" in results:
        report["paired"] = paired_section(results["A"], results["B"])
        pref = pairwise_preference(judge, samples, results["A"].images, results["B"].images)
        report["gsb"] = gsb_counts(pref, [s.task for s in samples], gsb_margin)
        report["gsb_margin"] = gsb_margin
        plot_gsb(report["gsb"], out_dir / "gsb.png")

    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    (out_dir / "report.md").write_text(markdown(report))
    plot_dimensions(report, out_dir / "dimensions.png")
    if data.has_truth:
        plot_reward_vs_truth(results, out_dir / "judge_vs_truth.png")
    _grids(samples, results, out_dir)
    return report


def _grids(samples, results: dict[str, EvalResult], out_dir: Path, rows_per_task: int = 4) -> None:
    """grid_<task>.png: source | mask | A | B, each row labelled with its task and prompt."""
    for task in dict.fromkeys(s.task for s in samples):
        idx = [i for i, s in enumerate(samples) if s.task == task][:rows_per_task]
        batch = collate([samples[i] for i in idx])
        save_sample_grid(out_dir / f"grid_{task}.png", batch.images, batch.masks,
                         {name: r.images[idx] for name, r in results.items()},
                         row_labels=[sample_label(samples[i].task, samples[i].prompt) for i in idx])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rl.eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="A: 'base', a run directory, a checkpoint or a model directory")
    p.add_argument("--against", help="B, compared with A (same forms as --model)")
    p.add_argument("--config", help="run config for judge, data and sampler (default: the built-in job's)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--per-task", type=int, default=32, help="held-out conditions per task (default 32)")
    p.add_argument("--usability", type=float, default=0.6, help="score every dimension must reach (default 0.6)")
    p.add_argument("--out", default=None, help="report directory (default: <model>/eval or eval-report)")
    args = p.parse_args(argv)
    try:
        config = args.config
        if config is None and Path(args.model, "config.yaml").is_file():
            config = str(Path(args.model, "config.yaml"))  # judge and data of the run being evaluated
        cfg = load_config(config, args.overrides)
    except (ConfigError, FileNotFoundError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if cfg.judge.eval_mode == "pairwise" and args.against is None:
        print("config error: judge.eval_mode is pairwise (each model's edits against another's): name that "
              "model with --against (e.g. --against base), or set judge.eval_mode=score", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else (Path(args.model) / "eval" if Path(args.model).is_dir() else Path("eval-report"))
    try:
        report = evaluate_models(cfg, args.model, args.against, out, args.per_task, args.usability)
    except (FileNotFoundError, ValueError) as e:
        print(f"[rl.eval] {e}", file=sys.stderr)
        return 1
    print(markdown(report))
    print(f"report written to {out}/report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
