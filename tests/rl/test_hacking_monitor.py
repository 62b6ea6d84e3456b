"""The reward-hacking monitor (monitor.* keys, rl/evaluation/monitor.py): the detector on made-up
curves, its config errors, and its wiring into rl.train (metrics, TensorBoard, best/, stop, resume)."""
import json

import pytest
import torch
from toy_judges import RedJudge

import rl.evaluation.monitor as monitor_mod
import rl.train
from core.config.loading import ConfigError
from rl.evaluation.monitor import (
    BEST_DIR,
    BEST_FILE,
    detect_hacking,
    monitor_score,
    reconcile_best,
    recover_best_dir,
    window_change,
)
from rl.plumbing.checkpoint import load_checkpoint
from rl.plumbing.config import load_config
from rl.plumbing.run_dir import check_resume_config

TOL = {"shape_acc": 0.05, "object_iou": 0.05, "glyph_acc": 0.05, "psnr_mask": 0.5, "judge": 0.01}


def curves(judge: dict[str, list[float]], signal: dict[str, dict[str, list[float]]], first_step: int = -1):
    """A monitor history from per-task curves (one value per evaluation, the first the base)."""
    n = len(next(iter(judge.values())))
    return [{"step": first_step + i, "judge": {t: v[i] for t, v in judge.items()},
             "signal": {t: {m: v[i] for m, v in ms.items()} for t, ms in signal.items()}} for i in range(n)]


# -- the detector on made-up curves ------------------------------------------------------------------


def test_window_change_is_the_trend_and_ignores_one_outlier():
    assert window_change([0, 1, 2, 3, 4], [0.5, 0.6, 0.7, 0.8, 0.9]) == pytest.approx(0.4)
    assert window_change([-1, 9, 19], [1.0, 2.0, 3.0]) == pytest.approx(2.0)  # uneven steps: per step, times span
    for where in range(5):  # one outlying evaluation anywhere among five flat ones
        values = [0.5] * 5
        values[where] = 0.0
        assert window_change(range(5), values) == 0.0, where
    assert window_change([0, 1], [float("nan"), 1.0]) is None


def test_fires_when_the_judge_rises_and_the_truth_falls():
    history = curves({"fill": [0.30, 0.32, 0.34, 0.36, 0.38]},
                     {"fill": {"shape_acc": [0.40, 0.36, 0.32, 0.28, 0.24], "object_iou": [0.7] * 5}})
    events = detect_hacking(history, window=5, judge_rise=0.01, tolerance=TOL)
    assert [(e.task, e.metric) for e in events] == [("fill", "shape_acc")]
    e = events[0]
    assert e.judge_change == pytest.approx(0.08) and e.signal_change == pytest.approx(-0.16)
    assert (e.from_step, e.to_step, e.evaluations, e.tolerance) == (-1, 3, 5, 0.05)
    assert "fill" in e.message() and "shape_acc" in e.message() and "-0.160" in e.message()


def test_quiet_when_both_rise_or_too_few_evaluations():
    both_rise = curves({"fill": [0.30, 0.32, 0.34, 0.36, 0.38]}, {"fill": {"shape_acc": [0.4, 0.45, 0.5, 0.55, 0.6]}})
    assert detect_hacking(both_rise, 5, 0.01, TOL) == []
    diverging = curves({"fill": [0.30, 0.32, 0.34, 0.36]}, {"fill": {"shape_acc": [0.4, 0.3, 0.2, 0.1]}})
    assert detect_hacking(diverging, 5, 0.01, TOL) == []  # four evaluations, a window of five
    assert len(detect_hacking(diverging, 4, 0.01, TOL)) == 1
    flat_judge = curves({"fill": [0.30, 0.302, 0.30, 0.303, 0.304]}, {"fill": {"shape_acc": [0.4, 0.3, 0.2, 0.1, 0.0]}})
    assert detect_hacking(flat_judge, 5, 0.01, TOL) == []  # the truth falls, but the judge is not rewarding it


