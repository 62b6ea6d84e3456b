"""Robust preference training: the judge learns each pair's label on adversarially perturbed edits.

Reward feedback learning climbs the judge's gradient with respect to the edited image. A judge
trained only on clean pairs has gradients that point anywhere the judge is fragile: measured on the
tiny judge (docs/results.md), their cosine with the annotator's gradients is about 0 and ReFL against
it loses 5-18 dB within tens of steps. Models trained on worst-case perturbations have gradients
that follow what they measure (Madry et al. 2018; Santurkar et al. 2019, "perceptually aligned
gradients"), so `python -m reward.train --set adversarial_eps=E` trains on PGD examples:

    delta_0 ~ U[-E, E] * m,    delta_{s+1} = clip(delta_s + a sign(grad_delta L), -E, E) * m,   a = 2.5 E / S

for both images of a pair (winner and loser), inside the edited region m (the known region is the
source's and is never the policy's to change), S = `adversarial_steps` steps ascending the
preference loss L, then the judge descends L on the perturbed pair with its clean label. Cost:
S + 1 forward / backward passes per batch instead of one.
"""
from __future__ import annotations

import dataclasses

import torch

from reward.judge import JudgeRequest
from reward.judges.vlm_judge import TransformersJudge
from reward.training.pairwise_loss import pairwise_loss


def adversarial_requests(judge: TransformersJudge, requests: list[JudgeRequest], eps: float, steps: int,
                         loss_over: str = "vocab", generator: torch.Generator | None = None,
                         kind: str = "pixels") -> list[JudgeRequest]:
    """`requests` (winner as `edited`, loser as `other`) with both images moved by PGD to raise the loss:
    every pixel of the edited region on its own ("pixels"), or one colour offset per channel over the
    whole edited region ("tint": the shortcut a judge takes when its winners were bluer or darker)."""
    if kind not in ("pixels", "tint"):
        raise ValueError(f"adversarial kind must be 'pixels' or 'tint', got {kind!r}")
    masks = [r.mask.to(r.edited.dtype) for r in requests]

    def offsets(img):
        shape = img.shape if kind == "pixels" else (img.shape[0], 1, 1)
        return (torch.rand(shape, generator=generator) * 2 - 1).to(img) * eps

    # the free variables (a pixel each, or a colour offset per channel), applied inside the mask
    deltas = [offsets(r.edited) for r in requests] + [offsets(r.other) for r in requests]
    n, region = len(requests), masks + masks

    def perturbed() -> list[JudgeRequest]:
        return [dataclasses.replace(r, edited=(r.edited + deltas[i] * region[i]).clamp(0, 1),
                                    other=(r.other + deltas[n + i] * region[n + i]).clamp(0, 1))
                for i, r in enumerate(requests)]

    alpha = 2.5 * eps / steps
    for _ in range(steps):
        for d in deltas:
            d.requires_grad_(True)
        loss = pairwise_loss(judge, perturbed(), loss_over)
        grads = torch.autograd.grad(loss, deltas)
        with torch.no_grad():
            deltas = [(d + alpha * g.sign()).clamp(-eps, eps) for d, g in zip(deltas, grads)]
    return perturbed()  # the last step ran without gradients: the images carry none
