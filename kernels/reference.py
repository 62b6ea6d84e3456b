"""Eager PyTorch references: the executable specification of the kernels, written for reading.

The maths is docs/design.md's "The maths the kernels implement". The Triton kernels must match these
functions (values and gradients); tests compare against them, usually in fp64.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

ADAPTIVE_FLOOR = 1e-5
LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def nft_loss_reference(
    v_theta: Tensor,
    v_old: Tensor,
    v_target: Tensor,
    r: Tensor,
    t: Tensor | None = None,
    *,
    beta: float,
    adaptive: bool = True,
    v_ref: Tensor | None = None,
    kl_coef: float = 0.0,
    weight: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """DiffusionNFT loss (Edit-R1 eq. 4-6), computed in fp32 or wider.

    e+ = (1 - beta) v_old + beta v_theta - v        e- = (1 + beta) v_old - beta v_theta - v
    velocity form:  L = mean(e^2)
    adaptive form:  L = t^2 mean(e^2) / max(t mean|e|, 1e-5)   (the divisor is detached)
    loss_i = (r_i L+_i + (1 - r_i) L-_i) / beta + kl_coef * mean((v_theta - v_ref)^2)

    Tensors are [B, ...] and reduced per sample; r, t, weight are [B]. reduction="mean" is the
    weighted mean over samples with weight > 0, "none" returns the [B] losses.
    """
    acc = torch.promote_types(v_theta.dtype, torch.float32)
    B = v_theta.shape[0]
    vt = v_theta.to(acc).reshape(B, -1)
    vo = v_old.detach().to(acc).reshape(B, -1)
    v = v_target.detach().to(acc).reshape(B, -1)
    r = r.detach().to(acc)

    # e+- = d +- beta (v_theta - v_old) with d = v_old - v: the two formulas above, in fewer ops
    d = vo - v
    delta = beta * (vt - vo)
    e_pos, e_neg = d + delta, d - delta
    l_pos = e_pos.square().mean(1)
    l_neg = e_neg.square().mean(1)
    if adaptive:
        tt = t.detach().to(acc)
        # DiffusionNFT normalises by the detached mean abs error in fp64.
        w_pos = (tt * e_pos.detach().abs().mean(1, dtype=torch.float64)).clamp_min(ADAPTIVE_FLOOR)
        w_neg = (tt * e_neg.detach().abs().mean(1, dtype=torch.float64)).clamp_min(ADAPTIVE_FLOOR)
        l_pos = tt**2 * l_pos / w_pos.to(acc)
        l_neg = tt**2 * l_neg / w_neg.to(acc)
    loss = (r * l_pos + (1 - r) * l_neg) / beta
    if v_ref is not None:
        loss = loss + kl_coef * (vt - v_ref.detach().to(acc).reshape(B, -1)).square().mean(1)

    if reduction == "none":
        return loss
    w = torch.ones_like(loss) if weight is None else weight.detach().to(acc)
    kept = w > 0
    # Weighted mean over kept samples (dropped ones contribute nothing, not even a NaN); an
    # all-dropped batch gives an exact 0 with zero gradient.
    return torch.where(kept, loss * w, 0).sum() / torch.where(kept, w, 0).sum().clamp_min(torch.finfo(acc).tiny)


class GroupRewards(NamedTuple):
    r: Tensor          # [G, S] rewards in [0, 1]
    advantage: Tensor  # [G, S] clipped advantages in [-c, c]
    keep: Tensor       # [G] bool: the group survives the filter
    mean: Tensor       # [G] group means of the dimension-averaged scores
    std: Tensor        # [G] population std per group (ddof = 0)


def group_rewards_reference(
    scores: Tensor,
    *,
    dim_weights: Tensor | None = None,
    std: str = "group",
    clip: float = 1.0,
    eps: float = 1e-4,
    tau_mean: float | None = None,
    tau_std: float | None = None,
    rule: str = "paper",
) -> GroupRewards:
    """Scores [G, S] or [G, S, D] in [0, 1] -> rewards, advantages and the low-std group filter."""
    acc = torch.promote_types(scores.dtype, torch.float32)
    s = scores.to(acc)
    if s.dim() == 3:
        D = s.shape[2]
        wd = torch.ones(D, dtype=acc, device=s.device) if dim_weights is None else dim_weights.to(acc)
        s = (s * wd).sum(2) / wd.sum()
    mu = s.mean(1)
    sigma_g = ((s - mu[:, None]) ** 2).mean(1).sqrt()
    if std == "group":
        sigma = sigma_g[:, None]
    else:  # "global": one population std over every score of the batch
        sigma = ((s - s.mean()) ** 2).mean().sqrt()
    adv = ((s - mu[:, None]) / (sigma + eps)).clamp(-clip, clip)
    r = 0.5 + adv / (2 * clip)
    if tau_mean is None or tau_std is None:
        keep = torch.ones_like(mu, dtype=torch.bool)
    elif rule == "paper":
        keep = ~((mu > tau_mean) & (sigma_g < tau_std))
    else:  # "strict": the released Edit-R1 code
        keep = (mu < tau_mean) & (sigma_g > tau_std)
    return GroupRewards(r=r, advantage=adv, keep=keep, mean=mu, std=sigma_g)


def masked_blend_step_reference(
    x_t: Tensor,
    v: Tensor,
    mask: Tensor,
    x0_known: Tensor,
    noise: Tensor,
    t: float | Tensor,
    t_next: float | Tensor,
) -> Tensor:
    """x_next = m (x_t + (t' - t) v) + (1 - m) ((1 - t') x0_known + t' noise); m = 1 generates."""
    acc = torch.promote_types(x_t.dtype, torch.float32)

    def per_sample(a: float | Tensor) -> Tensor | float:
        if isinstance(a, Tensor) and a.dim() == 1:
            return a.to(acc).reshape(-1, *([1] * (x_t.dim() - 1)))
        return a.to(acc) if isinstance(a, Tensor) else a

    tt, tn = per_sample(t), per_sample(t_next)
    m = mask.to(acc)
    euler = x_t.to(acc) + (tn - tt) * v.to(acc)
    renoised = (1 - tn) * x0_known.to(acc) + tn * noise.to(acc)
    return (m * euler + (1 - m) * renoised).to(x_t.dtype)


def _rows(x: Tensor, B: int, acc: torch.dtype) -> Tensor:
    return x.to(acc).reshape(B, -1)


def _per_sample(x: Tensor, acc: torch.dtype) -> Tensor:
    return x.detach().to(acc)[:, None]


def _nonzero(count: Tensor) -> Tensor:
    """M, or 1 where a sample has no generated element (its sums are 0 then, and stay 0 in the
    gradient; a tiny M would turn that 0 into 0 x inf)."""
    return torch.where(count > 0, count, torch.ones_like(count))


def sde_step_logprob_reference(
    v: Tensor,
    x_t: Tensor,
    x_next: Tensor,
    *,
    mean_x: Tensor,
    mean_v: Tensor,
    std: Tensor,
    mask: Tensor | None = None,
) -> Tensor:
    """Per-sample log-probability of an SDE step x_t -> x_next under N(mean_x x_t + mean_v v, std^2),
    as Flow-GRPO takes it: the mean over the sample's elements of the elementwise Gaussian
    log-density, here weighted by `mask` (1 = generated; the kept region is blended, not sampled):

        logp_b = -sum_i m_i (x_next_i - mu_i)^2 / (2 std_b^2 M_b) - log std_b - log sqrt(2 pi),
        mu = mean_x_b x_t + mean_v_b v,   M_b = sum_i m_i   (a sample with M_b = 0: the constant terms)

    Computed in fp32 or wider; differentiable in v (the velocity of the policy being scored)."""
    acc = torch.promote_types(v.dtype, torch.float32)
    B = v.shape[0]
    mu = _per_sample(mean_x, acc) * _rows(x_t.detach(), B, acc) + _per_sample(mean_v, acc) * _rows(v, B, acc)
    e = _rows(x_next.detach(), B, acc) - mu
    s = std.detach().to(acc)
    if mask is None:
        quad, count = e.square().sum(1), torch.full((B,), float(e.shape[1]), dtype=acc, device=v.device)
    else:
        m = _rows(mask.detach().expand(v.shape), B, acc)
        quad, count = (m * e.square()).sum(1), m.sum(1)
    return -quad / (2 * s**2 * _nonzero(count)) - torch.log(s) - LOG_SQRT_2PI


def grpo_loss_reference(
    v_theta: Tensor,
    x_t: Tensor,
    x_next: Tensor,
    advantage: Tensor,
    logp_old: Tensor | None = None,
    *,
    mean_x: Tensor,
    mean_v: Tensor,
    std: Tensor,
    mask: Tensor | None = None,
    clip_range: float,
    v_ref: Tensor | None = None,
    kl_coef: float = 0.0,
    weight: Tensor | None = None,
    reduction: str = "mean",
    return_logp: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Flow-GRPO's clipped policy objective of one SDE step per sample (docs/design.md):

        logp  = sde_step_logprob_reference(v_theta, ...)            (mask-weighted mean over elements)
        ratio = exp(logp - logp_old)         (logp_old None: the sampling policy is the current one,
                                              logp_old = logp detached, so ratio = 1 exactly)
        loss_b = max(-A ratio, -A clip(ratio, 1 - clip_range, 1 + clip_range))
                 + kl_coef sum_i m_i (mean_v (v_theta - v_ref))_i^2 / (2 std^2 M_b)
    The KL term is the KL between the trained and the reference step Gaussians (same std), per
    generated element. reduction "mean": weighted mean over samples with weight > 0; "none": [B].
    With `return_logp`, also the per-sample logp (detached). Gradient to v_theta only."""
    acc = torch.promote_types(v_theta.dtype, torch.float32)
    B = v_theta.shape[0]
    kw = dict(mean_x=mean_x, mean_v=mean_v, std=std, mask=mask)
    logp = sde_step_logprob_reference(v_theta, x_t, x_next, **kw)
    old = logp.detach() if logp_old is None else logp_old.detach().to(acc)
    ratio = torch.exp(logp - old)
    a = advantage.detach().to(acc)
    loss = torch.maximum(-a * ratio, -a * ratio.clamp(1 - clip_range, 1 + clip_range))
    if v_ref is not None:
        d = _per_sample(mean_v, acc) * (_rows(v_theta, B, acc) - _rows(v_ref.detach(), B, acc))
        if mask is None:
            quad, count = d.square().sum(1), torch.full((B,), float(d.shape[1]), dtype=acc, device=d.device)
        else:
            m = _rows(mask.detach().expand(v_theta.shape), B, acc)
            quad, count = (m * d.square()).sum(1), m.sum(1)
        s = std.detach().to(acc)
        loss = loss + kl_coef * quad / (2 * s**2 * _nonzero(count))
    if reduction == "mean":
        w = torch.ones_like(loss) if weight is None else weight.detach().to(acc)
        kept = w > 0
        loss = torch.where(kept, loss * w, 0).sum() / torch.where(kept, w, 0).sum().clamp_min(torch.finfo(acc).tiny)
    return (loss, logp.detach()) if return_logp else loss
