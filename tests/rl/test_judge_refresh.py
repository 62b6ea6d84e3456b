"""refresh.*: the learned judge fine-tuned on the policy's edits as an annotator labels them."""
import json

import pytest
import torch

import rl.train
from core.config.loading import ConfigError
from core.synthetic.world import SyntheticWorld
from reward.judges.rule_judge import RuleJudge
from reward.judges.vlm_judge import TransformersJudge
from reward.training.pairwise_loss import pairwise_loss
from rl.algorithms.judge_refresh import JudgeRefresh
from rl.algorithms.reward_scoring import judge_images
from rl.plumbing.checkpoint import latest_checkpoint, load_checkpoint
from rl.plumbing.config import RefreshConfig, load_config
from rl.plumbing.distributed import DistContext

LEARNED = {"judge.kind": "transformers", "judge.model": "builtin:tiny-judge", "judge.mode": "pairwise",
           "judge.eval_mode": "pairwise", "judge.dtype": "float32", "judge.show_crop": True,
           "train.algorithm": "refl", "refl.batch_size": 4}


# the tiny judge's backward on a shared 2-core machine: about 10 s on one thread, over 120 s on two
# threads while another process holds a core
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("override, message", [
    ({"refresh.every": 1, "judge.kind": "rule"}, "judge.kind=transformers"),
    ({"refresh.every": 1, "train.algorithm": "nft"}, "train.algorithm=refl"),
    ({"refresh.annotator.kind": "rule"}, "refresh.every is 0"),
    ({"refresh.every": 1, "refresh.annotator.kind": "rule", "refresh.annotator.eval_mode": "yesno"},
     "refresh.annotator.eval_mode is not used"),
    ({"refresh.every": 1, "dist.strategy": "fsdp2"}, "dist.strategy=ddp"),
    ({"refresh.every": 1, "judge.eval_mode": "score"}, "judge.eval_mode=pairwise"),
    ({"refresh.every": 1, "judge.dtype": "bfloat16"}, "judge.dtype=float32"),
    ({"refresh.every": 1, "refresh.annotator.kind": "rule", "refresh.annotator.mode": "pairwise",
      "refresh.margin": 0.5}, "lower refresh.margin"),
    ({"refresh.label_noise": 0.6}, "refresh.label_noise"),
    ({"refresh.updates": 0}, "refresh.updates"),
])
def test_settings_that_cannot_work_are_refused(quick, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, quick(**{**LEARNED, **override}))


