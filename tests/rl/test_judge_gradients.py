"""bench/judge_gradients.py: does ReFL's step up a judge go up the rule judge (the annotator)?"""
import math

import pytest

import rl.train
from bench import judge_gradients
from reward.judges.rule_judge import RuleJudge
from rl.plumbing.config import load_config

pytestmark = pytest.mark.usefixtures("one_thread")  # the tiny judge's backward (tests/rl/conftest.py)


def test_the_rule_judge_is_aligned_with_itself(quick):
    cfg = load_config(None, quick(**{"train.algorithm": "refl", "judge.mode": "pairwise", "refl.batch_size": 4}))
    r = judge_gradients.gradients(cfg, steps=1)
    assert r["alignment"] == pytest.approx(1.0, abs=1e-5)
    assert r["consistency"] == pytest.approx(r["rule_consistency"], abs=1e-5) and r["consistency"] < 1 - 1e-4
    assert set(r["colour"]) <= {"fill", "extend", "removal", "text"} and r["colour"]


class ContraryJudge(RuleJudge):
    """Prefers what the rule judge does not: P(a beats b) = 1 - the rule judge's."""

    def score(self, requests, mode="score"):
        return 1 - super().score(requests, mode)


def test_a_judge_against_the_annotator_has_alignment_minus_one(quick, monkeypatch):
    monkeypatch.setattr(rl.train, "build_judge", lambda cfg, device: ContraryJudge())
    cfg = load_config(None, quick(**{"train.algorithm": "refl", "judge.mode": "pairwise", "refl.batch_size": 4}))
    r = judge_gradients.gradients(cfg, steps=1)
    assert r["alignment"] == pytest.approx(-1.0, abs=1e-5)


def test_a_learned_judge_is_measured(quick):
    cfg = load_config(None, quick(**{"train.algorithm": "refl", "judge.mode": "pairwise", "refl.batch_size": 4,
                                     "judge.kind": "transformers", "judge.model": "builtin:tiny-judge",
                                     "judge.eval_mode": "pairwise", "judge.dtype": "float32", "judge.show_crop": True}))
    r = judge_gradients.gradients(cfg, steps=1)
    assert all(math.isfinite(r[k]) and -1 <= r[k] <= 1 for k in ("alignment", "consistency", "rule_consistency"))
    with pytest.raises(ValueError, match="use refl"):
        judge_gradients.gradients(load_config(None, quick()), steps=1)
