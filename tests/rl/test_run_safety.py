"""Nothing lost, nothing silently wrong: run directories, resume guards, non-finite weights, files."""
import errno
import json

import pytest
import torch

import rl.evaluation.in_run
import rl.plumbing.checkpoint
import rl.train
from core.io.tensor_store import load_tree, save_tree
from reward.judge import JudgeError
from reward.judges.rule_judge import RuleJudge
from rl.plumbing.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from rl.plumbing.config import load_config


def _args(quick, **extra):
    return [x for kv in quick(**extra) for x in ("--set", kv)]


def test_a_reused_out_is_refused_and_fresh_moves_the_old_run_aside(quick, tmp_path, capsys):
    out = tmp_path / "run"
    assert rl.train.main([*_args(quick), "--out", str(out)]) == 0
    before = {p.name for p in out.iterdir()}
    weights = load_checkpoint(out)["weights"]

    assert rl.train.main([*_args(quick, **{"train.seed": 1}), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and f"--resume {out}" in err and "--fresh" in err
    assert {p.name for p in out.iterdir()} == before  # untouched
    for name, w in load_checkpoint(out)["weights"].items():
        assert torch.equal(w, weights[name])

    assert rl.train.main([*_args(quick, **{"train.seed": 1}), "--out", str(out), "--fresh"]) == 0
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.replaced-")]
    assert len(aside) == 1 and {p.name for p in aside[0].iterdir()} == before
    assert json.loads((out / "run.json").read_text())["run_id"] != json.loads((aside[0] / "run.json").read_text())["run_id"]
    # the new run's steps only: nothing of the old one mixed in
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [0, 1]


def test_a_checkpoint_of_another_run_is_not_resumed(quick, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    rl.train.run(load_config(None, quick()), out_dir=a)
    rl.train.run(load_config(None, quick()), out_dir=b)
    (b / "run.json").write_text((a / "run.json").read_text())  # a directory mixed by hand
    with pytest.raises(rl.train.RunDirError, match="belongs to another run"):
        rl.train.run(load_config(None, quick(**{"train.steps": 3})), resume=b)


@pytest.mark.parametrize("change, key", [
    ("data.world_seed=1", "data.world_seed (0 -> 1)"),
    ("train.eval_per_task=2", "train.eval_per_task (0 -> 2)"),
    ("nft.beta=0.5", "nft.beta (1.0 -> 0.5)"),
])
def test_resume_refuses_changes_to_what_was_trained_or_evaluated(quick, tmp_path, capsys, change, key):
    rl.train.run(load_config(None, quick()), out_dir=tmp_path)
    assert rl.train.main(["--resume", str(tmp_path), "--set", "train.steps=3", "--set", change]) == 2
    err = capsys.readouterr().err
    assert "a resume cannot change" in err and key in err and "--out NEW_DIR" in err
    assert load_checkpoint(tmp_path)["step"] == 1


def test_resuming_a_finished_run_says_so(quick, tmp_path, capsys):
    rl.train.run(load_config(None, quick()), out_dir=tmp_path)
    assert rl.train.main(["--resume", str(tmp_path)]) == 2
    assert "already finished its 2 steps" in capsys.readouterr().err


def test_a_stored_base_evaluation_is_reused_only_for_the_same_settings(quick, tmp_path, monkeypatch):
    from rl.evaluation import run_summary as summary

    cfg = load_config(None, quick(**{"train.eval_per_task": 1, "train.steps": 1}))
    rl.train.run(cfg, out_dir=tmp_path)
    calls = []
    real = summary.evaluate_weights
    monkeypatch.setattr(summary, "evaluate_weights", lambda *a: calls.append(a[2]) or real(*a))
    trainer = rl.train.make_trainer(cfg, rl.train.init_distributed("cpu"))
    rl.evaluation.in_run.cached_base_eval(trainer, tmp_path)
    assert calls == []  # same settings: the stored result
    other = load_config(None, quick(**{"train.eval_per_task": 1, "data.world_seed": 3}))
    rl.evaluation.in_run.cached_base_eval(rl.train.make_trainer(other, rl.train.init_distributed("cpu")), tmp_path)
    assert calls == ["base"]  # another world: evaluated again, never paired across worlds


def test_nonfinite_weights_stop_the_run_and_are_never_checkpointed(quick, tmp_path, monkeypatch):
    real_step = torch.optim.AdamW.step

    def poisoned(self, *a, **k):  # the third update (step 2) leaves a NaN in the weights
        out = real_step(self, *a, **k)
        poisoned.calls += 1
        if poisoned.calls == 3:
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("nan")
        return out

    poisoned.calls = 0
    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned)
    cfg = load_config(None, quick(**{"train.steps": 5}))
    with pytest.raises(rl.train.RunStopped, match="step 2's update made the weights non-finite") as err:
        rl.train.run(cfg, out_dir=tmp_path)
    assert "ckpt-000001" in str(err.value) and "--resume" in str(err.value)
    assert latest_checkpoint(tmp_path).name == "ckpt-000001"
    state = load_checkpoint(tmp_path)
    assert not rl.plumbing.checkpoint.nonfinite_copies(state)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["weights_nonfinite"] for m in lines] == [False, False, True]


def test_no_checkpoint_is_written_with_nonfinite_weights(tmp_path):
    good = {"weights": {"w": torch.ones(2)}, "ema": {"w": torch.ones(2)}}
    save_checkpoint(tmp_path, 0, good, "a: 1\n")
    for copy in ("weights", "old", "ema", "ref"):
        bad = {**good, copy: {"w": torch.tensor([1.0, float("inf")])}}
        with pytest.raises(CheckpointError, match=f"non-finite weights in \\['{copy}/w'\\]"):
            save_checkpoint(tmp_path, 1, bad, "a: 1\n")
    assert latest_checkpoint(tmp_path).name == "ckpt-000000"


class _DeadJudge(RuleJudge):
    def score(self, requests, mode="score"):
        raise JudgeError("judge at http://127.0.0.1:9/v1 unreachable after 5 retries")


def test_a_failure_before_any_checkpoint_does_not_advise_resume(quick, tmp_path, monkeypatch):
    monkeypatch.setattr(rl.train, "build_judge", lambda cfg, device: _DeadJudge())
    with pytest.raises(rl.train.RunStopped) as err:
        rl.train.run(load_config(None, quick()), out_dir=tmp_path)
    assert "No checkpoint exists yet" in str(err.value) and "--resume" not in str(err.value)
    assert latest_checkpoint(tmp_path) is None


def test_an_unreachable_judge_is_one_line_and_claims_no_directory(quick, tmp_path, monkeypatch, capsys):
    def unreachable(cfg, device):
        raise JudgeError("judge server http://127.0.0.1:9/v1 did not list its models; is it running?")

    monkeypatch.setattr(rl.train, "build_judge", unreachable)
    out = tmp_path / "run"
    assert rl.train.main([*_args(quick), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("[rl.train] stopped: judge server") and not any("Traceback" in x for x in err)
    assert not out.exists()  # a corrected rerun with the same --out is not refused


def test_a_full_disk_is_one_clear_line(quick, tmp_path, monkeypatch, capsys):
    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(rl.plumbing.checkpoint, "save_tree", full)
    assert rl.train.main([*_args(quick), "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert any("no space left on the device" in line for line in err)
    assert not any(line.startswith("Traceback") for line in err)


def test_checkpoints_hold_no_pickle_and_round_trip_exactly(quick, tmp_path):
    rl.train.run(load_config(None, quick()), out_dir=tmp_path)
    ckpt = latest_checkpoint(tmp_path)
    assert sorted(p.name for p in ckpt.iterdir()) == ["config.yaml", "state.json", "state.safetensors"]
    assert not list(tmp_path.rglob("*.pt")) and not list(tmp_path.rglob("*.pkl"))
    state = load_checkpoint(ckpt)
    (tmp_path / "copy").mkdir()
    save_tree(state, tmp_path / "copy")
    again = load_tree(tmp_path / "copy")
    assert again["rng"]["python"] == state["rng"]["python"]
    assert isinstance(again["rng"]["python"], tuple) and isinstance(again["rng"]["numpy"], tuple)
    assert set(again["optimizer"]["state"]) == set(state["optimizer"]["state"])  # int keys kept
    for key in ("weights", "ema", "old", "ref"):
        for name, v in state[key].items():
            assert torch.equal(again[key][name], v)


def test_stale_temporaries_of_a_killed_writer_are_removed_on_resume(quick, tmp_path):
    rl.train.run(load_config(None, quick()), out_dir=tmp_path)
    stale = tmp_path / ".tmp-ckpt-000002-abcd"
    stale.mkdir()
    (stale / "state.safetensors").write_bytes(b"partial")
    rl.train.run(load_config(None, quick(**{"train.steps": 3})), resume=tmp_path)
    assert not stale.exists()
    assert load_checkpoint(tmp_path)["step"] == 2


def test_metrics_are_strict_json(tmp_path):
    from rl.plumbing.run_log import RunLog

    log = RunLog(tmp_path, tensorboard=False)
    log.log(0, {"grad_norm": float("nan"), "loss": float("inf"), "by": {"a": float("-inf"), "b": 1.0}})
    log.close()
    line = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in line and "Infinity" not in line
    record = json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c} in metrics.jsonl"))
    assert record["grad_norm"] is None and record["by"] == {"a": None, "b": 1.0}