def test_quiet_on_a_single_noisy_dip():
    for where in (1, 2, 4):  # the newest evaluation included: the one a least-squares slope weighs most
        truth = [0.40] * 5
        truth[where] = 0.05
        history = curves({"fill": [0.30, 0.32, 0.34, 0.36, 0.38]}, {"fill": {"shape_acc": truth}})
        assert detect_hacking(history, 5, 0.01, TOL) == [], where


def test_per_task_and_in_each_metric_s_own_units():
    judge = {t: [0.3, 0.32, 0.34, 0.36, 0.38] for t in ("fill", "extend", "removal", "text")}
    signal = {"fill": {"shape_acc": [0.5, 0.5, 0.5, 0.5, 0.5], "object_iou": [0.7, 0.67, 0.64, 0.61, 0.58]},
              "extend": {"psnr_mask": [21.0, 20.9, 20.8, 20.7, 20.6]},      # -0.4 dB: within 0.5 dB
              "removal": {"psnr_mask": [32.0, 31.8, 31.6, 31.4, 31.2]},     # -0.8 dB: beyond
              "text": {"glyph_acc": [0.2, 0.3, 0.4, 0.5, 0.6]}}
    events = detect_hacking(curves(judge, signal), 5, 0.01, TOL)
    assert sorted((e.task, e.metric) for e in events) == [("fill", "object_iou"), ("removal", "psnr_mask")]
    judge["removal"] = [0.3, 0.29, 0.28, 0.27, 0.26]  # the judge falls with the truth: honest, not hacking
    assert [e.task for e in detect_hacking(curves(judge, signal), 5, 0.01, TOL)] == ["fill"]


def test_score_counts_tolerances_per_task():
    base = curves({"fill": [0.3], "extend": [0.3]},
                  {"fill": {"shape_acc": [0.4], "object_iou": [0.6]}, "extend": {"psnr_mask": [20.0]}})[0]
    point = curves({"fill": [0.3], "extend": [0.3]},
                   {"fill": {"shape_acc": [0.5], "object_iou": [0.6]}, "extend": {"psnr_mask": [19.0]}})[0]
    # fill: (+2 tolerances + 0) / 2 = +1; extend: -2; the mean of the tasks
    assert monitor_score(point, base, TOL) == pytest.approx(-0.5)
    assert monitor_score(base, base, TOL) == 0.0


def test_best_dir_of_redone_steps_is_removed_and_an_interrupted_swap_recovered(tmp_path):
    best = tmp_path / BEST_DIR
    best.mkdir()
    (best / BEST_FILE).write_text(json.dumps({"step": 5}))
    reconcile_best(tmp_path, 5)
    assert best.is_dir()
    reconcile_best(tmp_path, 3)  # exported after the checkpoint being resumed
    assert not best.exists()
    aside = tmp_path / ".old-best-1234"
    aside.mkdir()
    (tmp_path / ".tmp-best-x").mkdir()
    recover_best_dir(tmp_path)
    assert best.is_dir() and not aside.exists() and not (tmp_path / ".tmp-best-x").exists()


