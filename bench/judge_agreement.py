"""Does a judge rank the policy's own near-ties the way the ground truth does? Measure before RL.

    python bench/judge_agreement.py --config configs/tiny_onereward_nft.yaml --steps 5 [--set KEY=VALUE ...]

Makes `--steps` rollouts of a group algorithm's config (K conditions x G images from the base model,
exactly as training step 0, 1, ... would), takes the training judge's scores of every image (its
`judge.mode` question, pairwise against the group's anchor included) and the rule judge's absolute
scores of the same images (the synthetic world's annotator: what a learned judge was trained to
imitate), and reports per task the mean over groups of the Spearman rank correlation between the two.
A judge that is right on best-vs-worst pairs can still rank a group of near-identical edits at random;
group-normalised advantages then train on noise (docs/results.md). Only for data.source world.
"""
from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runnable from a checkout without installing
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402


def spearman(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """Rank correlation of two 1-D tensors (average ranks for ties); None when either is constant."""
    def ranks(x):
        order = x.argsort()
        r = torch.empty_like(x)
        r[order] = torch.arange(len(x), dtype=x.dtype)
        for v in x.unique():  # ties share their mean rank
            tied = x == v
            r[tied] = r[tied].mean()
        return r

    ra, rb = ranks(a.double()), ranks(b.double())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = (ra.norm() * rb.norm()).item()
    return None if denominator == 0 else float((ra * rb).sum() / denominator)


def agreement(cfg, steps: int) -> dict[str, dict[str, float]]:
    import rl.train
    from reward.judges.rule_judge import RuleJudge
    from rl.algorithms.reward_scoring import judge_images
    from rl.plumbing.distributed import init_distributed

    if cfg.data.source != "world":
        raise ValueError("judge agreement needs the synthetic world's rule judge: data.source must be world")
    if cfg.train.algorithm not in ("nft", "grpo", "awm"):
        raise ValueError(f"train.algorithm {cfg.train.algorithm!r} has no groups: use nft, grpo or awm")
    trainer = rl.train.make_trainer(cfg, init_distributed(cfg.model.device))
    rule = RuleJudge()
    per_task: dict[str, list[float]] = defaultdict(list)
    G = cfg.nft.group_size
    for step in range(steps):
        batch = trainer.rollout(step)
        judged = batch.judging.result()[0].per_image.detach().float().cpu()
        truth = judge_images(rule, batch.samples, batch.images, mode="score").per_image.detach().float().cpu()
        for g in range(len(batch.samples) // G):
            rows = slice(g * G, (g + 1) * G)
            rho = spearman(judged[rows], truth[rows])
            if rho is not None:
                per_task[batch.samples[g * G].task].append(rho)
    return {t: {"spearman": sum(v) / len(v), "groups": len(v)} for t, v in per_task.items()}


def main(argv: list[str] | None = None) -> int:
    from bench.judge_probe_cli import probe_config

    steps, cfg = probe_config(__doc__, "a group algorithm's run config (nft, grpo, awm)", 5,
                              "rollouts (each K groups of G images)", argv)
    result = agreement(cfg, steps)
    print(f"within-group Spearman(training judge, rule judge), {cfg.judge.kind} judge asked {cfg.judge.mode}:")
    for task, r in result.items():
        print(f"  {task:8s} {r['spearman']:+.3f} over {r['groups']} groups")
    return 0


if __name__ == "__main__":
    sys.exit(main())
