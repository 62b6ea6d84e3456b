"""The compiled Triton kernels on a GPU at FLUX scale (1024^2 image -> 4096 tokens x 64 channels,
batch 8; groups of 24), every dtype, against the eager references. Skipped without CUDA."""
import pytest
import torch
from kernel_testing import assert_low_precision, guarded, guarded_buffers, rand, randn

import kernels
from kernels.reference import (
    group_rewards_reference,
    grpo_loss_reference,
    masked_blend_step_reference,
    nft_loss_reference,
    sde_step_logprob_reference,
)

pytestmark = pytest.mark.cuda

B, L, C = 8, 4096, 64
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def nft_inputs(dtype, seed=0):
    vt = randn((B, L, C), dtype, seed, device="cuda").requires_grad_()
    vo = (vt.detach().double() + 0.1 * randn((B, L, C), seed=seed + 1, device="cuda")).to(dtype)
    v = randn((B, L, C), dtype, seed + 2, device="cuda")
    v_ref = randn((B, L, C), dtype, seed + 3, device="cuda")
    r, t = rand(B, seed=seed + 4, device="cuda"), rand(B, seed=seed + 5, device="cuda")
    weight = (rand(B, seed=seed + 6, device="cuda") > 0.25).double()
    return vt, vo, v, v_ref, r, t, weight


