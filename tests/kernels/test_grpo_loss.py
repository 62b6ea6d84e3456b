"""GRPO loss: the Triton kernel (interpreted on CPU) against the eager reference, its gradient, and
properties of the maths itself (the log-probability is a Gaussian's, the ratio is 1 on-policy, the
clip cuts the gradient)."""
import math

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
from kernels.grpo_loss import grpo_loss_triton, sde_step_logprob_triton
from kernels.reference import grpo_loss_reference, sde_step_logprob_reference


def make_inputs(B, n, dtype, seed, *, mask_mode="binary", has_ref=False, has_weight=False, old="none",
                clip_range=0.2, shape_tail=(), per_token_mask=False):
    """A realistic SDE step: x_next = mean + std z, v_theta near the sampling velocity. `old`:
    "none" (on-policy), or logp_old = the exact logp shifted so that each sample's ratio sits well
    inside or well outside the clip range ("mixed"), never near its edges."""
    shape = (B, n, *shape_tail)
    x = randn(shape, torch.float64, seed)
    v_old = randn(shape, torch.float64, seed + 1)
    mean_x = 1 + 0.1 * rand(B, seed=seed + 2)
    mean_v = -(0.05 + 0.3 * rand(B, seed=seed + 3))
    std = 0.05 + 0.5 * rand(B, seed=seed + 4)
    x_next = mean_x.view(-1, *[1] * (len(shape) - 1)) * x + mean_v.view(-1, *[1] * (len(shape) - 1)) * v_old \
        + std.view(-1, *[1] * (len(shape) - 1)) * randn(shape, torch.float64, seed + 5)
    v_theta = (v_old + 0.05 * randn(shape, torch.float64, seed + 6)).to(dtype)
    mshape = (B, n, *([1] * len(shape_tail))) if per_token_mask else shape
    mask = {"none": None, "binary": (rand(mshape, seed=seed + 7) > 0.3).double(),
            "soft": rand(mshape, seed=seed + 7), "zero": torch.zeros(mshape, dtype=torch.float64),
            "one": torch.ones(mshape, dtype=torch.float64)}[mask_mode]
    advantage = randn(B, torch.float64, seed + 8) * 2
    inp = dict(v_theta=v_theta.requires_grad_(), x_t=x.to(dtype), x_next=x_next.to(dtype), advantage=advantage,
               logp_old=None, mean_x=mean_x, mean_v=mean_v, std=std, mask=None if mask is None else mask.to(dtype),
               v_ref=randn(shape, dtype, seed + 9) if has_ref else None,
               weight=torch.where(rand(B, seed=seed + 10) > 0.3, 2 * rand(B, seed=seed + 11), torch.zeros(B))
               if has_weight else None)
    if old != "none":
        exact = sde_step_logprob_reference(*(inp[k].detach().double() for k in ("v_theta", "x_t", "x_next")),
                                           mean_x=mean_x, mean_v=mean_v, std=std,
                                           mask=None if mask is None else mask)
        # log-ratio -delta: inside (|delta| = 0.3 eps) or outside (3 eps) the clip range, both signs
        factor = torch.tensor([0.3, -3.0, -0.3, 3.0] * B, dtype=torch.float64)[:B]
        delta = factor * math.log1p(clip_range)
        inp["logp_old"] = exact + delta
    return inp


def call(fn, inp, **kw):
    args = dict(inp)
    pos = [args.pop(k) for k in ("v_theta", "x_t", "x_next", "advantage", "logp_old")]
    return fn(*pos, **args, **kw)


def loss_and_grad(fn, inp, seed, **kw):
    out = call(fn, inp, **kw)
    go = rand(out.shape, out.dtype, seed) + 0.5
    (grad,) = torch.autograd.grad(out, inp["v_theta"], go)
    return out, grad


