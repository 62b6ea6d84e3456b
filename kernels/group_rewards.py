# Group rewards: dimension average, per-group normalisation, clip, low-std group filter (Triton).
#
# Maths (docs/design.md; scores s[g, i, d] in [0, 1], weights w_d):
#   s[g,i]  = sum_d w_d s[g,i,d] / sum_d w_d
#   mu_g    = mean_i s[g,i]        sigma_g = sqrt(mean_i (s[g,i] - mu_g)^2)        (ddof = 0)
#   sigma   = sigma_g ("group") or the population std of all s ("global")
#   A[g,i]  = clip((s[g,i] - mu_g) / (sigma + eps), -c, c)        r[g,i] = 1/2 + A / (2c)
#   keep_g  = not (mu_g > tau_mu and sigma_g < tau_sigma)   ("paper")
#             mu_g < tau_mu and sigma_g > tau_sigma          ("strict", the released Edit-R1 code)
#
# Memory-pass budget: a few thousand scalars, so passes are irrelevant; what costs is launches.
# One launch, one program: it walks the groups in tiles of [BLOCK_G, S], two-pass mean/std inside
# each tile (no cancellation), a second sweep for the global std when asked, and a last sweep that
# writes r and A. Eager PyTorch needs ~10-15 launches for the same.
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import launch
from .launch import acc_dtype, constants, next_pow2, tl_dtype
from .reference import GroupRewards

FILTERS = {None: 0, "paper": 1, "strict": 2}


@triton.jit
def _tile_stats(s_ptr, wd_ptr, wsum, g0, S, D, G,
                HAS_WD: tl.constexpr, ACC: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr):
    """Groups g0 .. g0 + BLOCK_G: dimension-averaged scores [BLOCK_G, BLOCK_S] (0 outside the
    tensor), their group means and population stds, the tile mask and the group indices."""
    gs = g0 + tl.arange(0, BLOCK_G)
    cs = tl.arange(0, BLOCK_S)
    m = (gs < G)[:, None] & (cs < S)[None, :]
    base = (gs[:, None] * S + cs[None, :]) * D
    s = tl.full([BLOCK_G, BLOCK_S], 0.0, ACC)
    for d in range(D):
        x = tl.load(s_ptr + base + d, mask=m, other=0.0).to(ACC)
        if HAS_WD:
            x = x * tl.load(wd_ptr + d).to(ACC)
        s += x
    s = s / wsum
    mu = tl.sum(s, axis=1) / S
    dev = tl.where(m, s - mu[:, None], 0.0)
    sigma = tl.sqrt(tl.sum(dev * dev, axis=1) / S)
    return s, mu, sigma, m, gs


