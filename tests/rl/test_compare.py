"""`python -m rl.compare`: time to target, intervals, bad arguments, and a real two-algorithm run."""
import json
import shutil

import pytest
import torch

import rl.compare
from rl.evaluation.compare_report import (
    PointResult,
    build_report,
    interval,
    markdown,
    t_quantile,
    time_to_target,
)

CONFIGS = rl.compare.CONFIG_DIR


def test_time_to_target_interpolates_between_points():
    seconds, rewards = [0.0, 10.0, 20.0, 30.0], [0.50, 0.52, 0.56, 0.55]
    assert time_to_target(seconds, rewards, 0.54) == pytest.approx(15.0)
    assert time_to_target(seconds, rewards, 0.52) == pytest.approx(10.0)   # reached exactly at a point
    assert time_to_target(seconds, rewards, 0.45) == 0.0                   # the base model already reaches it
    assert time_to_target(seconds, rewards, 0.57) is None                  # never
    # the first crossing counts, even when the curve falls back below the target afterwards
    assert time_to_target([0, 1, 2, 3], [0.0, 1.0, 0.0, 1.0], 0.5) == pytest.approx(0.5)


def test_interval_is_a_t_interval_over_seeds():
    iv = interval([1.0, 2.0, 3.0])
    half = 4.303 * 1.0 / 3 ** 0.5  # sd 1, t(0.975, 2 df) = 4.303
    assert iv["mean"] == pytest.approx(2.0) and iv["n"] == 3
    assert (iv["low"], iv["high"]) == (pytest.approx(2.0 - half), pytest.approx(2.0 + half))
    assert interval([0.7]) == {"mean": 0.7, "low": None, "high": None, "n": 1}
    assert t_quantile(30) == 2.042 and t_quantile(60) == pytest.approx(2.000, abs=2e-3)
    assert t_quantile(10_000) == pytest.approx(1.960, abs=1e-3)


def _point(seconds, reward):
    return PointResult(seconds, int(seconds), reward, {"fill": reward, "text": reward},
                       {"fill": {"shape_acc": reward}, "text": {"glyph_acc": reward}})


def _settings(algorithms, seeds):
    return {"algorithms": algorithms, "seconds": 20.0, "points": 2, "seeds": seeds, "per_task": 2,
            "evaluation": "test", "configs": {}, "overrides": []}


def test_report_targets_grpo_and_says_how_much_faster():
    base = _point(0.0, 0.50)
    results = {"nft": [[_point(10, 0.61), _point(20, 0.62)], [_point(10, 0.59), _point(20, 0.64)]],
               "grpo": [[_point(10, 0.52), _point(20, 0.54)], [_point(10, 0.54), _point(20, 0.56)]],
               "awm": [[_point(10, 0.50), _point(20, 0.51)], [_point(10, 0.50), _point(20, 0.51)]]}
    report = build_report(base, results, ["fill", "text"], _settings(list(results), 2))
    assert report["target"]["algorithm"] == "grpo" and report["target"]["reward"] == pytest.approx(0.55)
    timing = report["time_to_target"]
    assert timing["grpo"]["seconds"] == pytest.approx(20.0) and timing["grpo"]["speedup"] == pytest.approx(1.0)
    assert timing["nft"]["seconds"] == pytest.approx(5.0) and timing["nft"]["speedup"] == pytest.approx(4.0)
    assert timing["awm"]["seconds"] is None and timing["awm"]["speedup"] is None
    nft_end = report["curves"]["nft"][2]["reward"]
    assert nft_end["mean"] == pytest.approx(0.63) and nft_end["low"] < 0.63 < nft_end["high"]
    md = markdown(report)
    assert "not reached" in md and "4.00x" in md and "grpo's final reward" in md
    assert "fill shape_acc" in md and "text glyph_acc" in md


def test_without_grpo_the_target_is_the_first_algorithms_final_reward():
    base = _point(0.0, 0.50)
    results = {"awm": [[_point(10, 0.52), _point(20, 0.53)]], "nft": [[_point(10, 0.56), _point(20, 0.60)]]}
    report = build_report(base, results, ["fill", "text"], _settings(list(results), 1))
    assert report["target"]["algorithm"] == "awm" and "grpo was not compared" in report["target"]["why"]
    assert report["time_to_target"]["nft"]["seconds"] == pytest.approx(5.0)
    assert "(n/a)" in markdown(report)  # one seed: no interval


def test_a_target_the_base_model_already_meets_is_called_uninformative():
    """Measured on the toy: GRPO's final reward fell below the base model's, so every algorithm 'reached'
    it at 0 s; the report must say the ratios mean nothing rather than print them as results."""
    base = _point(0.0, 0.558)
    results = {"grpo": [[_point(50, 0.553), _point(150, 0.538)]], "refl": [[_point(50, 0.601), _point(150, 0.616)]]}
    report = build_report(base, results, ["fill", "text"], _settings(list(results), 1))
    assert report["target"]["uninformative"]
    assert "ratios say nothing" in markdown(report)
    met = build_report(_point(0.0, 0.50), results, ["fill", "text"], _settings(list(results), 1))
    assert not met["target"]["uninformative"] and "ratios say nothing" not in markdown(met)