def term_scale(inp, seed, **kw):
    """The size of the gradient's terms (fp64 reference): policy part alone plus KL part alone. Their
    sum may cancel; rounding errors of the terms' size are then correct."""
    exact = {k: None if x is None or not isinstance(x, torch.Tensor) else x.detach().double()
             for k, x in inp.items()}
    total = 0.0
    for change in (dict(kl_coef=0.0, v_ref=None), dict(advantage=torch.zeros_like(exact["advantage"]))):
        branch = dict(exact, v_theta=exact["v_theta"].clone().requires_grad_())
        kwx = dict(kw)
        for k, val in change.items():
            (kwx if k == "kl_coef" else branch)[k] = val
        if branch["v_ref"] is None and kwx.get("kl_coef", 0) > 0:
            continue
        total += loss_and_grad(grpo_loss_reference, branch, seed, **kwx)[1].abs().max().item()
    return total


# The options that select a different kernel path (ON_POLICY, MEAN, HAS_REF, HAS_WEIGHT, HAS_MASK):
# 32 combinations; the 8 with a weight and reduction="none" are refused (kernels.grpo_loss), the other
# 24 are each a test case, with shapes and values drawn by hypothesis.
OPTIONS = [(on, red, ref, w, m) for on in (True, False) for red in ("mean", "none") for ref in (False, True)
           for w in (False, True) for m in (True, False)]
VALID = [o for o in OPTIONS if not (o[1] == "none" and o[3])]


def options_id(o):
    return "-".join(("on" if o[0] else "off", o[1], "ref" if o[2] else "noref", "weight" if o[3] else "noweight",
                     "mask" if o[4] else "nomask"))


@st.composite
def cases(draw):
    block = draw(st.sampled_from([16, 64]))
    return dict(
        dtype=draw(st.sampled_from([torch.float64, torch.float32])),
        block=block,
        n=draw(st.sampled_from([3 * block + 5, 1, block - 1, block, block + 1])),
        shape_tail=draw(st.sampled_from([(), (3,)])),
        per_token_mask=draw(st.booleans()),
        B=draw(st.sampled_from([3, 1, 2, 5])),
        chunks=draw(st.sampled_from([2, 1, 3])),
        mask_mode=draw(st.sampled_from(["binary", "soft", "zero", "one"])),
        clip_range=draw(st.sampled_from([0.2, 1e-3, 0.5])),
        kl_coef=draw(st.sampled_from([0.5, 0.0, 2.0])),
        seed=draw(st.integers(0, 2**16)),
    )


@pytest.mark.parametrize("on_policy, reduction, has_ref, has_weight, has_mask", VALID,
                         ids=[options_id(o) for o in VALID])
@per_combination(1 / 4)
@given(case=cases())
def test_matches_reference_values_and_gradients(on_policy, reduction, has_ref, has_weight, has_mask, case):
    dtype = case["dtype"]
    inp = make_inputs(case["B"], case["n"], dtype, case["seed"], mask_mode=case["mask_mode"] if has_mask else "none",
                      has_ref=has_ref, has_weight=has_weight, old="none" if on_policy else "mixed",
                      clip_range=case["clip_range"], shape_tail=case["shape_tail"],
                      per_token_mask=case["per_token_mask"])
    kw = dict(clip_range=case["clip_range"], kl_coef=case["kl_coef"] if has_ref else 0.0, reduction=reduction)
    guarded_inp = {k: x if x is None or x.dim() == 1 else guarded(x) for k, x in inp.items()}
    with guarded_buffers():
        (out, logp), grad = loss_and_grad_logp(grpo_loss_triton, guarded_inp, case["seed"], block=case["block"],
                                               chunks=case["chunks"], **kw)
    (ref, ref_logp), ref_grad = loss_and_grad_logp(grpo_loss_reference, inp, case["seed"], **kw)
    assert out.dtype == ref.dtype and out.shape == ref.shape and grad.dtype == dtype
    torch.testing.assert_close(out, ref, **TOL[dtype])
    torch.testing.assert_close(logp, ref_logp, **TOL[dtype])
    scale = term_scale(inp, case["seed"], **kw)
    torch.testing.assert_close(grad, ref_grad, rtol=TOL[dtype]["rtol"], atol=TOL[dtype]["rtol"] * scale + 1e-300)


