import json

import pytest
import torch

import rl.plumbing.checkpoint
from rl.evaluation.stats import bootstrap_mean
from rl.plumbing.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from rl.plumbing.run_log import RunLog, read_metrics


def test_checkpoints_are_atomic_and_pruned(tmp_path, monkeypatch):
    for step in (4, 9, 14):
        save_checkpoint(tmp_path, step, {"w": torch.full((2,), float(step))}, "a: 1\n", keep=2)
    assert sorted(p.name for p in tmp_path.glob("ckpt-*")) == ["ckpt-000009", "ckpt-000014"]
    assert latest_checkpoint(tmp_path).name == "ckpt-000014"
    assert load_checkpoint(tmp_path)["w"][0] == 14

    # a crash while writing leaves the previous checkpoint as the latest, and no partial directory
    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(rl.plumbing.checkpoint, "save_tree", boom)
    with pytest.raises(rl.plumbing.checkpoint.CheckpointError, match="disk full"):
        save_checkpoint(tmp_path, 19, {"w": torch.zeros(2)}, "a: 1\n")
    assert latest_checkpoint(tmp_path).name == "ckpt-000014"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


def test_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        load_checkpoint(tmp_path)


def test_run_log_resume_drops_redone_steps(tmp_path):
    log = RunLog(tmp_path, tensorboard=False)
    for s in range(5):
        log.log(s, {"reward": 0.1 * s, "reward_by_task": {"fill": 0.2}, "kl": None})
    log.close()
    log = RunLog(tmp_path, tensorboard=False, resume_step=2)
    log.log(3, {"reward": 1.0})
    log.close()
    steps = [m["step"] for m in read_metrics(tmp_path / "metrics.jsonl")]
    assert steps == [0, 1, 2, 3]
    assert "kl" not in json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])


def test_bootstrap_interval_covers_and_separates():
    g = torch.Generator().manual_seed(0)
    around_zero = bootstrap_mean(torch.randn(200, generator=g) * 0.1)
    assert around_zero.low < 0 < around_zero.high
    positive = bootstrap_mean(0.05 + torch.randn(200, generator=g) * 0.05)
    assert 0 < positive.low < 0.05 < positive.high
