"""`python -m rl.eval` on a small run: report files, tables, GSB, and agreement with rl.train."""
import json

import pytest
import torch

import rl.eval
import rl.train
from rl.evaluation.report import gsb_counts
from rl.plumbing.config import load_config


def test_eval_against_base_writes_the_report(quick, tmp_path):
    run_dir = tmp_path / "run"
    summary = rl.train.run(load_config(None, quick(**{"train.eval_per_task": 3})), out_dir=run_dir)
    out = tmp_path / "report"
    assert rl.eval.main(["--model", str(run_dir), "--against", "base", "--per-task", "3", "--out", str(out)]) == 0
    for name in ("report.md", "report.json", "dimensions.png", "gsb.png", "judge_vs_truth.png",
                 "grid_fill.png", "grid_text.png"):
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    assert set(report["A"]) == {"fill", "extend", "removal", "text"}
    fill = report["A"]["fill"]
    assert set(fill["dimensions"]) == {"text_alignment", "consistency", "structure", "aesthetics"}
    assert {"colour_acc", "shape_acc", "psnr_mask"} <= set(fill["ground_truth"])
    for task, g in report["gsb"].items():
        assert g["good"] + g["same"] + g["bad"] == 3
    md = (out / "report.md").read_text()
    assert "good / same / bad" in md and "usability" in md
    # the same held-out conditions, noise and judge as rl.train's summary: the numbers agree
    for task, s in summary["by_task"].items():
        assert report["A"][task]["reward"]["mean"] == pytest.approx(s["final"], abs=1e-5)
        assert report["B"][task]["reward"]["mean"] == pytest.approx(s["base"], abs=1e-5)


def test_gsb_counts_and_margin():
    pref = torch.tensor([0.9, 0.52, 0.1, 0.6, 0.5])
    counts = gsb_counts(pref, ["fill", "fill", "fill", "text", "text"], margin=0.05)
    assert counts == {"fill": {"good": 1, "same": 1, "bad": 1}, "text": {"good": 1, "same": 1, "bad": 0}}


def test_unknown_model_is_named(tmp_path, capsys):
    assert rl.eval.main(["--model", str(tmp_path / "nothing"), "--out", str(tmp_path / "r")]) == 1
    assert "nothing" in capsys.readouterr().err


def test_report_handles_edits_without_a_dimension():
    # extend without a prompt has no text alignment; the first held-out run of the default crashed on it
    from rl.evaluation.heldout import EvalResult
    from rl.evaluation.report import model_section, paired_section

    class S:
        def __init__(self, task):
            self.task = task

    dims = [{"consistency": 0.5}, {"text_alignment": 0.8, "consistency": 0.7}, {"consistency": 0.9}]
    a = EvalResult([S("extend")] * 3, torch.zeros(3, 3, 4, 4), torch.tensor([0.5, 0.75, 0.9]), dims, None)
    b = EvalResult(a.samples, a.images, a.reward - 0.1, [{k: v - 0.1 for k, v in d.items()} for d in dims], None)
    section = model_section(a, usability_threshold=0.6)["extend"]
    assert section["dimensions"]["text_alignment"]["n"] == 1
    assert section["dimensions"]["text_alignment"]["mean"] == pytest.approx(0.8)
    assert section["dimensions"]["consistency"]["n"] == 3
    assert section["usability"]["mean"] == pytest.approx(2 / 3)
    diff = paired_section(a, b)["extend"]["dimension_diff"]
    assert diff["text_alignment"]["n"] == 1 and diff["text_alignment"]["mean"] == pytest.approx(0.1)


def test_eval_works_on_a_refl_run(quick, tmp_path):
    """A ReFL run trains with pairwise rewards; its evaluation still scores absolutely (judge.eval_mode)."""
    run_dir = tmp_path / "run"
    rl.train.run(load_config(None, quick(**{"train.algorithm": "refl", "judge.mode": "pairwise",
                                            "refl.batch_size": 2, "train.steps": 1})), out_dir=run_dir)
    out = tmp_path / "report"
    assert rl.eval.main(["--model", str(run_dir), "--against", "base", "--per-task", "1", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["judge"] == "rule (score)" and set(report["gsb"]) == {"fill", "extend", "removal", "text"}


@pytest.mark.parametrize("name", ["tiny_nft.yaml", "tiny_refl.yaml", "tiny_onereward.yaml", "tiny_onereward_nft.yaml"])
def test_every_shipped_tiny_config_trains_evaluates_and_exports(quick, tmp_path, name):
    """Two steps of each shipped tiny config (shrunk by `quick`), then rl.eval and the export. The
    OneReward configs load the shipped learned judge (reward/assets/tiny_judge) in-process."""
    from pathlib import Path

    path = Path(__file__).parents[2] / "configs" / name
    run_dir = tmp_path / "run"
    own = load_config(str(path))   # quick's NFT-with-score defaults must not replace the config's own
    extra = {"train.eval_per_task": 1, "refl.batch_size": 2, "train.algorithm": own.train.algorithm,
             "judge.mode": own.judge.mode, "monitor.every": 0}
    cfg = load_config(str(path), quick(**extra))
    assert (cfg.train.algorithm, cfg.judge) == (own.train.algorithm, own.judge)
    rl.train.run(cfg, out_dir=run_dir)
    assert (run_dir / "final" / "README.md").is_file() and (run_dir / "final" / "transformer").is_dir()
    out = tmp_path / "report"
    assert rl.eval.main(["--model", str(run_dir), "--against", "base", "--per-task", "1", "--out", str(out)]) == 0
    assert json.loads((out / "report.json").read_text())["gsb"]
