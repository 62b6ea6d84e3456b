"""The trainers with real VLM judges: ReFL back-propagates through an in-process Qwen2.5-VL,
NFT scores through the OpenAI API against `reward.serve` on loopback, and an unreachable judge
fails before any work."""
import pytest
import torch

import rl.train
from reward.judge import JudgeError
from rl.plumbing.builders import build_judge
from rl.plumbing.checkpoint import load_checkpoint
from rl.plumbing.config import load_config


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory):
    from reward.vlm.tiny_vlm import build_tiny_vlm

    path = tmp_path_factory.mktemp("tiny_judge")
    build_tiny_vlm(init_std=0.2, seed=0).save_pretrained(path)
    return path


def _moved(run_dir) -> float:
    state = load_checkpoint(run_dir)
    return sum(float((state["weights"][k] - state["ref"][k]).abs().sum()) for k in state["weights"])


def test_refl_through_an_in_process_vlm_judge(quick, judge_dir, tmp_path):
    cfg = load_config(None, quick(**{
        "train.algorithm": "refl", "judge.kind": "transformers", "judge.model": str(judge_dir),
        "judge.mode": "pairwise", "judge.dtype": "float32", "judge.both_orders": False,
        "judge.batch_size": 32, "refl.batch_size": 2, "train.steps": 1, "data.mixture.text": 0,
        "data.mixture.extend": 0, "data.mixture.removal": 0}))
    summary = rl.train.run(cfg, out_dir=tmp_path)
    assert summary["steps"] == 1
    assert _moved(tmp_path) > 0  # the judge's gradient reached the policy


def test_nft_through_the_openai_api_and_reward_serve(quick, judge_dir, tmp_path):
    from reward.judges.vlm_judge import TransformersJudge
    from reward.serve import JudgeServer

    with JudgeServer(TransformersJudge(judge_dir, dtype=torch.float32), port=0, model_name="tiny") as server:
        cfg = load_config(None, quick(**{
            "judge.kind": "openai", "judge.base_url": server.url, "judge.model": "tiny", "judge.retries": 1,
            "judge.tokenizer": str(judge_dir),  # so the server is asked for the label tokens
            "train.steps": 1, "nft.groups_per_step": 1, "nft.group_size": 4}))
        rl.train.run(cfg, out_dir=tmp_path)
    assert _moved(tmp_path) > 0


def test_unreachable_judge_fails_before_any_work():
    cfg = load_config(None, ["judge.kind=openai", "judge.base_url=http://127.0.0.1:9/v1", "judge.model=m",
                             "judge.retries=0", "judge.timeout=2"])
    with pytest.raises(JudgeError, match=r"127\.0\.0\.1:9.*(reward\.serve|vLLM)"):
        build_judge(cfg.judge, torch.device("cpu"))
