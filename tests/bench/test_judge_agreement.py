"""bench/judge_agreement.py: within-group rank agreement of a training judge with the rule judge."""
import pytest
import torch

from bench import judge_agreement
from rl.plumbing.config import load_config


def test_spearman_handles_ties_and_constants():
    assert judge_agreement.spearman(torch.tensor([1.0, 2, 3, 4]), torch.tensor([10.0, 20, 30, 40])) == pytest.approx(1)
    assert judge_agreement.spearman(torch.tensor([1.0, 2, 3, 4]), torch.tensor([4.0, 3, 2, 1])) == pytest.approx(-1)
    assert judge_agreement.spearman(torch.tensor([1.0, 1, 2, 3]), torch.tensor([1.0, 2, 3, 4])) == pytest.approx(
        0.9486833)  # average ranks for the tie
    assert judge_agreement.spearman(torch.tensor([1.0, 1, 1]), torch.tensor([1.0, 2, 3])) is None


def test_the_rule_judge_asked_pairwise_agrees_with_itself_asked_for_scores():
    """On the shipped toy: the rule judge against each group's anchor ranks the group as its own
    absolute scores do (not exactly: a pairwise answer is not a monotone map of the score difference)."""
    cfg = load_config(None, ["train.algorithm=nft", "judge.mode=pairwise", "nft.groups_per_step=4",
                             "train.progress=false"])
    result = judge_agreement.agreement(cfg, steps=1)
    assert set(result) <= {"fill", "extend", "removal", "text"} and result
    groups = sum(r["groups"] for r in result.values())
    mean = sum(r["spearman"] * r["groups"] for r in result.values()) / groups
    assert mean > 0.5
    with pytest.raises(ValueError, match="has no groups"):
        judge_agreement.agreement(load_config(None, []), steps=1)
