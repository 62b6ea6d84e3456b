"""Held-out evaluation shared by `rl.train` (its end-of-run summary) and `rl.eval` (reports).

Every held-out condition gets its own noise, drawn from (seed, condition key), so two models —
or one model before and after training — are compared on identical conditions and noise, and a
paired difference measures the model, not the luck of the draw.
"""
from __future__ import annotations

import dataclasses
from collections import defaultdict

import torch
from torch import Tensor

from core.policies.policy import Policy
from core.sampling.samplers import sample_policy
from core.synthetic.metrics import sample_metrics
from core.synthetic.world import EditSample, collate
from reward.judge import Judge
from rl.algorithms.reward_scoring import judge_images
from rl.algorithms.trainer import keyed_generator


@dataclasses.dataclass
class EvalResult:
    samples: list[EditSample]
    images: Tensor                                   # [N, 3, H, W] on CPU
    reward: Tensor                                   # [N] mean over the task's dimensions
    by_dimension: list[dict[str, float]]             # per image: dimension -> score
    ground_truth: list[dict[str, float]] | None      # per image: metric -> value (world data only)

    def tasks(self) -> list[str]:
        return sorted({s.task for s in self.samples}, key=[s.task for s in self.samples].index)

    def indices(self, task: str) -> list[int]:
        return [i for i, s in enumerate(self.samples) if s.task == task]

    def reward_by_task(self) -> dict[str, float]:
        return {t: float(self.reward[self.indices(t)].mean()) for t in self.tasks()}

    def dimension_means(self) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        for s, dims in zip(self.samples, self.by_dimension):
            for d, v in dims.items():
                out[s.task][d].append(v)
        return {t: {d: sum(v) / len(v) for d, v in dims.items()} for t, dims in out.items()}

    def ground_truth_means(self) -> dict[str, dict[str, float]]:
        if self.ground_truth is None:
            return {}
        out: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        for s, m in zip(self.samples, self.ground_truth):
            for k, v in m.items():
                out[s.task][k].append(v)
        return {t: {k: sum(v) / len(v) for k, v in ms.items()} for t, ms in out.items()}


def held_out_samples(data, tasks: list[str], n_per_task: int) -> list[EditSample]:
    samples = [s for t in tasks for s in data.held_out(t, n_per_task)]
    if not samples:
        raise ValueError("no held-out conditions: the data source has no held-out split for these tasks")
    return samples


@torch.no_grad()
def generate_images(policy: Policy, samples: list[EditSample], *, weights: dict[str, Tensor] | None,
                    sigmas: Tensor, method: str, seed: int, device: torch.device, batch_size: int = 32,
                    progress=None) -> Tensor:
    """Edit every sample (noise keyed by the sample's key), returning images [N,3,H,W] on CPU."""
    out = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        batch = collate(chunk)
        cond = policy.encode(batch.images.to(device), batch.masks.to(device), batch.prompts)
        shape = cond.x0_known.shape[1:]
        noise = torch.stack([torch.randn(shape, generator=keyed_generator(seed, s.key)) for s in chunk])
        noise = noise.to(device, cond.x0_known.dtype)
        x0 = sample_policy(policy, cond, sigmas=sigmas, method=method, noise=noise, weights=weights,
                           blend=True, noise_level=0.0)
        out.append(policy.decode(x0, cond).float().cpu())
        if progress is not None:
            progress.update(len(chunk))
    return torch.cat(out)


def score_images(judge: Judge, samples: list[EditSample], images: Tensor, *, with_truth: bool,
                 mode: str = "score", batch_size: int = 64, others: Tensor | None = None) -> EvalResult:
    """Score `images` with `mode` (judge.eval_mode). "score" and "yesno" are absolute; "pairwise" is
    P(the image beats `others`, the base model's edit of the same condition with the same noise):
    a judge trained on pairwise questions only (OneReward's) has no absolute answer, and the base
    model scores exactly 0.5 against itself when the judge asks in both orders."""
    if mode not in ("score", "yesno", "pairwise"):
        raise ValueError(f"held-out scores are judge.eval_mode score, yesno or pairwise, not {mode!r}")
    if (mode == "pairwise") != (others is not None):
        raise ValueError("held-out pairwise scores need the base model's images (others), and only they do")
    rewards, dims = [], []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        table = judge_images(judge, chunk, images[start:start + batch_size], mode=mode,
                             others=None if others is None else others[start:start + batch_size])
        rewards.append(table.per_image.detach().float().cpu())
        per: list[dict[str, float]] = [{} for _ in chunk]
        for v, i, d in zip(table.per_request.detach().float().cpu().tolist(), table.image_of_request,
                           table.dimension_of_request):
            per[i][d] = v
        dims.extend(per)
    truth = [sample_metrics(s, img) for s, img in zip(samples, images)] if with_truth else None
    return EvalResult(samples, images, torch.cat(rewards), dims, truth)


def evaluate(policy: Policy, judge: Judge, samples: list[EditSample], *, weights: dict[str, Tensor] | None,
             sigmas: Tensor, method: str, seed: int, device: torch.device, with_truth: bool,
             batch_size: int = 32, progress=None, mode: str = "score",
             others: Tensor | None = None) -> EvalResult:
    """Edit and score `samples` with judge.eval_mode `mode` (pairwise: against `others`)."""
    images = generate_images(policy, samples, weights=weights, sigmas=sigmas, method=method, seed=seed,
                             device=device, batch_size=batch_size, progress=progress)
    return score_images(judge, samples, images, with_truth=with_truth, mode=mode, others=others)
