"""Eager PyTorch references: the executable specification of the kernels, written for reading.

The maths is docs/design.md's "The maths the kernels implement". The Triton kernels must match these
functions (values and gradients); tests compare against them, usually in fp64.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

ADAPTIVE_FLOOR = 1e-5


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
