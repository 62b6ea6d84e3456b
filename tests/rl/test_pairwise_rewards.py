"""A judge trained on comparisons only (OneReward's) in every place a run asks it something:
group algorithms score each image against one anchor edit of its condition (judge.mode pairwise),
and held-out evaluations against the base model's edit (judge.eval_mode pairwise)."""
import json
import re

import pytest
import torch

import rl.eval
import rl.train
from reward.judges.rule_judge import RuleJudge
from rl.plumbing.config import load_config
from rl.plumbing.distributed import init_distributed


def _trainer(quick, **extra):
    torch.manual_seed(0)
    return rl.train.make_trainer(load_config(None, quick(**extra)), init_distributed("cpu"))


def test_a_group_shares_one_anchor_drawn_per_step_and_condition(quick):
    trainer = _trainer(quick, **{"judge.mode": "pairwise"})
    a, b = trainer.data.conditions(0, 0, 2)
    anchors = trainer.pairwise_anchors(0, [a, a, b, a])
    assert torch.equal(anchors[0], anchors[1]) and torch.equal(anchors[0], anchors[3])
    assert not torch.equal(anchors[0], anchors[2])
    # the same condition alone (another process's share of the group) gets the same anchor, up to
    # float results not being batch-size invariant
    assert torch.allclose(trainer.pairwise_anchors(0, [a])[0], anchors[0], atol=1e-4)
    # a new step draws new noise
    assert not torch.equal(trainer.pairwise_anchors(1, [a])[0], anchors[0])


def test_group_rewards_compare_each_image_with_its_anchor(quick, monkeypatch):
    """The judge sees every rollout image with its condition's anchor as `other`, and the step's
    scores are those comparisons."""
    seen = []
    score = RuleJudge.score

    def spy(self, requests, mode="score"):
        seen.append((mode, [r.other is not None for r in requests]))
        return score(self, requests, mode)

    monkeypatch.setattr(RuleJudge, "score", spy)
    trainer = _trainer(quick, **{"judge.mode": "pairwise"})
    metrics = trainer.train_step(0)
    assert seen and all(mode == "pairwise" and all(has) for mode, has in seen)
    assert 0.0 <= metrics["reward"] <= 1.0 and metrics["reward_std"] > 0


def test_pairwise_evaluation_scores_the_base_at_one_half(quick, tmp_path):
    run_dir = tmp_path / "run"
    cfg = load_config(None, quick(**{"judge.mode": "pairwise", "judge.eval_mode": "pairwise",
                                     "train.eval_per_task": 2, "train.steps": 2}))
    summary = rl.train.run(cfg, out_dir=run_dir)
    # the base against itself: (p + 1 - p) / 2 with the judge asking both orders
    assert all(t["base"] == pytest.approx(0.5, abs=1e-6) for t in summary["by_task"].values())
    assert summary["reward_base"] == pytest.approx(0.5, abs=1e-6)
    assert 0.0 <= summary["reward_final"] <= 1.0
    # rl.eval compares each model with --against's edits, so it needs --against
    assert rl.eval.main(["--model", str(run_dir), "--per-task", "1", "--out", str(tmp_path / "x")]) == 2
    out = tmp_path / "report"
    assert rl.eval.main(["--model", str(run_dir), "--against", "base", "--per-task", "1", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["judge"] == "rule (pairwise)"
    assert all(t["reward"]["mean"] == pytest.approx(0.5, abs=1e-6) for t in report["B"].values())


@pytest.mark.parametrize("override, message", [
    ("judge.eval_mode=score", r"trained on pairwise questions only.*score"),
    ("judge.show_crop=false", r"crop: trained True, asked False"),
])
def test_the_shipped_judge_is_asked_only_what_it_learned(quick, tmp_path, capsys, override, message):
    """configs/tiny_onereward.yaml's learned judge refuses, before any training, a question it was
    never trained on and a view of the images it never saw."""
    from pathlib import Path

    config = Path(__file__).parents[2] / "configs" / "tiny_onereward.yaml"
    argv = ["--config", str(config), "--out", str(tmp_path / "run")]
    for item in quick(**{"train.algorithm": "refl", "judge.mode": "pairwise", "monitor.every": 0}) + [override]:
        argv += ["--set", item]
    assert rl.train.main(argv) != 0
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
