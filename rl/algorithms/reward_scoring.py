"""Turn edited images into judge scores: every image on every dimension of its task.

`judge_images` builds one request per (image, dimension), sends them to the judge in one call,
and returns the table of scores, from which trainers take the per-image mean over dimensions
(the rewards OneReward and Edit-R1 average) and logs take per-task, per-dimension means.
"""
from __future__ import annotations

import dataclasses
from collections import defaultdict

import torch
from torch import Tensor

from core.synthetic.world import EditSample
from core.tasks import dimensions_for
from reward.judge import Judge, JudgeRequest


@dataclasses.dataclass
class ScoreTable:
    per_image: Tensor                      # [N] mean over the image's dimensions
    per_request: Tensor                    # [R] every (image, dimension) score
    image_of_request: list[int]
    dimension_of_request: list[str]
    tasks: list[str]                       # task of each image

    def by_task_dimension(self) -> dict[str, dict[str, float]]:
        acc: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        values = self.per_request.detach().float().cpu().tolist()
        for v, i, d in zip(values, self.image_of_request, self.dimension_of_request):
            acc[self.tasks[i]][d].append(v)
        return {t: {d: sum(v) / len(v) for d, v in dims.items()} for t, dims in acc.items()}

    @classmethod
    def cat(cls, tables: list[ScoreTable]) -> ScoreTable:
        """The tables of consecutive chunks of images as one (image indices shifted, order kept)."""
        if len(tables) == 1:
            return tables[0]
        owners, offset = [], 0
        for t in tables:
            owners += [i + offset for i in t.image_of_request]
            offset += len(t.tasks)
        return cls(per_image=torch.cat([t.per_image for t in tables]),
                   per_request=torch.cat([t.per_request for t in tables]), image_of_request=owners,
                   dimension_of_request=[d for t in tables for d in t.dimension_of_request],
                   tasks=[task for t in tables for task in t.tasks])

    def by_task(self) -> dict[str, float]:
        acc: dict[str, list[float]] = defaultdict(list)
        for v, t in zip(self.per_image.detach().float().cpu().tolist(), self.tasks):
            acc[t].append(v)
        return {t: sum(v) / len(v) for t, v in acc.items()}


def has_prompt(sample: EditSample) -> bool:
    return bool(sample.truth.get("has_prompt", True)) if isinstance(sample.truth, dict) else True


def judge_images(judge: Judge, samples: list[EditSample], images: Tensor, *, mode: str = "score",
                 others: Tensor | None = None) -> ScoreTable:
    """Score images [N,3,H,W] (N = len(samples)) on all dimensions of each sample's task.

    In pairwise mode `others` [N,3,H,W] holds the images to compare against (the reference's).
    Gradients flow from the scores into `images` when the judge is differentiable.
    """
    if images.shape[0] != len(samples):
        raise ValueError(f"{images.shape[0]} images for {len(samples)} samples")
    requests, owner, dims = [], [], []
    for i, s in enumerate(samples):
        for d in dimensions_for(s.task, has_prompt=has_prompt(s)):
            requests.append(JudgeRequest(
                task=s.task, dimension=d, source=s.source, edited=images[i], mask=s.mask,
                instruction=s.prompt, other=None if others is None else others[i], truth=s))
            owner.append(i)
            dims.append(d)
    scores = judge.score(requests, mode=mode)
    index = torch.tensor(owner, device=scores.device)
    total = torch.zeros(len(samples), dtype=scores.dtype, device=scores.device).index_add(0, index, scores)
    count = torch.zeros(len(samples), dtype=scores.dtype, device=scores.device).index_add(
        0, index, torch.ones_like(scores))
    return ScoreTable(per_image=total / count, per_request=scores, image_of_request=owner,
                      dimension_of_request=dims, tasks=[s.task for s in samples])