def loss_and_grad_logp(fn, inp, seed, **kw):
    out, logp = call(fn, inp, return_logp=True, **kw)
    go = rand(out.shape, out.dtype, seed) + 0.5
    (grad,) = torch.autograd.grad(out, inp["v_theta"], go)
    return (out, logp), grad


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_logprob_is_the_gaussian_of_the_step(backend):
    """The per-sample log-probability is the mask-weighted mean over elements of
    torch.distributions.Normal(mean_x x_t + mean_v v, std).log_prob(x_next)."""
    inp = make_inputs(3, 20, torch.float64, seed=2, shape_tail=(4,))
    v, x, xn, m = inp["v_theta"].detach(), inp["x_t"], inp["x_next"], inp["mask"]
    got = kernels.sde_step_logprob(v, x, xn, mean_x=inp["mean_x"], mean_v=inp["mean_v"], std=inp["std"], mask=m,
                                   backend=backend)
    for b in range(3):
        dist = torch.distributions.Normal(inp["mean_x"][b] * x[b] + inp["mean_v"][b] * v[b], inp["std"][b])
        density = dist.log_prob(xn[b])
        want = (m[b] * density).sum() / m[b].sum()
        torch.testing.assert_close(got[b], want, **TOL[torch.float64])
    unmasked = kernels.sde_step_logprob(v, x, xn, mean_x=inp["mean_x"], mean_v=inp["mean_v"], std=inp["std"],
                                        backend=backend)
    want = torch.distributions.Normal(inp["mean_x"].view(-1, 1, 1) * x + inp["mean_v"].view(-1, 1, 1) * v,
                                      inp["std"].view(-1, 1, 1)).log_prob(xn).mean((1, 2))
    torch.testing.assert_close(unmasked, want, **TOL[torch.float64])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_ratio_is_exactly_one_at_the_sampling_policy(backend):
    """logp_old from the same velocities (the sampling policy is the trained one): the loss is -A
    exactly, with logp_old given or None, and the gradient is -A dlogp in both paths."""
    inp = make_inputs(4, 30, torch.float32, seed=3, has_ref=True)
    v = inp["v_theta"]
    common = dict(mean_x=inp["mean_x"], mean_v=inp["mean_v"], std=inp["std"], mask=inp["mask"])
    logp_old = kernels.sde_step_logprob(v.detach(), inp["x_t"], inp["x_next"], backend=backend, **common)
    kw = dict(clip_range=1e-4, v_ref=inp["v_ref"], kl_coef=0.0, reduction="none", backend=backend, **common)
    given_old, logp = kernels.grpo_loss(v, inp["x_t"], inp["x_next"], inp["advantage"], logp_old, return_logp=True,
                                        **kw)
    assert torch.equal(torch.exp(logp - logp_old), torch.ones(4))
    assert torch.equal(given_old, -inp["advantage"].float())
    on_policy = kernels.grpo_loss(v, inp["x_t"], inp["x_next"], inp["advantage"], None, **kw)
    assert torch.equal(on_policy, given_old)
    g_given, = torch.autograd.grad(given_old.sum(), v)
    g_on, = torch.autograd.grad(on_policy.sum(), v)
    torch.testing.assert_close(g_given, g_on, rtol=1e-6, atol=1e-7 * g_on.abs().max().item())
    # and that gradient is -A d logp / d v_theta (autograd of the reference's log-probability)
    vv = v.detach().double().requires_grad_()
    lp = sde_step_logprob_reference(vv, inp["x_t"].double(), inp["x_next"].double(),
                                    **{k: (x.double() if x is not None else None) for k, x in common.items()})
    want, = torch.autograd.grad((-inp["advantage"] * lp).sum(), vv)
    torch.testing.assert_close(g_on.double(), want, rtol=1e-5, atol=1e-6 * want.abs().max().item())