@pytest.mark.parametrize("args, says", [
    (["--algorithms", "nft,ppo"], "unknown algorithm"),
    (["--algorithms", "nft,nft"], "twice"),
    (["--seconds", "0"], "--seconds must be a finite number > 0"),
    (["--seconds", "inf"], "--seconds must be a finite number > 0"),
    (["--points", "0"], "--points must be at least 1"),
    (["--seeds", "0"], "--seeds must be at least 1"),
    (["--per-task", "0"], "--per-task must be at least 1"),
    (["--config", f"refl={CONFIGS}/tiny_refl.yaml"], "not in --algorithms"),
    (["--config", f"nft={CONFIGS}/tiny_awm.yaml"], "trains awm"),
    (["--config", "nft=nowhere.yaml"], "no such file"),
    (["--set", "optim.decay=cosine"], "optim.decay=constant"),
    (["--set", "optim.lr=7"], "optim.lr"),
])
def test_bad_arguments_are_refused_before_any_work(tmp_path, capsys, args, says):
    # a repeated --algorithms / --seconds / ...: argparse keeps the last, the one under test
    argv = ["--algorithms", "nft,awm", "--seconds", "4", "--out", str(tmp_path / "cmp"), *args]
    assert rl.compare.main(argv) == 2
    assert says in capsys.readouterr().err
    assert not (tmp_path / "cmp").exists()


def test_an_out_holding_something_else_is_refused(tmp_path, capsys):
    (tmp_path / "cmp").mkdir()
    (tmp_path / "cmp" / "notes.txt").write_text("mine")
    assert rl.compare.main(["--algorithms", "nft", "--seconds", "4", "--out", str(tmp_path / "cmp")]) == 2
    err = capsys.readouterr().err
    assert "not an rl.compare directory" in err and "new or empty --out" in err
    assert sorted(p.name for p in (tmp_path / "cmp").iterdir()) == ["notes.txt"]


def _files_and_times(root):
    return {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_two_algorithms_end_to_end_and_a_rerun_reuses_everything(quick, tmp_path, capsys):
    out = tmp_path / "cmp"
    sets = [x for kv in quick() for x in ("--set", kv)]
    argv = ["--algorithms", "nft,awm", "--seconds", "3", "--points", "2", "--seeds", "1", "--per-task", "2",
            "--out", str(out), "--no-progress", *sets]
    assert rl.compare.main(argv) == 0
    for name in ("compare.md", "compare.json", "reward.png", "truth.png", "runs/nft-seed0/config.yaml",
                 "runs/awm-seed0/metrics.jsonl", "snapshots/nft-seed0/point-02/state.safetensors"):
        assert (out / name).is_file(), name
    report = json.loads((out / "compare.json").read_text())
    assert report["target"]["algorithm"] == "nft"  # no grpo: the first algorithm's final reward
    assert report["tasks"] == ["fill", "extend", "removal", "text"]
    for alg in ("nft", "awm"):
        curve = report["curves"][alg]
        assert [row["point"] for row in curve] == [0, 1, 2]
        # each chunk trains past its budget (a chunk's last step ends beyond it), not far past the next
        assert curve[1]["seconds"] >= 1.5 and curve[2]["seconds"] >= 3.0
        assert curve[2]["steps"] >= curve[1]["steps"] >= 1
        assert set(curve[2]["truth_by_task"]["text"]) >= {"glyph_acc", "psnr_mask"}
    assert report["curves"]["nft"][0] == report["curves"]["awm"][0]  # one base model at t = 0
    md = (out / "compare.md").read_text()
    for row in ("| base | 0/2 |", "| nft | 1/2 |", "| nft | 2/2 |", "| awm | 2/2 |", "Time to target"):
        assert row in md, row
    metrics = [json.loads(x) for x in (out / "runs/nft-seed0/metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(len(metrics)))  # two chunks, one unbroken run

    # a snapshot is a model rl.eval can name: resolve_model loads its EMA
    from rl.plumbing.model_ref import resolve_model

    _, weights, desc = resolve_model(str(out / "snapshots/nft-seed0/point-02"), torch.device("cpu"))
    assert weights and "EMA" in desc

    # the same command again: nothing is trained or evaluated again, the report is the same
    before = _files_and_times(out / "runs") | _files_and_times(out / "snapshots") | _files_and_times(out / "evals")
    capsys.readouterr()
    assert rl.compare.main(argv) == 0
    after = _files_and_times(out / "runs") | _files_and_times(out / "snapshots") | _files_and_times(out / "evals")
    assert after == before
    assert json.loads((out / "compare.json").read_text())["curves"] == report["curves"]

    # other settings for runs that exist are refused, naming the key
    assert rl.compare.main([*argv, "--set", "optim.lr=2e-4"]) == 2
    err = capsys.readouterr().err
    assert "optim.lr" in err and "choose a new --out" in err
    assert rl.compare.main([*argv, "--seconds", "9"]) == 2  # on a 3-second comparison
    assert "--seconds 3" in capsys.readouterr().err

    # interrupted after a chunk's checkpoint, before its snapshot: the snapshot is taken, nothing retrained
    ckpts = sorted(p.name for p in (out / "runs/nft-seed0").glob("ckpt-*"))
    shutil.rmtree(out / "snapshots/nft-seed0/point-02")
    assert rl.compare.main(argv) == 0
    assert sorted(p.name for p in (out / "runs/nft-seed0").glob("ckpt-*")) == ckpts
    assert json.loads((out / "compare.json").read_text())["curves"] == report["curves"]
