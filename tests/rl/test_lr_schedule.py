"""The learning-rate factor and that the trainer applies it at every optimiser step."""
import json
import math

import pytest

import rl.train
from rl.algorithms.lr_schedule import lr_factor
from rl.plumbing.config import ConfigError, load_config


def test_warmup_then_constant():
    assert [lr_factor(s, 10, warmup=4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


@pytest.mark.parametrize("decay", ["cosine", "linear"])
def test_decay_runs_from_one_to_the_floor(decay):
    f = [lr_factor(s, 101, warmup=10, decay=decay, min_ratio=0.2) for s in range(101)]
    assert f[9] == 1.0 and f[10] == 1.0
    assert f[100] == pytest.approx(0.2)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))  # never rises after the warm-up
    mid = 0.2 + 0.8 * (0.5 if decay == "linear" else 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f[55] == pytest.approx(mid)


def test_unknown_decay_is_named():
    with pytest.raises(ValueError, match="'step'"):
        lr_factor(0, 10, decay="step")
    with pytest.raises(ConfigError, match="optim.min_lr_ratio"):
        load_config(None, ["optim.min_lr_ratio=1.5"])


def test_trainer_logs_the_scheduled_rate(quick, tmp_path):
    cfg = load_config(None, quick(**{"train.steps": 3, "optim.lr": 1e-3, "optim.decay": "linear",
                                     "optim.min_lr_ratio": 0.5}))
    rl.train.run(cfg, out_dir=tmp_path)
    lrs = [json.loads(x)["lr"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lrs == pytest.approx([1e-3, 0.75e-3, 0.5e-3])