@pytest.mark.parametrize("fn, kw", [(grpo_loss_triton, dict(block=16, chunks=2)), (grpo_loss_reference, {})])
def test_the_clip_cuts_the_policy_gradient(fn, kw):
    """Where the ratio has left the clip range in the advantage's direction, the sample's policy
    gradient is exactly 0; on the other side, or inside, it is -A ratio d logp."""
    inp = make_inputs(4, 25, torch.float64, seed=4, old="mixed", clip_range=0.1)
    inp["advantage"] = torch.tensor([1.0, 1.0, -1.0, -1.0], dtype=torch.float64)
    # log-ratios (make_inputs' shifts): -0.3, +3 (ratio > 1 + eps), +0.3, -3 (ratio < 1 - eps) x log(1 + eps)
    out, grad = loss_and_grad(fn, inp, 0, clip_range=0.1, reduction="none", **kw)
    held = [False, True, False, True]
    for b, h in enumerate(held):
        assert (not grad[b].any()) == h, b
    # the value: the clipped term where held
    ratio = torch.exp(torch.tensor([-0.3, 3.0, 0.3, -3.0], dtype=torch.float64) * math.log1p(0.1))
    torch.testing.assert_close(out[1], -torch.tensor(1.1, dtype=torch.float64), rtol=1e-6, atol=0)
    torch.testing.assert_close(out[3], torch.tensor(0.9, dtype=torch.float64), rtol=1e-6, atol=0)
    torch.testing.assert_close(out[[0, 2]], -inp["advantage"][[0, 2]] * ratio[[0, 2]], rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("on_policy, reduction", [(True, "mean"), (False, "none")])
def test_low_precision(dtype, on_policy, reduction):
    inp = make_inputs(3, 300, dtype, seed=11, has_ref=True, has_weight=reduction == "mean",
                      old="none" if on_policy else "mixed")
    exact_inp = {k: None if x is None else x.detach().double().requires_grad_(k == "v_theta") for k, x in inp.items()}
    kw = dict(clip_range=0.2, kl_coef=0.2, reduction=reduction)
    guarded_inp = {k: x if x is None or x.dim() == 1 else guarded(x) for k, x in inp.items()}
    with guarded_buffers():
        out, grad = loss_and_grad(grpo_loss_triton, guarded_inp, 0, block=128, chunks=2, **kw)
    eager, eager_grad = loss_and_grad(grpo_loss_reference, inp, 0, **kw)
    exact, exact_grad = loss_and_grad(grpo_loss_reference, exact_inp, 0, **kw)
    assert out.dtype == torch.float32 and grad.dtype == dtype
    assert_low_precision(out, eager, exact, torch.float32, scale=exact.abs().max().item())
    assert_low_precision(grad, eager_grad, exact_grad, dtype, scale=exact_grad.abs().max().item())


# On-policy the loss's value is -A whatever v_theta (ratio = exp(logp - logp.detach())): finite
# differences see only the KL term there, so those cases check the folded path with A = 0.
@pytest.mark.parametrize("on_policy, reduction, has_ref, mask_mode", [
    (False, "mean", True, "binary"), (False, "none", True, "soft"), (False, "mean", False, "none"),
    (True, "none", True, "one"), (True, "mean", True, "binary")])
def test_gradcheck_fp64(on_policy, reduction, has_ref, mask_mode):
    inp = make_inputs(2, 7, torch.float64, seed=3, has_ref=has_ref, mask_mode=mask_mode,
                      old="none" if on_policy else "mixed")
    if on_policy:
        inp["advantage"] = torch.zeros(2, dtype=torch.float64)
    args = {k: x for k, x in inp.items() if k != "v_theta"}

    def f(vt):
        return grpo_loss_triton(vt, args["x_t"], args["x_next"], args["advantage"], args["logp_old"],
                                mean_x=args["mean_x"], mean_v=args["mean_v"], std=args["std"], mask=args["mask"],
                                clip_range=0.2, v_ref=args["v_ref"], kl_coef=0.3 if has_ref else 0.0,
                                reduction=reduction, block=4, chunks=2)

    assert torch.autograd.gradcheck(f, (inp["v_theta"],), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_two_runs_are_bit_identical():
    for old in ("none", "mixed"):
        inp = make_inputs(3, 500, torch.float32, seed=9, has_ref=True, has_weight=True, old=old)
        runs = [loss_and_grad(grpo_loss_triton, inp, 2, clip_range=0.2, kl_coef=0.1, block=64, chunks=3)
                for _ in range(2)]
        assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_gradient_reaches_v_theta_only_and_no_grad_path_matches():
    inp = make_inputs(2, 33, torch.float64, seed=4, has_ref=True, old="mixed")
    names = ("x_t", "x_next", "v_ref", "advantage", "logp_old", "mean_x", "mean_v", "std")
    for name in names:
        inp[name] = inp[name].clone().requires_grad_()
    out = call(grpo_loss_triton, inp, clip_range=0.2, kl_coef=0.1, block=16)
    grads = torch.autograd.grad(out, [inp["v_theta"]] + [inp[k] for k in names], allow_unused=True)
    assert grads[0] is not None and all(g is None for g in grads[1:])
    with torch.no_grad():
        again = call(grpo_loss_triton, inp, clip_range=0.2, kl_coef=0.1, block=16)
    assert torch.equal(out.detach(), again)


def test_retain_graph_backward_twice_gives_the_same_gradient():
    for old in ("none", "mixed"):
        inp = make_inputs(2, 40, torch.float64, seed=6, old=old)
        out = call(grpo_loss_triton, inp, clip_range=0.2, reduction="none", block=16)
        go = torch.tensor([0.5, 2.0], dtype=torch.float64)
        (g1,) = torch.autograd.grad(out, inp["v_theta"], go, retain_graph=True)
        (g2,) = torch.autograd.grad(out, inp["v_theta"], go)
        assert torch.equal(g1, g2)


def test_all_samples_dropped_gives_exact_zero_and_zero_gradient():
    for fn, kw in ((grpo_loss_triton, dict(block=16, chunks=2)), (grpo_loss_reference, {})):
        inp = make_inputs(3, 20, torch.float32, seed=8, has_weight=True)
        inp["weight"] = torch.zeros(3)
        out, grad = loss_and_grad(fn, inp, 0, clip_range=0.2, **kw)
        assert out.item() == 0.0 and not grad.any()


def test_a_sample_without_generated_elements_has_no_gradient():
    """mask all 0 for a sample: logp = -log std - log sqrt(2 pi), ratio 1, zero gradient."""
    for fn, kw in ((grpo_loss_triton, dict(block=16)), (grpo_loss_reference, {})):
        inp = make_inputs(2, 20, torch.float64, seed=12, has_ref=True)
        inp["mask"][0] = 0
        (out, logp), grad = loss_and_grad_logp(fn, inp, 0, clip_range=0.2, kl_coef=1.0, reduction="none", **kw)
        torch.testing.assert_close(logp[0], -torch.log(inp["std"][0]) - 0.5 * math.log(2 * math.pi))
        assert not grad[0].any() and grad[1].any()
        torch.testing.assert_close(out[0], -inp["advantage"][0])


def test_default_launch_config_and_public_dispatch():
    """No overrides: the interpreter's default tile, [B, L, C] with a per-token mask, through the
    public function: backend="triton" against backend="torch"; "auto" takes the Triton path here."""
    for old in ("none", "mixed"):
        inp = make_inputs(2, 96, torch.float32, seed=12, shape_tail=(96,), has_ref=True, old=old,
                          per_token_mask=True)
        kw = dict(clip_range=0.2, kl_coef=1e-2)
        out, grad = loss_and_grad(kernels.grpo_loss, inp, 0, backend="triton", **kw)
        ref, ref_grad = loss_and_grad(kernels.grpo_loss, inp, 0, backend="torch", **kw)
        torch.testing.assert_close(out, ref, **TOL[torch.float32])
        torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-5 * ref_grad.abs().max().item())
        auto, auto_grad = loss_and_grad(kernels.grpo_loss, inp, 0, **kw)
        assert torch.equal(auto, out) and torch.equal(auto_grad, grad)
    lp_triton = kernels.sde_step_logprob(inp["v_theta"].detach(), inp["x_t"], inp["x_next"], mean_x=inp["mean_x"],
                                         mean_v=inp["mean_v"], std=inp["std"], mask=inp["mask"], backend="triton")
    assert torch.equal(sde_step_logprob_triton(inp["v_theta"].detach(), inp["x_t"], inp["x_next"],
                                               mean_x=inp["mean_x"], mean_v=inp["mean_v"], std=inp["std"],
                                               mask=inp["mask"]), lp_triton)


def test_weight_with_reduction_none_is_refused():
    inp = make_inputs(2, 8, torch.float64, seed=1, has_weight=True)
    for backend in ("torch", "triton"):
        with pytest.raises(ValueError, match="weight only applies to reduction='mean'"):
            call(kernels.grpo_loss, inp, clip_range=0.2, reduction="none", backend=backend)
