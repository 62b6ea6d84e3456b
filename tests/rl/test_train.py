"""End-to-end behaviour of `rl.train` on a small random toy FLUX.1 Fill (trained VAE): files, resume, faults."""
import json

import pytest
import torch

import rl.train
from reward.judge import JudgeError
from reward.judges.rule_judge import RuleJudge
from rl.plumbing.checkpoint import load_checkpoint
from rl.plumbing.config import load_config


def test_small_run_leaves_everything_a_user_expects(quick, tmp_path):
    from diffusers import FluxFillPipeline, FluxTransformer2DModel

    from core.policies.flux_fill import FluxFillPolicy

    cfg = load_config(None, quick(**{
        "train.eval_per_task": 2, "train.sample_every": 1, "train.tensorboard": True}))
    summary = rl.train.run(cfg, out_dir=tmp_path)
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "reward_curve.png", "time_split.png",
                 "samples/step-000000.png", "samples/step-000001.png", "eval_base.json", "eval_base.safetensors", "run.json", "latest"):
        assert (tmp_path / name).exists(), name
    assert list((tmp_path / "tensorboard").iterdir())
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [0, 1]
    for key in ("reward", "reward_by_task", "reward_by_task_dim", "kept_groups", "loss", "grad_norm",
                "time_rollout", "time_judge", "time_update", "images_per_second"):
        assert key in lines[0], key
    assert set(summary["by_task"]) == {"fill", "extend", "removal", "text"}
    assert summary["reward_gain"]["low"] <= summary["reward_gain"]["mean"] <= summary["reward_gain"]["high"]
    # the exported model loads with the libraries' own from_pretrained, and equals the EMA weights
    FluxTransformer2DModel.from_pretrained(tmp_path / "final" / "transformer")
    FluxFillPipeline.from_pretrained(tmp_path / "final")
    exported = FluxFillPolicy.from_pretrained(tmp_path / "final")
    ema = load_checkpoint(tmp_path)["ema"]
    for name, p in exported.trainable_parameters().items():
        assert torch.equal(p.detach(), ema[name]), name


def _final_state(path):
    return load_checkpoint(path)


@pytest.mark.parametrize("algorithm", ["nft", "refl", "grpo", "awm"])
def test_resume_gives_identical_weights(quick, tmp_path, algorithm):
    extra = {"train.algorithm": algorithm, "judge.mode": "pairwise" if algorithm == "refl" else "score",
             "refl.batch_size": 4, "sampler.method": "sde" if algorithm == "grpo" else "dpm2",
             "grpo.mini_batches": 2, "grpo.kl_coef": 0.04}
    straight = tmp_path / "straight"
    rl.train.run(load_config(None, quick(**extra, **{"train.steps": 4})), out_dir=straight)
    split = tmp_path / "split"
    rl.train.run(load_config(None, quick(**extra, **{"train.steps": 2})), out_dir=split)
    assert rl.train.main(["--resume", str(split), "--set", "train.steps=4"]) == 0
    a, b = _final_state(straight), _final_state(split)
    assert a["step"] == b["step"] == 3
    for key in ("weights", "old", "ema"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)
    steps = [json.loads(x)["step"] for x in (split / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3]


class FlakyJudge(RuleJudge):
    """Fails for good from the third call: an unreachable judge after its retries."""

    def __init__(self):
        super().__init__()
        self.calls = 0  # per instance: a rerun in the same process starts again at zero

    def score(self, requests, mode="score"):
        self.calls += 1
        if self.calls > 2:
            raise JudgeError("judge at http://127.0.0.1:9/v1 unreachable after 5 retries")
        return super().score(requests, mode)


def test_judge_failure_stops_with_a_checkpoint(quick, tmp_path, monkeypatch):
    monkeypatch.setattr(rl.train, "build_judge", lambda cfg, device: FlakyJudge())
    cfg = load_config(None, quick(**{"train.steps": 5, "train.checkpoint_every": 0}))
    with pytest.raises(rl.train.RunStopped, match="step 2 failed: judge at .* unreachable") as err:
        rl.train.run(cfg, out_dir=tmp_path)
    assert "--resume" in str(err.value)
    assert load_checkpoint(tmp_path)["step"] == 1  # the last completed step is saved


def test_repeated_nonfinite_losses_stop_the_run(quick, tmp_path, monkeypatch):
    from rl.algorithms.nft import NFTTrainer

    real = NFTTrainer.trained_velocity
    calls = {"n": 0}

    def diverging(self, x_t, t, cond):  # the trained forward blows up from the second step on
        v = real(self, x_t, t, cond)
        return v * float("nan") if self.step_index >= 1 else v

    monkeypatch.setattr(NFTTrainer, "trained_velocity", diverging)
    cfg = load_config(None, quick(**{"train.steps": 6, "train.max_bad_steps": 2}))
    with pytest.raises(rl.train.RunStopped, match="2 steps in a row had a non-finite loss"):
        rl.train.run(cfg, out_dir=tmp_path)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["nonfinite"] for m in lines] == [False, True, True]
    assert [m["skipped"] for m in lines] == [False, True, True]
    state = load_checkpoint(tmp_path)
    assert state["step"] == 2 and all(torch.isfinite(v).all() for v in state["weights"].values())


def test_missing_weights_fail_before_any_work(tmp_path, capsys):
    assert rl.train.main(["--set", f"model.path={tmp_path}/nope", "--out", str(tmp_path / "run")]) == 2
    assert "model.path not found" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_time_budget_stops_with_a_checkpoint_and_a_summary(quick, tmp_path):
    cfg = load_config(None, quick(**{"train.steps": 4, "train.checkpoint_every": 0, "train.time_budget_s": 1e-6}))
    summary = rl.train.run(cfg, out_dir=tmp_path)
    assert summary["steps"] == 1  # the budget is spent by the end of the first step
    assert load_checkpoint(tmp_path)["step"] == 0
    assert (tmp_path / "summary.json").exists()
