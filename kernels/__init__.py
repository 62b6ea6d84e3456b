"""Fused kernels for flow-matching RL: NFT loss, group rewards, mask-aware blend step.

Public API (other parts and users rely on these names):
    nft_loss, grpo_loss, sde_step_logprob, group_rewards, GroupRewards, masked_blend_step

Each function checks its inputs (kernels.validate: a ValueError naming the problem and the fix),
then dispatches (kernels.backend): CUDA tensors -> the Triton kernels; CPU tensors -> the eager
references in kernels.reference, or the Triton kernels under TRITON_INTERPRET=1. backend="triton"
or "torch" forces one. The maths is docs/design.md's "The maths the kernels implement"; each op file
(nft_loss.py, grpo_loss.py, group_rewards.py, masked_blend.py) opens with it and its memory-pass budget.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import validate
from .backend import BACKENDS, HAS_TRITON, use_triton
from .reference import (
    GroupRewards,
    group_rewards_reference,
    grpo_loss_reference,
    masked_blend_step_reference,
    nft_loss_reference,
    sde_step_logprob_reference,
)

if HAS_TRITON:
    from .group_rewards import group_rewards_triton
    from .grpo_loss import grpo_loss_triton, sde_step_logprob_triton
    from .masked_blend import masked_blend_step_triton
    from .nft_loss import nft_loss_triton


def nft_loss(v_theta: Tensor, v_old: Tensor, v_target: Tensor, r: Tensor, t: Tensor | None = None, *,
             beta: float, adaptive: bool = True, v_ref: Tensor | None = None, kl_coef: float = 0.0,
             weight: Tensor | None = None, reduction: str = "mean", backend: str = "auto") -> Tensor:
    """DiffusionNFT loss (Edit-R1 eq. 4-6) of velocities [B, ...], reduced per sample.

    e+ = (1 - beta) v_old + beta v_theta - v_target,  e- = (1 + beta) v_old - beta v_theta - v_target;
    L = mean(e^2) (adaptive=False) or t^2 mean(e^2) / max(t mean|e|, 1e-5) (adaptive, weight
    detached, needs t); loss_b = (r L+ + (1 - r) L-) / beta + kl_coef mean((v_theta - v_ref)^2).

    r, t, weight: [B] (r and t in [0, 1], weight >= 0). reduction="mean": weighted mean over the
    samples with weight > 0 (all 1 when weight is None); "none": the [B] losses. Gradient flows to
    v_theta only, in its dtype. The loss is fp32 (fp64 for fp64 inputs).
    """
    validate.choice("nft_loss", "backend", backend, BACKENDS)
    validate.nft_loss_args(v_theta, v_old, v_target, r, t, beta=beta, adaptive=adaptive, v_ref=v_ref,
                           kl_coef=kl_coef, weight=weight, reduction=reduction)
    fn = nft_loss_triton if use_triton(backend, v_theta.device, "nft_loss") else nft_loss_reference
    return fn(v_theta, v_old, v_target, r, t, beta=beta, adaptive=adaptive, v_ref=v_ref, kl_coef=kl_coef,
              weight=weight, reduction=reduction)


def grpo_loss(v_theta: Tensor, x_t: Tensor, x_next: Tensor, advantage: Tensor, logp_old: Tensor | None = None, *,
              mean_x: Tensor, mean_v: Tensor, std: Tensor, mask: Tensor | None = None, clip_range: float,
              v_ref: Tensor | None = None, kl_coef: float = 0.0, weight: Tensor | None = None,
              reduction: str = "mean", return_logp: bool = False,
              backend: str = "auto") -> Tensor | tuple[Tensor, Tensor]:
    """Flow-GRPO's clipped objective of one SDE step x_t -> x_next per sample, velocities [B, ...].

    The step is N(mean_x x_t + mean_v v, std^2) per element (core.sampling.samplers.sde_step_moments);
    logp = the mask-weighted mean over elements of its log-density under v = v_theta (mask 1 =
    generated; it broadcasts to v_theta, e.g. cond.blend_mask); ratio = exp(logp - logp_old), exactly
    1 when logp_old is None (the sampling policy is the trained one); loss_b = max(-A ratio,
    -A clip(ratio, 1 - clip_range, 1 + clip_range)) + kl_coef KL_b, KL_b = the mask-weighted mean
    of (mean_v (v_theta - v_ref))^2 / (2 std^2), the KL of the trained and the reference step per
    element. advantage, logp_old, mean_x, mean_v, std, weight: [B]. reduction="mean": weighted mean
    over samples with weight > 0; "none": the [B] losses. return_logp: also the [B] logp (detached).
    Gradient flows to v_theta only, in its dtype; the loss is fp32 (fp64 for fp64 inputs).
    """
    validate.choice("grpo_loss", "backend", backend, BACKENDS)
    validate.grpo_loss_args(v_theta, x_t, x_next, advantage, logp_old, mean_x=mean_x, mean_v=mean_v, std=std,
                            mask=mask, clip_range=clip_range, v_ref=v_ref, kl_coef=kl_coef, weight=weight,
                            reduction=reduction, return_logp=return_logp)
    fn = grpo_loss_triton if use_triton(backend, v_theta.device, "grpo_loss") else grpo_loss_reference
    return fn(v_theta, x_t, x_next, advantage, logp_old, mean_x=mean_x, mean_v=mean_v, std=std, mask=mask,
              clip_range=clip_range, v_ref=v_ref, kl_coef=kl_coef, weight=weight, reduction=reduction,
              return_logp=return_logp)


def sde_step_logprob(v: Tensor, x_t: Tensor, x_next: Tensor, *, mean_x: Tensor, mean_v: Tensor, std: Tensor,
                     mask: Tensor | None = None, backend: str = "auto") -> Tensor:
    """[B] log-probabilities of SDE steps x_t -> x_next ~ N(mean_x x_t + mean_v v, std^2): the
    mask-weighted mean over each sample's elements of the Gaussian log-density (grpo_loss's logp;
    Flow-GRPO's per-step log-probability, recorded at the rollout). Without gradient (grpo_loss
    differentiates it); fp32 (fp64 for fp64 inputs)."""
    validate.choice("sde_step_logprob", "backend", backend, BACKENDS)
    validate.sde_step_logprob_args(v, x_t, x_next, mean_x=mean_x, mean_v=mean_v, std=std, mask=mask)
    triton = use_triton(backend, v.device, "sde_step_logprob")
    fn = sde_step_logprob_triton if triton else sde_step_logprob_reference
    with torch.no_grad():
        return fn(v, x_t, x_next, mean_x=mean_x, mean_v=mean_v, std=std, mask=mask)


def group_rewards(scores: Tensor, *, dim_weights: Tensor | None = None, std: str = "group", clip: float = 1.0,
                  eps: float = 1e-4, tau_mean: float | None = None, tau_std: float | None = None,
                  rule: str = "paper", backend: str = "auto") -> GroupRewards:
    """Judge scores [G, S] or [G, S, D] in [0, 1] -> GroupRewards(r, advantage, keep, mean, std).

    Dimensions are averaged with dim_weights; A = clip((s - mean_g) / (sigma + eps), -clip, clip)
    with sigma the group's std (std="group") or the batch's (std="global"), population stds;
    r = 1/2 + A / (2 clip) in [0, 1]. With tau_mean and tau_std, rule="paper" drops a group when
    mean > tau_mean and std < tau_std; rule="strict" keeps it only when mean < tau_mean and
    std > tau_std (the released Edit-R1 code); without them every group is kept.
    """
    validate.choice("group_rewards", "backend", backend, BACKENDS)
    validate.group_rewards_args(scores, dim_weights=dim_weights, std=std, clip=clip, eps=eps,
                                tau_mean=tau_mean, tau_std=tau_std, rule=rule)
    fn = group_rewards_triton if use_triton(backend, scores.device, "group_rewards") else group_rewards_reference
    return fn(scores, dim_weights=dim_weights, std=std, clip=clip, eps=eps, tau_mean=tau_mean,
              tau_std=tau_std, rule=rule)


def masked_blend_step(x_t: Tensor, v: Tensor, mask: Tensor, x0_known: Tensor, noise: Tensor,
                      t: float | Tensor, t_next: float | Tensor, *, backend: str = "auto") -> Tensor:
    """One sampler step that keeps the known region on its re-noised source:

    x_next = m (x_t + (t_next - t) v) + (1 - m) ((1 - t_next) x0_known + t_next noise)

    mask m (1 = generate, soft values blend) broadcasts to x_t: [B, 1, H, W] for [B, C, H, W],
    [B, L, C] or [B, L, 1] for packed tokens. t, t_next: numbers or [B] tensors in [0, 1].
    v, x0_known, noise have x_t's shape and dtype; the result has x_t's dtype (computed in fp32 or
    fp64). Differentiable in x_t, v, x0_known and noise.
    """
    validate.choice("masked_blend_step", "backend", backend, BACKENDS)
    validate.masked_blend_step_args(x_t, v, mask, x0_known, noise, t, t_next)
    triton = use_triton(backend, x_t.device, "masked_blend_step")
    fn = masked_blend_step_triton if triton else masked_blend_step_reference
    return fn(x_t, v, mask, x0_known, noise, t, t_next)


__all__ = ["nft_loss", "grpo_loss", "sde_step_logprob", "group_rewards", "GroupRewards", "masked_blend_step"]