def test_user_data_needs_a_named_annotator(quick, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("")
    with pytest.raises(ConfigError, match="name an annotator"):
        load_config(None, quick(**LEARNED, **{"refresh.every": 1, "data.source": "jsonl", "data.jsonl": str(data)}))


@pytest.fixture(scope="module")
def pairs():
    """Fill conditions, their ground truth (the better edit) and the unchanged source (the worse)."""
    samples = [SyntheticWorld(seed=0).sample("fill", i) for i in range(4)]
    return samples, torch.stack([s.target for s in samples]), torch.stack([s.source for s in samples])


def _refresh(annotator_mode: str = "score", **cfg) -> JudgeRefresh:
    judge = TransformersJudge("builtin:tiny-judge", dtype="float32", both_orders=True, show_crop=True)
    return JudgeRefresh(RefreshConfig(every=1, **cfg), judge, RuleJudge(), annotator_mode, DistContext(), seed=0)


@pytest.mark.parametrize("annotator_mode", ["score", "pairwise"])
@pytest.mark.parametrize("policy_is_truth", [True, False])
def test_the_annotators_winner_is_kept_in_either_role(pairs, policy_is_truth, annotator_mode):
    samples, truth, source = pairs
    refresh = _refresh(annotator_mode)
    images, others = (truth, source) if policy_is_truth else (source, truth)
    table = judge_images(refresh.judge, samples, images, mode="pairwise", others=others)
    metrics = {}
    refresh.observe(0, samples, images, others, table, metrics)
    assert refresh.buffer and metrics["refresh_labelled"] == len(refresh.buffer)
    for entry in refresh.buffer:
        i = next(k for k, s in enumerate(samples) if torch.equal(s.source, entry["source"]))
        assert torch.equal(entry["winner"], truth[i]) and torch.equal(entry["loser"], source[i])
    # the judge's answers on the same requests, measured against the annotator before it learns them
    judged = (table.per_request > 0.5) == policy_is_truth
    assert metrics["refresh_agreement"] == pytest.approx(float(judged.float().mean()))


def test_label_noise_flips_labels_reproducibly(pairs):
    samples, truth, source = pairs
    runs = []
    for _ in range(2):
        refresh = _refresh(label_noise=0.5)
        table = judge_images(refresh.judge, samples, truth, mode="pairwise", others=source)
        refresh.observe(3, samples, truth, source, table, {})
        runs.append([any(torch.equal(e["winner"], s) for s in source) for e in refresh.buffer])
    assert runs[0] == runs[1] and 0 < sum(runs[0]) < len(runs[0])


def test_updates_teach_the_judge_its_labels_and_leave_it_frozen(pairs):
    samples, truth, source = pairs
    refresh = _refresh(lr=1e-3, updates=4, batch_size=8)
    table = judge_images(refresh.judge, samples, source, mode="pairwise", others=truth)
    refresh.observe(0, samples, source, truth, table, {})
    requests = [refresh._request(e) for e in refresh.buffer]
    with torch.no_grad():
        before = float(pairwise_loss(refresh.judge, requests))
    for step in range(5):
        metrics = {}
        refresh.update(step, metrics)
    with torch.no_grad():
        after = float(pairwise_loss(refresh.judge, requests))
    assert after < before - 0.05, (before, after)
    # RL's backward reaches the images only, and the update leaves no gradient behind
    assert not any(p.requires_grad or p.grad is not None for p in refresh.judge.model.parameters())
    with torch.no_grad():
        p_truth = judge_images(refresh.judge, samples, truth, mode="pairwise", others=source).per_image
    assert float(p_truth.mean()) > 0.5


def test_resume_continues_the_same_judge_and_the_run_saves_it(quick, tmp_path):
    extra = {**LEARNED, "refresh.every": 1, "refresh.updates": 1, "refresh.batch_size": 4}
    straight, split = tmp_path / "straight", tmp_path / "split"
    rl.train.run(load_config(None, quick(**extra, **{"train.steps": 3})), out_dir=straight)
    rl.train.run(load_config(None, quick(**extra, **{"train.steps": 2})), out_dir=split)
    assert rl.train.main(["--resume", str(split), "--set", "train.steps=3"]) == 0
    a, b = (load_checkpoint(latest_checkpoint(d)) for d in (straight, split))
    for name, w in a["weights"].items():
        assert torch.equal(w, b["weights"][name]), name
    judge_a, judge_b = a["judge_refresh"]["judge"], b["judge_refresh"]["judge"]
    for name, w in judge_a.items():
        assert torch.equal(w, judge_b[name]), name
    shipped = TransformersJudge("builtin:tiny-judge", dtype="float32", show_crop=True).model.state_dict()
    assert any(not torch.equal(w, shipped[name]) for name, w in judge_a.items())  # it did learn
    rows = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    assert all("refresh_agreement" in r and r["time_refresh"] > 0 and "refresh_loss" in r for r in rows)
    assert "refresh" in json.loads((straight / "summary.json").read_text())["time_split_s"]
    saved = TransformersJudge(straight / "judge", dtype="float32", show_crop=True).model.state_dict()
    for name, w in judge_a.items():
        assert torch.equal(w, saved[name]), name


@pytest.mark.slow  # two torchrun-style processes over gloo
def test_two_processes_keep_one_judge(quick, tmp_path):
    """Each process labels its own share; the averaged gradients keep the judges equal (checked after
    every update by JudgeRefresh, which stops the run otherwise)."""
    import os
    import subprocess
    import sys

    overrides = quick(**LEARNED, **{"refresh.every": 1, "refresh.updates": 2, "refresh.batch_size": 4, "refresh.margin": 0.0,
                                    "train.steps": 2})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "rl.train",
           "--out", str(tmp_path / "two")]
    for o in overrides:
        cmd += ["--set", o]
    env = {k: v for k, v in os.environ.items() if k != "WORLD_SIZE"} | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = load_checkpoint(latest_checkpoint(tmp_path / "two"))
    # the checkpoint's buffer holds both processes' labelled pairs (refresh_labelled counts all of them)
    labelled = [json.loads(x)["refresh_labelled"] for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert len(state["judge_refresh"]["buffer"]) == sum(labelled) > 0
    TransformersJudge(tmp_path / "two" / "judge", dtype="float32", show_crop=True)


def test_a_learned_annotator_trained_on_pairwise_questions_is_asked_only_those():
    from rl.plumbing.builders import build_annotator
    from rl.plumbing.config import JudgeConfig

    cfg = RefreshConfig(every=1, annotator=JudgeConfig(kind="transformers", model="builtin:tiny-judge", mode="pairwise",
                                                       dtype="float32", show_crop=True))
    annotator, mode = build_annotator(cfg, torch.device("cpu"))
    assert mode == "pairwise" and isinstance(annotator, TransformersJudge)


def test_ties_are_never_labelled(pairs):
    samples, truth, _ = pairs
    refresh = _refresh(margin=0.0)
    table = judge_images(refresh.judge, samples, truth, mode="pairwise", others=truth)
    metrics = {}
    refresh.observe(0, samples, truth, truth.clone(), table, metrics)
    assert refresh.buffer == [] and metrics["refresh_labelled"] == 0
