"""bench/judge_gradients.py: does ReFL's step up a judge go up the rule judge (the annotator)?"""
import pytest

from bench import judge_gradients
from rl.plumbing.config import load_config

pytestmark = pytest.mark.usefixtures("one_thread")  # the tiny judge's backward (tests/rl/conftest.py)


def test_the_rule_judge_is_aligned_with_itself(quick):
    cfg = load_config(None, quick(**{"train.algorithm": "refl", "judge.mode": "pairwise", "refl.batch_size": 4}))
    r = judge_gradients.gradients(cfg, steps=1)
    assert r["alignment"] == pytest.approx(1.0, abs=1e-5)
    assert r["consistency"] == pytest.approx(r["rule_consistency"], abs=1e-5) and r["consistency"] < 1 - 1e-4
    assert set(r["colour"]) <= {"fill", "extend", "removal", "text"} and r["colour"]


def test_a_learned_judge_is_measured_against_the_rule_judge(quick):
    cfg = load_config(None, quick(**{"train.algorithm": "refl", "judge.mode": "pairwise", "refl.batch_size": 4,
                                     "judge.kind": "transformers", "judge.model": "builtin:tiny-judge",
                                     "judge.eval_mode": "pairwise", "judge.dtype": "float32", "judge.show_crop": True}))
    r = judge_gradients.gradients(cfg, steps=1)
    assert -1 <= r["alignment"] < 0.99 and -1 <= r["consistency"] <= 1
    with pytest.raises(ValueError, match="use refl"):
        judge_gradients.gradients(load_config(None, quick()), steps=1)
