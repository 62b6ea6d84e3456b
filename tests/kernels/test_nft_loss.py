"""NFT loss: the Triton kernel (interpreted on CPU) against the eager reference, its gradient,
and properties of the maths itself."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from kernel_testing import (
    TOL,
    assert_low_precision,
    guarded,
    guarded_buffers,
    per_combination,
    rand,
    randn,
)

import kernels
from kernels.nft_loss import nft_loss_triton
from kernels.reference import nft_loss_reference


def make_inputs(B, n, dtype, seed, *, r_mode="uniform", t_mode="uniform", has_ref=False, has_weight=False,
                shape_tail=()):
    shape = (B, n, *shape_tail)
    vt = randn(shape, dtype, seed)
    vo = vt.double() + 0.3 * randn(shape, torch.float64, seed + 1)  # v_theta close to v_old, as in training
    v = randn(shape, dtype, seed + 2)
    r = {"zero": torch.zeros(B), "one": torch.ones(B), "binary": (rand(B, seed=seed + 3) > 0.5).double(),
         "uniform": rand(B, seed=seed + 3)}[r_mode].to(dtype)
    # "tiny": t mean|e| < 1e-5, the adaptive weight is its floor
    t = {"zero": torch.zeros(B), "one": torch.ones(B), "uniform": rand(B, seed=seed + 4),
         "tiny": 1e-6 * rand(B, seed=seed + 4)}[t_mode].to(dtype)
    v_ref = randn(shape, dtype, seed + 5) if has_ref else None
    weight = None
    if has_weight:
        weight = torch.where(rand(B, seed=seed + 6) > 0.3, 2 * rand(B, seed=seed + 7), torch.zeros(B)).to(dtype)
    return dict(v_theta=vt.requires_grad_(), v_old=vo.to(dtype), v_target=v, r=r, t=t, v_ref=v_ref, weight=weight)


def call(fn, inp, **kw):
    args = dict(inp)
    return fn(args.pop("v_theta"), args.pop("v_old"), args.pop("v_target"), args.pop("r"), args.pop("t"),
              **args, **kw)


def loss_and_grad(fn, inp, seed, **kw):
    out = call(fn, inp, **kw)
    go = rand(out.shape, out.dtype, seed) + 0.5
    (grad,) = torch.autograd.grad(out, inp["v_theta"], go)
    return out, grad


# The options that select a different kernel path (ADAPTIVE, MEAN, HAS_REF, HAS_WEIGHT): all
# 2 x 2 x 2 x 2 = 16 combinations. The 4 with a weight and reduction="none" are refused by
# kernels.nft_loss (test_weight_with_reduction_none_is_refused); the other 12 are each a test case
# of the comparison with the reference, and hypothesis draws shapes and values for each.
NFT_OPTIONS = [(adaptive, reduction, has_ref, has_weight) for adaptive in (False, True)
               for reduction in ("mean", "none") for has_ref in (False, True) for has_weight in (False, True)]
VALID_OPTIONS = [o for o in NFT_OPTIONS if not (o[1] == "none" and o[3])]


def options_id(o):
    return "-".join(("adaptive" if o[0] else "velocity", o[1], "ref" if o[2] else "noref",
                     "weight" if o[3] else "noweight"))


@st.composite
def nft_cases(draw):
    """Shapes and values: sizes around the tile (1, BLOCK - 1, BLOCK, BLOCK + 1, odd), chunked
    samples, r in {0, 1, binary, uniform}, t in {0, 1, uniform, under the adaptive floor}, beta tiny
    to 1, [B, N] or [B, N, C].
    (The first choice of each list is what hypothesis's first, simplest example takes: a general one.)"""
    block = draw(st.sampled_from([16, 64]))
    return dict(
        dtype=draw(st.sampled_from([torch.float64, torch.float32])),
        block=block,
        n=draw(st.sampled_from([3 * block + 5, 1, block - 1, block, block + 1])),
        shape_tail=draw(st.sampled_from([(), (3,)])),
        B=draw(st.sampled_from([3, 1, 2, 4])),
        chunks=draw(st.sampled_from([2, 1, 3])),
        r_mode=draw(st.sampled_from(["uniform", "zero", "one", "binary"])),
        t_mode=draw(st.sampled_from(["uniform", "zero", "one", "tiny"])),
        beta=draw(st.sampled_from([0.1, 1e-3, 1.0])),
        kl_coef=draw(st.sampled_from([0.5, 0.0, 2.0])),
        seed=draw(st.integers(0, 2**16)),
    )


@pytest.mark.parametrize("adaptive, reduction, has_ref, has_weight", VALID_OPTIONS,
                         ids=[options_id(o) for o in VALID_OPTIONS])
@per_combination(1 / 3)
@given(case=nft_cases())
def test_matches_reference_values_and_gradients(adaptive, reduction, has_ref, has_weight, case):
    dtype = case["dtype"]
    inp = make_inputs(case["B"], case["n"], dtype, case["seed"], r_mode=case["r_mode"], t_mode=case["t_mode"],
                      has_ref=has_ref, has_weight=has_weight, shape_tail=case["shape_tail"])
    kw = dict(beta=case["beta"], adaptive=adaptive, kl_coef=case["kl_coef"] if has_ref else 0.0,
              reduction=reduction)
    guarded_inp = {k: None if x is None else guarded(x) for k, x in inp.items()}
    with guarded_buffers():
        out, grad = loss_and_grad(nft_loss_triton, guarded_inp, case["seed"], block=case["block"],
                                  chunks=case["chunks"], **kw)
    ref, ref_grad = loss_and_grad(nft_loss_reference, inp, case["seed"], **kw)
    assert out.dtype == ref.dtype and out.shape == ref.shape and grad.dtype == dtype
    torch.testing.assert_close(out, ref, **TOL[dtype])
    scale = gradient_term_scale(inp, case["seed"], **kw)
    torch.testing.assert_close(grad, ref_grad, rtol=TOL[dtype]["rtol"], atol=TOL[dtype]["rtol"] * scale + 1e-300)


def gradient_term_scale(inp, seed, **kw):
    """The size of the terms the gradient sums: max |r g+| + |(1 - r) g-|, with g+- the gradients
    of the r = 1 and r = 0 losses (fp64 reference). The gradient itself is r g+ + (1 - r) g-, about
    (2r - 1) d + beta (v_theta - v_old) per element: with r near 1/2 and a small beta its terms
    cancel, and rounding errors of the size of the terms (not of the result) are correct."""
    exact = {k: None if x is None else x.detach().double() for k, x in inp.items()}
    grads = []
    for r in (torch.ones_like(exact["r"]), torch.zeros_like(exact["r"])):
        branch = dict(exact, r=r, v_theta=exact["v_theta"].clone().requires_grad_())
        grads.append(loss_and_grad(nft_loss_reference, branch, seed, **kw)[1])
    r = exact["r"].reshape(-1, *[1] * (grads[0].dim() - 1))
    return (r * grads[0].abs() + (1 - r) * grads[1].abs()).max().item()


@pytest.mark.parametrize("adaptive, has_ref", [(False, False), (False, True), (True, False), (True, True)])
def test_weight_with_reduction_none_is_refused(adaptive, has_ref):
    """The other 4 of the 16 option combinations: a per-sample weight has no meaning without the
    batch mean, so the public function refuses it, whatever the backend."""
    inp = make_inputs(2, 8, torch.float64, seed=1, has_ref=has_ref, has_weight=True)
    for backend in ("torch", "triton"):
        with pytest.raises(ValueError, match="weight only applies to reduction='mean'"):
            call(kernels.nft_loss, inp, beta=1.0, adaptive=adaptive, kl_coef=0.5 if has_ref else 0.0,
                 reduction="none", backend=backend)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("adaptive, reduction", [(True, "mean"), (False, "none")])
def test_low_precision(dtype, adaptive, reduction):
    inp = make_inputs(3, 300, dtype, seed=11, has_ref=True, has_weight=reduction == "mean")
    exact_inp = {k: None if x is None else x.detach().double().requires_grad_(k == "v_theta") for k, x in inp.items()}
    kw = dict(beta=0.1, adaptive=adaptive, kl_coef=0.2, reduction=reduction)
    out, grad = loss_and_grad(nft_loss_triton, inp, 0, block=128, chunks=2, **kw)
    eager, eager_grad = loss_and_grad(nft_loss_reference, inp, 0, **kw)
    exact, exact_grad = loss_and_grad(nft_loss_reference, exact_inp, 0, **kw)
    assert out.dtype == torch.float32 and grad.dtype == dtype
    assert_low_precision(out, eager, exact, torch.float32, scale=exact.abs().max().item())
    assert_low_precision(grad, eager_grad, exact_grad, dtype, scale=exact_grad.abs().max().item())


def test_fp16_saved_gradient_survives_a_loss_scale():
    """Small errors (a converging policy) and a large grad_output (fp16 loss scaling): the velocity
    form's gradient saved during the forward must not sit in fp16's subnormal range, where 2 e / N
    loses most of its bits before the loss scale multiplies it back."""
    g = torch.Generator().manual_seed(0)
    B, n = 2, 4096
    vt = (1e-2 * torch.randn(B, n, generator=g)).half().requires_grad_()
    vo = (vt.detach().double() + 1e-3 * torch.randn(B, n, generator=g, dtype=torch.float64)).half()
    v = (vo.double() + 3e-3 * torch.randn(B, n, generator=g, dtype=torch.float64)).half()
    r, t = rand(B, seed=1), rand(B, seed=2)
    exact_vt = vt.detach().double().requires_grad_()
    for reduction in ("mean", "none"):
        kw = dict(beta=0.1, adaptive=False, v_ref=vo, kl_coef=0.5, reduction=reduction)
        grads = []
        for fn, x, args, extra in ((nft_loss_triton, vt, (vo, v), dict(block=1024, chunks=2)),
                                   (nft_loss_reference, vt, (vo, v), {}),
                                   (nft_loss_reference, exact_vt, (vo.double(), v.double()), {})):
            kwx = dict(kw, v_ref=kw["v_ref"].to(x.dtype))
            out = fn(x, *args, r, t, **kwx, **extra)
            (grad,) = torch.autograd.grad(out, x, torch.full_like(out, 3000.0))
            grads.append(grad)
        assert grads[0].dtype == torch.float16
        assert_low_precision(*grads, torch.float16, scale=grads[2].abs().max().item())


@pytest.mark.parametrize("kw", [
    dict(adaptive=False, reduction="mean", has_ref=True, has_weight=True),
    dict(adaptive=False, reduction="none", has_ref=False, has_weight=False),
    # the adaptive weight is detached, so finite differences see it only where it is the floor
    dict(adaptive=True, reduction="mean", has_ref=True, has_weight=False, t_mode="tiny"),
    dict(adaptive=True, reduction="none", has_ref=False, has_weight=False, t_mode="tiny"),
])
def test_gradcheck_fp64(kw):
    kw = dict(kw)
    tiny = kw.pop("t_mode", None) == "tiny"
    adaptive, reduction = kw.pop("adaptive"), kw.pop("reduction")
    inp = make_inputs(2, 7, torch.float64, seed=3, **kw)
    if tiny:
        inp["t"] = torch.full((2,), 1e-7, dtype=torch.float64)
    args = {k: x for k, x in inp.items() if k != "v_theta"}

    def f(vt):
        return nft_loss_triton(vt, args["v_old"], args["v_target"], args["r"], args["t"], beta=0.4,
                               adaptive=adaptive, v_ref=args["v_ref"],
                               kl_coef=0.3 if args["v_ref"] is not None else 0.0,
                               weight=args["weight"], reduction=reduction, block=4, chunks=2)

    assert torch.autograd.gradcheck(f, (inp["v_theta"],), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("adaptive", [False, True])
def test_r_selects_one_branch(adaptive):
    beta = 0.25
    inp = make_inputs(2, 50, torch.float64, seed=5, r_mode="one")
    vt, vo, v, t = inp["v_theta"], inp["v_old"], inp["v_target"], inp["t"]
    out, grad = loss_and_grad(nft_loss_triton, inp, 1, beta=beta, adaptive=adaptive, reduction="none", block=16,
                              chunks=2)
    e_pos = ((1 - beta) * vo + beta * vt - v).detach()
    if adaptive:
        w = (t * e_pos.abs().mean(1)).clamp_min(1e-5)
        expected = t**2 * e_pos.square().mean(1) / w / beta
        expected_grad_unit = 2 * (t**2 / w)[:, None] * e_pos / 50
    else:
        expected = e_pos.square().mean(1) / beta
        expected_grad_unit = 2 * e_pos / 50
    torch.testing.assert_close(out, expected, **TOL[torch.float64])
    go = rand(out.shape, out.dtype, 1) + 0.5
    torch.testing.assert_close(grad, go[:, None] * expected_grad_unit, **TOL[torch.float64])
    # r = 0: the mirror image, only the negative branch
    inp0 = make_inputs(2, 50, torch.float64, seed=5, r_mode="zero")
    out0 = call(nft_loss_triton, inp0, beta=beta, adaptive=False, reduction="none", block=16)
    e_neg = ((1 + beta) * vo - beta * vt - v).detach()
    torch.testing.assert_close(out0, e_neg.square().mean(1) / beta, **TOL[torch.float64])


def test_adaptive_form_is_the_x0_space_loss_of_diffusion_nft():
    """The spec itself: docs/design.md's adaptive formula equals the released code's x0-space loss."""
    B, n, beta = 3, 40, 0.3
    x0, eps = randn((B, n), seed=1), randn((B, n), seed=2)
    t = rand(B, seed=3) * 0.9 + 0.05
    tb = t[:, None]
    x_t = (1 - tb) * x0 + tb * eps
    v_old, v_theta = randn((B, n), seed=4), randn((B, n), seed=5)
    r = rand(B, seed=6)
    per_branch = []
    for v_mix in ((1 - beta) * v_old + beta * v_theta, (1 + beta) * v_old - beta * v_theta):
        x0_pred = x_t - tb * v_mix
        weight = (x0_pred - x0).abs().mean(1, keepdim=True).clamp_min(1e-5)
        per_branch.append(((x0_pred - x0) ** 2 / weight).mean(1))
    expected = (r * per_branch[0] + (1 - r) * per_branch[1]) / beta
    got = nft_loss_reference(v_theta, v_old, eps - x0, r, t, beta=beta, reduction="none")
    torch.testing.assert_close(got, expected, **TOL[torch.float64])
    got_triton = nft_loss_triton(v_theta, v_old, eps - x0, r, t, beta=beta, reduction="none", block=16, chunks=2)
    torch.testing.assert_close(got_triton, expected, **TOL[torch.float64])


def test_two_runs_are_bit_identical():
    for adaptive in (False, True):
        inp = make_inputs(3, 500, torch.float32, seed=9, has_ref=True, has_weight=True)
        runs = [loss_and_grad(nft_loss_triton, inp, 2, beta=0.5, adaptive=adaptive, kl_coef=0.1,
                              block=64, chunks=3) for _ in range(2)]
        assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_gradient_reaches_v_theta_only_and_no_grad_path_matches():
    inp = make_inputs(2, 33, torch.float64, seed=4, has_ref=True)
    for name in ("v_old", "v_target", "v_ref", "r", "t"):
        inp[name] = inp[name].clone().requires_grad_()
    for adaptive in (False, True):
        out = call(nft_loss_triton, inp, beta=1.0, adaptive=adaptive, kl_coef=0.1, block=16)
        grads = torch.autograd.grad(out, [inp[k] for k in ("v_theta", "v_old", "v_target", "v_ref", "r", "t")],
                                    allow_unused=True)
        assert grads[0] is not None and all(g is None for g in grads[1:])
        with torch.no_grad():
            again = call(nft_loss_triton, inp, beta=1.0, adaptive=adaptive, kl_coef=0.1, block=16)
        assert torch.equal(out.detach(), again)


def test_retain_graph_backward_twice_gives_the_same_gradient():
    for adaptive in (False, True):
        inp = make_inputs(2, 40, torch.float64, seed=6)
        out = call(nft_loss_triton, inp, beta=0.5, adaptive=adaptive, reduction="none", block=16)
        go = torch.tensor([0.5, 2.0], dtype=torch.float64)
        (g1,) = torch.autograd.grad(out, inp["v_theta"], go, retain_graph=True)
        (g2,) = torch.autograd.grad(out, inp["v_theta"], go)
        assert torch.equal(g1, g2)


def test_all_samples_dropped_gives_exact_zero_and_zero_gradient():
    for fn, kw in ((nft_loss_triton, dict(block=16, chunks=2)), (nft_loss_reference, {})):
        inp = make_inputs(3, 20, torch.float32, seed=8, has_weight=True)
        inp["weight"] = torch.zeros(3)
        out, grad = loss_and_grad(fn, inp, 0, beta=1.0, **kw)
        assert out.item() == 0.0 and not grad.any()


def test_dropped_samples_do_not_leak_nan():
    inp = make_inputs(3, 20, torch.float64, seed=8, has_weight=True)
    inp["weight"] = torch.tensor([1.0, 0.0, 3.0], dtype=torch.float64)
    with torch.no_grad():
        inp["v_target"][1] = float("nan")
    for fn, kw in ((nft_loss_triton, dict(block=16)), (nft_loss_reference, {})):
        out, grad = loss_and_grad(fn, inp, 0, beta=1.0, **kw)
        # (the dropped sample's own gradient is 0 * NaN, in autograd as here)
        assert torch.isfinite(out) and torch.isfinite(grad[[0, 2]]).all()


def test_default_launch_config_and_public_dispatch():
    """No overrides: the interpreter's default tile (8192) with a sample larger than one tile,
    [B, L, C] layout, through the public function: backend="triton" (interpreted on CPU, compiled
    on a GPU) against backend="torch" (the eager reference); "auto" takes the Triton path here."""
    for adaptive in (True, False):
        inp = make_inputs(2, 96, torch.float32, seed=12, shape_tail=(96,), has_ref=True)
        kw = dict(beta=1.0, adaptive=adaptive, kl_coef=1e-2)
        out, grad = loss_and_grad(kernels.nft_loss, inp, 0, backend="triton", **kw)
        ref, ref_grad = loss_and_grad(kernels.nft_loss, inp, 0, backend="torch", **kw)
        torch.testing.assert_close(out, ref, **TOL[torch.float32])
        torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-5 * ref_grad.abs().max().item())
        auto, auto_grad = loss_and_grad(kernels.nft_loss, inp, 0, **kw)
        assert torch.equal(auto, out) and torch.equal(auto_grad, grad)