def loss_grad(fn, vt, vo, v, v_ref, r, t, weight, **kw):
    out = fn(vt, vo, v, r, t, v_ref=v_ref, weight=weight if kw.get("reduction") == "mean" else None, **kw)
    go = torch.linspace(0.5, 1.5, out.numel(), device="cuda", dtype=out.dtype).reshape(out.shape)
    (g,) = torch.autograd.grad(out, vt, go)
    return out, g


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("adaptive", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_nft_loss_at_flux_scale(dtype, adaptive, reduction):
    vt, vo, v, v_ref, r, t, weight = nft_inputs(dtype)
    kw = dict(beta=0.1, adaptive=adaptive, kl_coef=1e-2, reduction=reduction)
    with guarded_buffers():
        out, g = loss_grad(kernels.nft_loss, guarded(vt), guarded(vo), guarded(v), guarded(v_ref), r, t, weight, **kw)
    eager, eager_g = loss_grad(nft_loss_reference, vt, vo, v, v_ref, r, t, weight, **kw)
    exact_in = [x.detach().double().requires_grad_(i == 0) for i, x in enumerate((vt, vo, v, v_ref))]
    exact, exact_g = loss_grad(nft_loss_reference, *exact_in, r, t, weight, **kw)
    assert g.dtype == dtype and out.dtype == eager.dtype
    if dtype == torch.float64:
        torch.testing.assert_close(out, exact, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(g, exact_g, rtol=1e-10, atol=1e-10 * exact_g.abs().max().item())
    else:
        assert_low_precision(out, eager, exact, torch.float32, scale=exact.abs().max().item())
        assert_low_precision(g, eager_g, exact_g, dtype, scale=exact_g.abs().max().item())


def test_nft_loss_is_bit_identical_run_to_run():
    vt, vo, v, v_ref, r, t, weight = nft_inputs(torch.bfloat16, seed=3)
    runs = [loss_grad(kernels.nft_loss, vt, vo, v, v_ref, r, t, weight, beta=1.0, kl_coef=1e-4, reduction="mean")
            for _ in range(3)]
    assert all(torch.equal(runs[0][0], o) and torch.equal(runs[0][1], g) for o, g in runs[1:])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["per_token", "elementwise", "per_pixel"])
def test_masked_blend_step_at_flux_scale(dtype, layout):
    if layout == "per_pixel":  # the unpacked latent [B, 16, 128, 128] with a pixel mask
        x_shape, m_shape = (B, 16, 128, 128), (B, 1, 128, 128)
    else:
        x_shape, m_shape = (B, L, C), ((B, L, 1) if layout == "per_token" else (B, L, C))
    x, v, x0, noise = [randn(x_shape, dtype, i, device="cuda").requires_grad_(i < 2) for i in range(4)]
    mask = rand(m_shape, torch.float32, 9, device="cuda")
    t = torch.full((B,), 0.75, device="cuda")
    with guarded_buffers():
        out = kernels.masked_blend_step(guarded(x), guarded(v), mask, x0, noise, t, 0.6)
    eager = masked_blend_step_reference(x, v, mask, x0, noise, t, 0.6)
    exact = masked_blend_step_reference(x.detach().double(), v.detach().double(), mask, x0.double(), noise.double(),
                                        t, 0.6)
    if dtype in (torch.float32, torch.float64):
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(out, eager, **tol)
    else:
        assert_low_precision(out, eager, exact, dtype, scale=exact.abs().max().item())
    out = kernels.masked_blend_step(x, v, mask, x0, noise, t, 0.6)
    go = randn(x_shape, dtype, 20, device="cuda")
    got = torch.autograd.grad(out, (x, v), go)
    want = torch.autograd.grad(eager, (x, v), go)
    for a, b in zip(got, want):
        assert a.dtype == dtype
        torch.testing.assert_close(a.double(), b.double(), rtol=0,
                                   atol=2 * torch.finfo(dtype).eps * b.abs().max().item())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("std", ["group", "global"])
def test_group_rewards_on_gpu(dtype, std):
    scores = rand((48, 24, 4), dtype, 1, device="cuda")
    wd = torch.tensor([1.0, 1.0, 2.0, 0.5], device="cuda", dtype=dtype)
    got = kernels.group_rewards(scores, dim_weights=wd, std=std, clip=5.0)
    ref = group_rewards_reference(scores, dim_weights=wd, std=std, clip=5.0)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    for name in ("r", "advantage", "mean", "std"):
        torch.testing.assert_close(getattr(got, name), getattr(ref, name), **tol)
    assert torch.equal(got.keep, ref.keep)


def grpo_inputs(dtype, on_policy, seed=0):
    """An SDE step at FLUX scale: x_next = mean + std z, v_theta near the sampling velocity, a binary
    elementwise mask; off-policy, logp_old puts the ratios inside and outside the clip range 0.2."""
    x = randn((B, L, C), torch.float64, seed, device="cuda")
    v_old = randn((B, L, C), torch.float64, seed + 1, device="cuda")
    mean_x = 1 + 0.1 * rand(B, seed=seed + 2, device="cuda")
    mean_v = -(0.05 + 0.3 * rand(B, seed=seed + 3, device="cuda"))
    std = 0.05 + 0.5 * rand(B, seed=seed + 4, device="cuda")
    xn = (mean_x.view(B, 1, 1) * x + mean_v.view(B, 1, 1) * v_old
          + std.view(B, 1, 1) * randn((B, L, C), torch.float64, seed + 5, device="cuda"))
    vt = (v_old + 0.05 * randn((B, L, C), torch.float64, seed + 6, device="cuda")).to(dtype).requires_grad_()
    mask = (rand((B, L, C), seed=seed + 7, device="cuda") > 0.3).to(dtype)
    v_ref = randn((B, L, C), dtype, seed + 8, device="cuda")
    adv = randn(B, torch.float64, seed + 9, device="cuda")
    weight = (rand(B, seed=seed + 10, device="cuda") > 0.25).double()
    step = dict(mean_x=mean_x, mean_v=mean_v, std=std, mask=mask)
    x, xn = x.to(dtype), xn.to(dtype)
    logp_old = None
    if not on_policy:
        exact = sde_step_logprob_reference(vt.detach().double(), x.double(), xn.double(),
                                           **dict(step, mask=mask.double()))
        shift = torch.tensor([0.3, -3.0, -0.3, 3.0] * (B // 4), dtype=torch.float64, device="cuda") * 0.18
        logp_old = exact + shift
    return vt, x, xn, adv, logp_old, v_ref, weight, step


def grpo_loss_grad(fn, vt, x, xn, adv, logp_old, v_ref, weight, step, **kw):
    out = fn(vt, x, xn, adv, logp_old, v_ref=v_ref, weight=weight if kw.get("reduction") == "mean" else None,
             **step, **kw)
    go = torch.linspace(0.5, 1.5, out.numel(), device="cuda", dtype=out.dtype).reshape(out.shape)
    (g,) = torch.autograd.grad(out, vt, go)
    return out, g


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("on_policy", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_grpo_loss_at_flux_scale(dtype, on_policy, reduction):
    vt, x, xn, adv, logp_old, v_ref, weight, step = grpo_inputs(dtype, on_policy)
    kw = dict(clip_range=0.2, kl_coef=0.04, reduction=reduction)
    with guarded_buffers():
        out, g = grpo_loss_grad(kernels.grpo_loss, guarded(vt), guarded(x), guarded(xn), adv, logp_old,
                                guarded(v_ref), weight, step, **kw)
    eager, eager_g = grpo_loss_grad(grpo_loss_reference, vt, x, xn, adv, logp_old, v_ref, weight, step, **kw)
    exact_vt = vt.detach().double().requires_grad_()
    exact_step = dict(step, mask=step["mask"].double())
    exact, exact_g = grpo_loss_grad(grpo_loss_reference, exact_vt, x.double(), xn.double(), adv, logp_old,
                                    v_ref.double(), weight, exact_step, **kw)
    assert g.dtype == dtype and out.dtype == eager.dtype
    if dtype == torch.float64:
        torch.testing.assert_close(out, exact, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(g, exact_g, rtol=1e-10, atol=1e-10 * exact_g.abs().max().item())
    else:
        assert_low_precision(out, eager, exact, torch.float32, scale=exact.abs().max().item())
        assert_low_precision(g, eager_g, exact_g, dtype, scale=exact_g.abs().max().item())