# -- config ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, message", [
    (["monitor.every=5", "monitor.window=1"], "monitor.window must be in [2, inf)"),
    (["monitor.every=-1"], "monitor.every must be in [0, inf)"),
    (["monitor.every=5", "monitor.per_task=0"], "monitor.per_task must be in [1, inf)"),
    (["monitor.every=5", "monitor.drop_fraction=2"], "monitor.drop_fraction must be in [0, 1]"),
    (["monitor.every=5", "monitor.signal=judge"], "monitor.signal 'judge' needs a second judge"),
    (["monitor.every=5", "monitor.judge.kind=rule"], "monitor.judge is set but monitor.signal is 'truth'"),
    (["monitor.every=5", "monitor.signal=judge", "monitor.judge.kind=openai"],
     "monitor.judge.kind 'openai' needs monitor.judge.base_url"),
    (["monitor.every=5", "monitor.signal=judge", "monitor.judge.mode=yesno"], "monitor.judge.mode is not used"),
    (["monitor.every=5", "monitor.signal=judge", "monitor.judge.batch_size=0"],
     "monitor.judge.batch_size must be in [1, inf)"),
])
def test_bad_monitor_settings_are_named(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        load_config(None, overrides)


def test_truth_on_data_without_ground_truth_is_refused_before_any_work(tmp_path, capsys):
    data = tmp_path / "edits.jsonl"
    data.write_text("")
    jsonl = ["data.source=jsonl", f"data.jsonl={data}", "judge.kind=openai", "judge.base_url=http://x/v1",
             "judge.model=m"]
    load_config(None, jsonl)  # the monitor is off: its default signal does not matter
    with pytest.raises(ConfigError, match="monitor.signal 'truth' needs ground truth.*monitor.signal=judge"):
        load_config(None, jsonl + ["monitor.every=5"])
    out = tmp_path / "run"
    argv = ["--out", str(out)] + [x for o in jsonl + ["monitor.every=5"] for x in ("--set", o)]
    assert rl.train.main(argv) == 2
    assert "monitor.signal=judge" in capsys.readouterr().err and not out.exists()
    # with a second judge instead, the config is accepted
    load_config(None, jsonl + ["monitor.every=5", "monitor.signal=judge", "monitor.judge.kind=openai",
                               "monitor.judge.base_url=http://y/v1", "monitor.judge.model=other"])


def test_data_without_held_out_conditions_is_refused():
    from rl.evaluation.monitor import HackingMonitor

    class NoHeldOut:
        tasks = ("fill", "text")

        def held_out(self, task, n):
            return []

    with pytest.raises(ConfigError, match='monitor.every needs held-out conditions.*"split": "heldout"'):
        HackingMonitor.check_data(NoHeldOut())


def test_a_resume_may_change_what_a_warning_does_not_what_is_measured():
    stored = load_config(None, ["monitor.every=5"])
    check_resume_config(stored, load_config(None, ["monitor.every=5", "monitor.stop_on_hacking=true"]))
    with pytest.raises(ConfigError, match="monitor.window"):
        check_resume_config(stored, load_config(None, ["monitor.every=5", "monitor.window=3"]))


# -- wiring into rl.train ---------------------------------------------------------------------------------

#: the made-up fill shape accuracy after k updates (k = 0: the base model): better, then worse
SHAPE = [0.4, 0.5, 0.6, 0.5, 0.4, 0.3, 0.2]


def _diverging(real):
    """evaluate_point that runs the real evaluation, then replaces its numbers by curves that depend
    only on the number of updates (so a resumed run sees the same): every task's judge rises by 0.02
    per update; fill's shape accuracy follows SHAPE, every other signal stays at the base's value."""
    def fake(trainer, weights, label, mcfg, second_judge):
        point, result = real(trainer, weights, label, mcfg, second_judge)
        k = 0 if weights is trainer.ref else trainer.step_index + 1
        judge = {t: 0.3 + 0.02 * k for t in point["judge"]}
        signal = {t: {m: (SHAPE[k] if (t, m) == ("fill", "shape_acc") else 0.5) for m in ms}
                  for t, ms in point["signal"].items()}
        return {"judge": judge, "signal": signal}, result
    return fake


def _argv(out, overrides):
    return ["--out", str(out)] + [x for o in overrides for x in ("--set", o)]


def _records(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_divergence_warns_keeps_the_best_model_and_stops_resumably(quick, tmp_path, monkeypatch, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from core.policies.flux_fill import FluxFillPolicy

    monkeypatch.setattr(monitor_mod, "evaluate_point", _diverging(monitor_mod.evaluate_point))
    settings = {"train.steps": 6, "monitor.every": 1, "monitor.per_task": 1, "monitor.window": 3,
                "train.keep_checkpoints": 0, "train.tensorboard": True}
    # uninterrupted: warnings at steps 3, 4, 5 (the shape accuracy falls over the last 3 evaluations)
    straight = tmp_path / "straight"
    assert rl.train.main(_argv(straight, quick(**settings))) == 0
    err = capsys.readouterr().err
    assert "reward hacking? fill" in err and "shape_acc" in err
    records = _records(straight)
    hacking = {m["step"]: m["monitor/hacking"] for m in records if "monitor/hacking" in m}
    assert sorted(hacking) == [3, 4, 5]
    event = hacking[3][0]
    assert (event["task"], event["metric"], event["from_step"], event["to_step"]) == ("fill", "shape_acc", 1, 3)
    assert event["judge_change"] == pytest.approx(0.04) and event["signal_change"] == pytest.approx(-0.2)
    assert [m["monitor/hacking_warnings"] for m in records] == [0, 0, 0, 1, 1, 1]
    # best: step 1 (shape accuracy 0.6), exported whole and equal to that step's EMA
    record = json.loads((straight / BEST_DIR / BEST_FILE).read_text())
    assert record["step"] == 1 and record["beats_base"] and record["signal_by_task"]["fill"]["shape_acc"] == 0.6
    assert record["score"] == pytest.approx((0.6 - 0.4) / 0.1 / 2 / 4)  # fill's two signals, four tasks
    exported = FluxFillPolicy.from_pretrained(straight / BEST_DIR)
    ema = load_checkpoint(straight / "ckpt-000001")["ema"]
    for name, p in exported.trainable_parameters().items():
        assert torch.equal(p.detach(), ema[name]), name
    assert (straight / "monitor.png").stat().st_size > 0
    summary = json.loads((straight / "summary.json").read_text())["monitor"]
    assert summary["best"]["step"] == 1 and len(summary["warnings"]) == 3 and summary["stopped_on_hacking_at"] is None
    tags = EventAccumulator(str(straight / "tensorboard")).Reload().Tags()["scalars"]
    assert {"monitor/score", "monitor/judge_by_task/fill", "monitor/signal_by_task/fill/shape_acc"} <= set(tags)

    # stop_on_hacking: a clean stop at the first warning, with a checkpoint of that step
    stopped = tmp_path / "stopped"
    assert rl.train.main(_argv(stopped, quick(**settings, **{"monitor.stop_on_hacking": "true"}))) == 0
    err = capsys.readouterr().err
    assert "stopped on reward hacking at step 3" in err
    assert f"{stopped / BEST_DIR} (step 1" in err and "--set monitor.stop_on_hacking=false" in err
    assert load_checkpoint(stopped)["step"] == 3
    assert [m["step"] for m in _records(stopped)] == [0, 1, 2, 3]
    assert json.loads((stopped / "summary.json").read_text())["monitor"]["stopped_on_hacking_at"] == 3
    assert (stopped / "final").is_dir()
    # ... and --resume goes on from it; the monitor continues as if it had never stopped
    assert rl.train.main(["--resume", str(stopped), "--set", "monitor.stop_on_hacking=false"]) == 0
    _same_monitor(records, _records(stopped))
    a, b = load_checkpoint(straight)["monitor"], load_checkpoint(stopped)["monitor"]
    assert a == b


def _strip(m):
    return {k: v for k, v in m.items() if k.startswith("monitor/") or k == "step"}


def _same_monitor(a, b):
    """The monitor's records of two runs agree (other keys carry timings)."""
    assert [_strip(m) for m in a] == [_strip(m) for m in b]


def test_a_resumed_run_holds_the_same_monitor_history(quick, tmp_path):
    """Real evaluations (no made-up numbers): an interrupted and resumed run's monitor state and
    records equal an uninterrupted run's, bit for bit."""
    settings = {"monitor.every": 1, "monitor.per_task": 1, "monitor.window": 2}
    straight, split = tmp_path / "straight", tmp_path / "split"
    rl.train.run(load_config(None, quick(**settings, **{"train.steps": 4})), out_dir=straight)
    rl.train.run(load_config(None, quick(**settings, **{"train.steps": 2})), out_dir=split)
    assert rl.train.main(["--resume", str(split), "--set", "train.steps=4"]) == 0
    a, b = load_checkpoint(straight)["monitor"], load_checkpoint(split)["monitor"]
    assert [p["step"] for p in a["history"]] == [-1, 0, 1, 2, 3]
    assert a == b
    _same_monitor(_records(straight), _records(split))
    assert json.loads((straight / BEST_DIR / BEST_FILE).read_text()) == json.loads(
        (split / BEST_DIR / BEST_FILE).read_text())


class RecordingRedJudge(RedJudge):
    """The second judge of the wiring test: pays for red, and records the questions it was asked."""

    def __init__(self):
        self.modes = []

    def score(self, requests, mode="score"):
        self.modes.append(mode)
        return super().score(requests, mode)


def test_a_second_judge_is_the_signal(quick, tmp_path, monkeypatch):
    from rl.evaluation import run_summary

    second = RecordingRedJudge()
    real_build = rl.train.build_judge
    monkeypatch.setattr(rl.train, "build_judge",
                        lambda cfg, device: second if cfg.eval_mode == "yesno" else real_build(cfg, device))
    labels, real_eval = [], run_summary.evaluate_weights
    monkeypatch.setattr(run_summary, "evaluate_weights",
                        lambda trainer, weights, label, **kw: labels.append(label) or real_eval(trainer, weights,
                                                                                               label, **kw))
    cfg = load_config(None, quick(**{"train.steps": 2, "monitor.every": 1, "monitor.per_task": 1,
                                     "monitor.signal": "judge", "monitor.judge.kind": "rule",
                                     "monitor.judge.eval_mode": "yesno",
                                     "train.eval_every": 1, "train.eval_per_task": 1}))
    rl.train.run(cfg, out_dir=tmp_path)
    records = _records(tmp_path)
    assert ["monitor/score" in m for m in records] == [True, True]
    signal = records[1]["monitor/signal_by_task"]
    assert set(signal) == {"fill", "extend", "removal", "text"} and all(set(v) == {"judge"} for v in signal.values())
    assert all(0 <= v["judge"] <= 1 for v in signal.values())
    assert set(second.modes) == {"yesno"} and len(second.modes) >= 3  # the base, steps 0 and 1
    assert json.loads((tmp_path / BEST_DIR / BEST_FILE).read_text())["tolerance"] == {"judge": 0.01}
    # train.eval_every's held-out scores of step 0 are the monitor's evaluation (same set size), not a second one
    assert records[0]["heldout/reward_by_task"] == records[0]["monitor/judge_by_task"]
    assert labels == ["base", "monitor base", "monitor step 0", "monitor step 1", "final"]


@pytest.mark.parametrize("judge", ["red", "rule"])
def test_a_real_hackable_judge_trips_the_monitor_and_an_honest_one_does_not(tmp_path, monkeypatch, capsys, judge):
    """No made-up numbers: ReFL on the shipped toy against a judge that pays for red inside the mask
    (whatever was asked: the soft-IoU judge's failure in miniature) raises that judge while fill's
    shapes and text's glyphs fall, and the monitor says so; the same run against the rule judge, whose
    gains the ground truth shares, stays quiet."""
    if judge == "red":
        monkeypatch.setattr(rl.train, "build_judge", lambda cfg, device: RedJudge())
    settings = {"train.algorithm": "refl", "judge.mode": "pairwise", "refl.batch_size": 4, "optim.lr": 2e-4,
                "train.steps": 6, "monitor.every": 2, "monitor.per_task": 4, "monitor.window": 3,
                "monitor.judge_rise": 0.05, "data.mixture": "{fill: 0.5, text: 0.5}", "train.eval_per_task": 0,
                "train.sample_every": 0, "train.progress": False, "train.tensorboard": False}
    rl.train.run(load_config(None, [f"{k}={v}" for k, v in settings.items()]), out_dir=tmp_path / "run")
    events = [e for m in _records(tmp_path / "run") for e in m.get("monitor/hacking", [])]
    if judge == "rule":
        assert not events and "reward hacking?" not in capsys.readouterr().err
        return
    assert {e["task"] for e in events} == {"fill", "text"} and "reward hacking? fill" in capsys.readouterr().err
    assert all(e["judge_change"] > 0.05 and e["signal_change"] < 0 for e in events)