@triton.jit
def _group_rewards_kernel(
    s_ptr, wd_ptr, params_ptr, r_ptr, adv_ptr, keep_ptr, mean_ptr, std_ptr,
    G, S, D,
    GLOBAL: tl.constexpr, FILTER: tl.constexpr, HAS_WD: tl.constexpr, ACC: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    clip = tl.load(params_ptr).to(ACC)
    eps = tl.load(params_ptr + 1).to(ACC)
    tau_mean = tl.load(params_ptr + 2).to(ACC)
    tau_std = tl.load(params_ptr + 3).to(ACC)
    if HAS_WD:
        ds = tl.arange(0, BLOCK_D)
        wsum = tl.sum(tl.load(wd_ptr + ds, mask=ds < D, other=0.0).to(ACC), axis=0)
    else:
        wsum = D

    # sweep 1: group means, stds and the filter; running total for the global mean
    total = tl.full([BLOCK_G], 0.0, ACC)
    for g0 in range(0, G, BLOCK_G):
        s, mu, sigma, m, gs = _tile_stats(s_ptr, wd_ptr, wsum, g0, S, D, G, HAS_WD, ACC, BLOCK_G, BLOCK_S)
        gm = gs < G
        tl.store(mean_ptr + gs, mu, mask=gm)
        tl.store(std_ptr + gs, sigma, mask=gm)
        total += tl.sum(s, axis=1)
        if FILTER == 1:
            keep = ~((mu > tau_mean) & (sigma < tau_std))
        elif FILTER == 2:
            keep = (mu < tau_mean) & (sigma > tau_std)
        else:
            keep = gs >= 0
        tl.store(keep_ptr + gs, keep.to(tl.int8), mask=gm)

    # sweep 2 (global): population std of every score around the batch mean
    if GLOBAL:
        gmean = tl.sum(total, axis=0) / (G * S)
        sq = tl.full([BLOCK_G], 0.0, ACC)
        for g0 in range(0, G, BLOCK_G):
            s, mu, sigma, m, gs = _tile_stats(s_ptr, wd_ptr, wsum, g0, S, D, G, HAS_WD, ACC, BLOCK_G, BLOCK_S)
            dev = tl.where(m, s - gmean, 0.0)
            sq += tl.sum(dev * dev, axis=1)
        global_sigma = tl.sqrt(tl.sum(sq, axis=0) / (G * S))

    # sweep 3: advantages and rewards (statistics recomputed in registers, not re-read: another
    # thread of this program may have written them)
    for g0 in range(0, G, BLOCK_G):
        s, mu, sigma, m, gs = _tile_stats(s_ptr, wd_ptr, wsum, g0, S, D, G, HAS_WD, ACC, BLOCK_G, BLOCK_S)
        if GLOBAL:
            a = (s - mu[:, None]) / (global_sigma + eps)
        else:
            a = (s - mu[:, None]) / (sigma[:, None] + eps)
        a = tl.minimum(tl.maximum(a, -clip), clip)
        offs = gs[:, None] * S + tl.arange(0, BLOCK_S)[None, :]
        tl.store(adv_ptr + offs, a, mask=m)
        tl.store(r_ptr + offs, 0.5 + a / (2.0 * clip), mask=m)


def group_rewards_triton(scores: Tensor, *, dim_weights: Tensor | None = None, std: str = "group",
                         clip: float = 1.0, eps: float = 1e-4, tau_mean: float | None = None,
                         tau_std: float | None = None, rule: str = "paper",
                         block_g: int | None = None) -> GroupRewards:
    """The Triton group rewards on already-validated inputs (kernels.group_rewards checks and
    dispatches). `block_g` overrides the groups per tile (tests use it to cross tile edges)."""
    G, S = scores.shape[:2]
    D = scores.shape[2] if scores.dim() == 3 else 1
    dev = scores.device
    acc = acc_dtype(scores.dtype)
    filtered = tau_mean is not None and tau_std is not None
    params = constants((float(clip), float(eps), float(tau_mean) if filtered else 0.0,
                        float(tau_std) if filtered else 0.0), acc, dev)
    s = scores.detach().contiguous()
    wd = None if dim_weights is None else dim_weights.detach().contiguous()
    r = launch.empty((G, S), acc, dev)
    adv = launch.empty((G, S), acc, dev)
    keep = launch.empty((G,), torch.int8, dev)
    mean = launch.empty((G,), acc, dev)
    sigma = launch.empty((G,), acc, dev)
    block_s = next_pow2(S)
    block_g = block_g or max(1, min(next_pow2(G), 4096 // block_s))
    _group_rewards_kernel[(1,)](
        s, s if wd is None else wd, params, r, adv, keep, mean, sigma, G, S, D,
        GLOBAL=std == "global", FILTER=FILTERS[rule if filtered else None], HAS_WD=wd is not None,
        ACC=tl_dtype(acc), BLOCK_G=block_g, BLOCK_S=block_s, BLOCK_D=next_pow2(D),
        num_warps=4,
    )
    return GroupRewards(r=r, advantage=adv, keep=keep.view(torch.bool), mean=mean, std=sigma)
