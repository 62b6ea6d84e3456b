"""The preference loss of a VLM judge (OneReward section 4.3), shared by `python -m reward.train` and
the judge's refresh during RL (rl/algorithms/judge_refresh.py)."""
from __future__ import annotations

import torch
from torch import Tensor

from reward.judge import JudgeRequest
from reward.judges.vlm_judge import TransformersJudge
from reward.vlm.prompts import build_conversations


def pairwise_loss(judge: TransformersJudge, requests: list[JudgeRequest], loss_over: str = "vocab") -> Tensor:
    """The preference loss of `requests` (winner as `edited`, loser as `other`): each is asked in both
    orders, winner first (target "Yes") and loser first (target "No"), whatever the judge's own
    `both_orders`; cross-entropy at the answer position over the vocabulary ("vocab") or over Yes / No
    only ("labels")."""
    yes_id, no_id = judge.label_ids["pairwise"]
    conversations = build_conversations(requests, "pairwise", judge.templates, judge.view, both_orders=True)
    logits = judge.next_token_logits(conversations)
    # rows alternate winner-first (answer Yes) and loser-first (answer No)
    if loss_over == "labels":
        logits, target = logits[:, [yes_id, no_id]], torch.tensor([0, 1] * len(requests))
    else:
        target = torch.tensor([yes_id, no_id] * len(requests))
    return torch.nn.functional.cross_entropy(logits, target.to(logits.device))
