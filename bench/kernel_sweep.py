"""The kernel sweep: each kernel at sizes from the tiny CPU model to FLUX scale, as the eager
reference, torch.compile of the reference, and (on a GPU) the Triton kernel, without and with the
public function's input checks. Every row carries a correctness check against an fp64 reference.

Sizes: FLUX at 1024^2 is 4096 tokens x 64 channels per image; the trainers use 8..48 images per
micro-batch; groups are 12-24 images (Edit-R1 / DiffusionNFT recipes).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

import kernels
from kernels.reference import (
    group_rewards_reference,
    grpo_loss_reference,
    masked_blend_step_reference,
    nft_loss_reference,
    sde_step_logprob_reference,
)

from . import timing

NFT_SIZES = {"tiny-64px": (2, 256, 48), "512px-b8": (8, 1024, 64), "flux-1024px-b8": (8, 4096, 64),
             "flux-1024px-b48": (48, 4096, 64)}
GROUP_SIZES = {"quick-2x4": (2, 4, 1), "edit-r1-24x12": (24, 12, 1), "nft-48x24x4": (48, 24, 4)}
NFT_VARIANTS = {  # (adaptive, reduction, kl_coef): the trainer's call, and the plain paper form
    "adaptive+kl,none": (True, "none", 1e-4),
    "velocity,mean": (False, "mean", 0.0),
}


GRPO_VARIANTS = {  # (on-policy, kl_coef): the first update of a step (ratio 1), a later one with the KL
    "on-policy,mask": (True, 0.0),
    "off-policy+kl,mask": (False, 0.04),
}


@dataclass
class Case:
    kernel: str
    variant: str
    size: str
    dtype: torch.dtype
    bytes: int                                  # what the fused kernel moves (its pass budget)
    impls: dict[str, Callable[[], object]]      # name -> one call (fwd+bwd for the loss)
    check: Callable[[object], float]            # result -> relative error against fp64


def _rel_err(got, exact) -> float:
    got = [got] if isinstance(got, torch.Tensor) else list(got)
    exact = [exact] if isinstance(exact, torch.Tensor) else list(exact)
    err = 0.0
    for a, b in zip(got, exact):
        b = b.double()
        err = max(err, ((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-300)).item())
    return err


def _compiled(fn):
    return torch.compile(fn, dynamic=None)


def nft_cases(device: torch.device, dtypes, sizes, variants) -> list[Case]:
    compiled = _compiled(nft_loss_reference)
    return [_nft_case(device, dtype, size, variant, compiled) for size in sizes for dtype in dtypes
            for variant in variants]


def _nft_case(device, dtype, size, variant, compiled) -> Case:
    B, L, C = NFT_SIZES[size]
    g = torch.Generator(device="cpu").manual_seed(0)

    def make():
        return torch.randn(B, L, C, generator=g).to(device=device, dtype=dtype)

    vt = make().requires_grad_()
    vo, v, v_ref = (vt.detach() + 0.1 * make()).to(dtype), make(), make()
    r, t = torch.rand(B, generator=g).to(device), torch.rand(B, generator=g).to(device)
    adaptive, reduction, kl = NFT_VARIANTS[variant]
    ref = v_ref if kl > 0 else None
    kw = dict(beta=1.0, adaptive=adaptive, v_ref=ref, kl_coef=kl, reduction=reduction)
    go = torch.ones(() if reduction == "mean" else (B,), device=device)

    def step(fn):
        out = fn(vt, vo, v, r, t, **kw)
        return out, torch.autograd.grad(out, vt, go)[0]

    impls = {"eager": lambda: step(nft_loss_reference), "compile": lambda: step(compiled)}
    if device.type == "cuda":
        impls["triton"] = lambda: step(kernels.nft_loss_triton)
        impls["triton+checks"] = lambda: step(kernels.nft_loss)
    exact_vt = vt.detach().double().requires_grad_()
    exact_kw = dict(kw, v_ref=None if ref is None else ref.double())
    exact_out = nft_loss_reference(exact_vt, vo.double(), v.double(), r, t, **exact_kw)
    exact = (exact_out.detach(), torch.autograd.grad(exact_out, exact_vt, go.double())[0])
    # the fused kernel's pass budget (nft_loss.py): velocity 6, adaptive 7; v_ref +1 / +2
    passes = (7 if adaptive else 6) + (0 if ref is None else 2 if adaptive else 1)
    nbytes = passes * B * L * C * (torch.finfo(dtype).bits // 8)
    return Case("nft_loss fwd+bwd", variant, size, dtype, nbytes, impls, lambda res: _rel_err(res, exact))


def grpo_cases(device: torch.device, dtypes, sizes, variants) -> list[Case]:
    compiled = _compiled(grpo_loss_reference)
    return [_grpo_case(device, dtype, size, variant, compiled) for size in sizes for dtype in dtypes
            for variant in variants]


def _grpo_case(device, dtype, size, variant, compiled) -> Case:
    B, L, C = NFT_SIZES[size]
    g = torch.Generator(device="cpu").manual_seed(3)

    def make():
        return torch.randn(B, L, C, generator=g)

    x, v_old = make(), make()
    mean_x, mean_v, std = 1 + 0.1 * torch.rand(B, generator=g), -0.1 - 0.2 * torch.rand(B, generator=g), \
        0.1 + 0.3 * torch.rand(B, generator=g)
    xn = mean_x.view(B, 1, 1) * x + mean_v.view(B, 1, 1) * v_old + std.view(B, 1, 1) * make()
    vt = (v_old + 0.05 * make()).to(device=device, dtype=dtype).requires_grad_()
    x, xn, v_ref = (z.to(device=device, dtype=dtype) for z in (x, xn, make()))
    mask = (torch.rand(B, L, C, generator=g) > 0.3).to(device=device, dtype=dtype)
    step = {k: z.to(device) for k, z in dict(mean_x=mean_x, mean_v=mean_v, std=std).items()}
    adv = torch.randn(B, generator=g).to(device)
    on_policy, kl = GRPO_VARIANTS[variant]
    logp_old = None if on_policy else (sde_step_logprob_reference(vt.detach(), x, xn, mask=mask, **step)
                                       + 0.1 * torch.randn(B, generator=g).to(device))
    ref = v_ref if kl > 0 else None
    kw = dict(mask=mask, clip_range=0.2, v_ref=ref, kl_coef=kl, reduction="mean", **step)

    def run(fn):
        out = fn(vt, x, xn, adv, logp_old, **kw)
        return out, torch.autograd.grad(out, vt)[0]

    impls = {"eager": lambda: run(grpo_loss_reference), "compile": lambda: run(compiled)}
    if device.type == "cuda":
        impls["triton"] = lambda: run(kernels.grpo_loss_triton)
        impls["triton+checks"] = lambda: run(kernels.grpo_loss)
    exact_vt = vt.detach().double().requires_grad_()
    exact_kw = dict(kw, mask=mask.double(), v_ref=None if ref is None else ref.double())
    exact_out = grpo_loss_reference(exact_vt, x.double(), xn.double(), adv, logp_old, **exact_kw)
    exact = (exact_out.detach(), torch.autograd.grad(exact_out, exact_vt)[0])
    # the fused kernel's pass budget (grpo_loss.py): 7 with the mask; v_ref +1 on-policy, +3 off-policy
    passes = 7 + (0 if ref is None else 1 if on_policy else 3)
    nbytes = passes * B * L * C * (torch.finfo(dtype).bits // 8)
    return Case("grpo_loss fwd+bwd", variant, size, dtype, nbytes, impls, lambda res: _rel_err(res, exact))


def blend_cases(device: torch.device, dtypes, sizes) -> list[Case]:
    compiled = _compiled(masked_blend_step_reference)
    return [_blend_case(device, dtype, size, compiled) for size in sizes for dtype in dtypes]


def _blend_case(device, dtype, size, compiled) -> Case:
    B, L, C = NFT_SIZES[size]
    g = torch.Generator(device="cpu").manual_seed(1)
    x, v, x0, noise = (torch.randn(B, L, C, generator=g).to(device=device, dtype=dtype) for _ in range(4))
    mask = (torch.rand(B, L, 1, generator=g) > 0.5).float().to(device)
    t = torch.full((B,), 0.75, device=device)
    tn = torch.full((B,), 0.6, device=device)
    args = (x, v, mask, x0, noise, t, tn)
    impls = {"eager": lambda: masked_blend_step_reference(*args), "compile": lambda: compiled(*args)}
    if device.type == "cuda":
        impls["triton"] = lambda: kernels.masked_blend_step_triton(*args)
        impls["triton+checks"] = lambda: kernels.masked_blend_step(*args)
    exact = masked_blend_step_reference(x.double(), v.double(), mask, x0.double(), noise.double(), t, tn)
    nbytes = 5 * x.numel() * x.element_size() + mask.numel() * mask.element_size()
    return Case("masked_blend_step", "per-token mask, no grad", size, dtype, nbytes, impls,
                lambda res: _rel_err(res, exact))


def group_cases(device: torch.device, sizes) -> list[Case]:
    compiled = _compiled(group_rewards_reference)
    return [_group_case(device, size, compiled) for size in sizes]


def _group_case(device, size, compiled) -> Case:
    kw = dict(std="global", clip=5.0, tau_mean=0.9, tau_std=0.05)
    G, S, D = GROUP_SIZES[size]
    g = torch.Generator(device="cpu").manual_seed(2)
    scores = torch.rand(G, S, D, generator=g).to(device)
    impls = {"eager": lambda: group_rewards_reference(scores, **kw), "compile": lambda: compiled(scores, **kw)}
    if device.type == "cuda":
        impls["triton"] = lambda: kernels.group_rewards_triton(scores, **kw)
        impls["triton+checks"] = lambda: kernels.group_rewards(scores, **kw)
    exact = group_rewards_reference(scores.double(), **kw)
    nbytes = scores.numel() * 4 + (2 * G * S + 3 * G) * 4
    return Case("group_rewards", "global std, filter", size, torch.float32, nbytes, impls,
                lambda res: _rel_err((res.r, res.advantage), (exact.r, exact.advantage)))


def plan(device: torch.device, quick: bool) -> list[Case]:
    if device.type == "cuda":
        dtypes = [torch.bfloat16] if quick else [torch.bfloat16, torch.float32]
        sizes = ["512px-b8", "flux-1024px-b8"] if quick else list(NFT_SIZES)
    else:
        dtypes = [torch.float32]
        sizes = ["tiny-64px", "512px-b8"] if quick else list(NFT_SIZES)
    variants = ["adaptive+kl,none"] if quick else list(NFT_VARIANTS)
    grpo_variants = ["off-policy+kl,mask"] if quick else list(GRPO_VARIANTS)
    return (nft_cases(device, dtypes, sizes, variants) + grpo_cases(device, dtypes, sizes, grpo_variants)
            + blend_cases(device, dtypes, sizes) + group_cases(device, list(GROUP_SIZES)))


def run(device: torch.device, quick: bool, peak_gbps: float | None, log: Callable[[str], None]) -> list[dict]:
    """Measure every case; returns one row per (case, implementation)."""
    rows = []
    budget = 0.05 if quick else 0.3
    for case in plan(device, quick):
        measured = {}
        for impl, fn in case.impls.items():
            with torch.no_grad() if not case.kernel.endswith("fwd+bwd") else torch.enable_grad():
                err = case.check(fn())
                wall = timing.wall_us(fn, device, budget)
                dev_us = timing.device_us(fn, device)
                row = {"kernel": case.kernel, "variant": case.variant, "size": case.size,
                       "dtype": str(case.dtype).replace("torch.", ""), "impl": impl, "bytes": case.bytes,
                       "time_us": wall, "device_us": dev_us, "launches": timing.launches(fn, device),
                       "extra_peak_mb": timing.extra_peak_mb(fn, device), "rel_err_vs_fp64": err}
            basis = dev_us if dev_us is not None else wall
            row["gbps"] = case.bytes / basis / 1e3
            row["pct_peak"] = 100 * row["gbps"] / peak_gbps if peak_gbps else None
            measured[impl] = row
            rows.append(row)
            log(f"  {case.kernel:18s} {case.size:16s} {row['dtype']:8s} {impl:13s} {wall:10.1f} us")
        for row in measured.values():
            row["speedup_vs_eager"] = measured["eager"]["time_us"] / row["time_us"]
            row["speedup_vs_compile"] = measured["compile"]["time_us"] / row["time_us"]
    return rows
