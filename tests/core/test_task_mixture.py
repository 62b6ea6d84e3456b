"""TaskMixture: independent draws, and balanced batches that hold every task in proportion."""
import collections
import random
from pathlib import Path

import pytest

from core.tasks import TaskMixture
from rl.plumbing.config import load_config
from rl.plumbing.data import WorldData

REPO = Path(__file__).resolve().parents[2]
FIVE = {"recolour": 0.2, "remove_named": 0.2, "add": 0.2, "retext": 0.2, "restyle": 0.2}


@pytest.mark.parametrize("n", [5, 12, 13, 48])
def test_balanced_batches_hold_each_task_floor_or_ceil_of_its_share(n):
    weights = {"recolour": 0.1, "remove_named": 0.2, "add": 0.3, "retext": 0.15, "restyle": 0.25}
    mix, rng = TaskMixture(weights), random.Random(0)
    for _ in range(200):
        counts = collections.Counter(mix.sample(rng, n, balanced=True))
        assert sum(counts.values()) == n
        for task, w in weights.items():
            assert int(n * w) <= counts[task] <= int(n * w) + 1, (task, counts)


def test_balanced_remainders_follow_the_fractions_and_the_order_is_shuffled():
    mix, rng = TaskMixture({"fill": 0.5, "text": 0.3, "removal": 0.2}), random.Random(1)
    extra = collections.Counter()
    firsts = collections.Counter()
    for _ in range(3000):
        tasks = mix.sample(rng, 3, balanced=True)  # exact 1.5 / 0.9 / 0.6: one fill, then 2 of the fractions
        firsts[tasks[0]] += 1
        c = collections.Counter(tasks)
        assert c["fill"] >= 1
        extra.update({t: c[t] - (1 if t == "fill" else 0) for t in c})
    # the two remaining slots go to the fractions 0.5 / 0.9 / 0.6 without replacement
    assert extra["text"] > extra["removal"] > extra["fill"] > 0
    assert len(firsts) == 3  # not always in the mixture's order


def test_independent_draws_are_unchanged_by_the_new_option():
    mix = TaskMixture(FIVE)
    a = mix.sample(random.Random(7), 40)
    b = random.Random(7).choices(list(FIVE), weights=[0.2] * 5, k=40)
    assert a == b


def test_a_zero_weight_task_is_never_drawn_in_balanced_batches():
    mix, rng = TaskMixture({"fill": 1.0, "text": 0.0}), random.Random(0)
    assert set(mix.sample(rng, 9, balanced=True)) == {"fill"}


def test_world_data_reads_the_config_key():
    cfg = load_config(str(REPO / "configs" / "tiny_edit_nft.yaml"), ["data.balanced_tasks=true"])
    from rl.plumbing.builders import build_data

    data = build_data(cfg.data)
    assert isinstance(data, WorldData) and data.balanced
    for step in range(5):
        counts = collections.Counter(s.task for s in data.conditions(0, step, 12))
        assert set(counts) == set(FIVE) and min(counts.values()) == 2
