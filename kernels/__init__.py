"""Fused kernels for flow-matching RL: NFT loss, group rewards, mask-aware blend step.

Public API (other parts and users rely on these names):
    nft_loss, group_rewards, GroupRewards, masked_blend_step

PLACEHOLDER dispatch: until the Triton kernels land, every call runs the eager reference.
"""
from .reference import GroupRewards
from .reference import group_rewards_reference as _gr
from .reference import masked_blend_step_reference as _mb
from .reference import nft_loss_reference as _nft


def nft_loss(v_theta, v_old, v_target, r, t=None, *, beta, adaptive=True, v_ref=None,
             kl_coef=0.0, weight=None, reduction="mean", backend="auto"):
    return _nft(v_theta, v_old, v_target, r, t, beta=beta, adaptive=adaptive, v_ref=v_ref,
                kl_coef=kl_coef, weight=weight, reduction=reduction)


def group_rewards(scores, *, dim_weights=None, std="group", clip=1.0, eps=1e-4, tau_mean=None,
                  tau_std=None, rule="paper", backend="auto"):
    return _gr(scores, dim_weights=dim_weights, std=std, clip=clip, eps=eps, tau_mean=tau_mean,
               tau_std=tau_std, rule=rule)


def masked_blend_step(x_t, v, mask, x0_known, noise, t, t_next, *, backend="auto"):
    return _mb(x_t, v, mask, x0_known, noise, t, t_next)


__all__ = ["nft_loss", "group_rewards", "GroupRewards", "masked_blend_step"]
