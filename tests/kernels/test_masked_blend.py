"""Mask-aware blend step: the Triton kernel (interpreted on CPU) against the eager reference over
every mask layout, its gradients, and the properties of the step."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from kernel_testing import (
    EXACT_FP,
    TOL,
    assert_low_precision,
    guarded,
    guarded_buffers,
    per_combination,
    rand,
    randn,
)

import kernels
from kernels.masked_blend import mask_layout, masked_blend_step_triton
from kernels.reference import masked_blend_step_reference

# (x shape, mask shape): packed tokens [B, L, C] and pixels [B, C, H, W], every mask layout
LAYOUTS = {
    "elementwise": lambda B, L, C, H, W: ((B, L, C), (B, L, C)),
    "per_token": lambda B, L, C, H, W: ((B, L, C), (B, L, 1)),
    "token_shared": lambda B, L, C, H, W: ((B, L, C), (1, L, 1)),
    "no_batch_dim": lambda B, L, C, H, W: ((B, L, C), (L, C)),
    "per_sample": lambda B, L, C, H, W: ((B, L, C), (B, 1, 1)),
    "scalar": lambda B, L, C, H, W: ((B, L, C), (1,)),
    "per_pixel": lambda B, L, C, H, W: ((B, C, H, W), (B, 1, H, W)),
    "pixel_shared": lambda B, L, C, H, W: ((B, C, H, W), (1, 1, H, W)),
    "middle_run": lambda B, L, C, H, W: ((B, L, C, W), (B, L, 1, W)),
    "two_runs": lambda B, L, C, H, W: ((B, C, H, W), (B, 1, H, 1)),  # expanded before the launch
}


def make_mask(shape, kind, seed):
    u = rand(shape, seed=seed)
    return {"zeros": torch.zeros(shape), "ones": torch.ones(shape), "binary": (u > 0.5).double(),
            "soft": u, "bool": u > 0.5}[kind]


def make_time(kind, B, dtype, seed):
    if kind == "float":
        return float(rand(1, seed=seed))
    if kind == "zero_d":
        return rand((), dtype, seed)
    return rand(B, dtype, seed)


def blend_inputs(x_shape, dtype, seed, grad=False):
    return [randn(x_shape, dtype, seed + i).requires_grad_(grad) for i in range(4)]  # x_t, v, x0_known, noise


# The options that select a different kernel path: the mask layout (M_COL, HAS_RM, expanded first)
# and whether t and t_next are one value or one per sample (T_ROWS, TN_ROWS): 10 x 2 x 2 = 40
# combinations, each a test case; hypothesis draws the sizes, the mask's values, which inputs need
# a gradient (NEED_*; none: the no-grad path), dtypes and tiles. (The first choice of each list is
# what hypothesis's first, simplest example takes: a general one, with B = 2 so per-sample times are
# read per row.)
BLEND_OPTIONS = [(layout, t_mode, tn_mode) for layout in sorted(LAYOUTS) for t_mode in ("scalar", "per_sample")
                 for tn_mode in ("scalar", "per_sample")]
GRADS = {"all": (0, 1, 2, 3), "x_v": (0, 1), "x0_noise": (2, 3), "v": (1,), "none": ()}


@pytest.mark.parametrize("layout, t_mode, tn_mode", BLEND_OPTIONS, ids=["-".join(o) for o in BLEND_OPTIONS])
@per_combination(1 / 10)
@given(B=st.sampled_from([2, 1, 3]), L=st.sampled_from([5, 1, 2]), C=st.sampled_from([17, 1, 3, 15, 16]),
       H=st.sampled_from([4, 1]), W=st.sampled_from([7, 2]),
       mask_kind=st.sampled_from(["soft", "zeros", "ones", "binary", "bool"]),
       mask_dtype=st.sampled_from([torch.float32, torch.float64]), t_scalar=st.sampled_from(["float", "zero_d"]),
       tn_scalar=st.sampled_from(["float", "zero_d"]), grads=st.sampled_from(sorted(GRADS)),
       dtype=st.sampled_from([torch.float64, torch.float32]), block=st.sampled_from([None, 16, 64]),
       seed=st.integers(0, 2**16))
def test_matches_reference_values_and_gradients(layout, t_mode, tn_mode, B, L, C, H, W, mask_kind, mask_dtype,
                                                t_scalar, tn_scalar, grads, dtype, block, seed):
    x_shape, m_shape = LAYOUTS[layout](B, L, C, H, W)
    mask = make_mask(m_shape, mask_kind, seed)
    mask = mask if mask.dtype == torch.bool else mask.to(mask_dtype)
    t = make_time(t_scalar if t_mode == "scalar" else "per_sample", B, dtype, seed + 10)
    tn = make_time(tn_scalar if tn_mode == "scalar" else "per_sample", B, torch.float32, seed + 11)
    need = GRADS[grads]
    inputs = [x.requires_grad_(i in need) for i, x in enumerate(blend_inputs(x_shape, dtype, seed))]
    with guarded_buffers():
        g_inputs = [guarded(x) for x in inputs]
        out = masked_blend_step_triton(g_inputs[0], g_inputs[1], guarded(mask), g_inputs[2], g_inputs[3], t, tn,
                                       block=block)
        go = randn(out.shape, dtype, seed + 20)
        grads_out = torch.autograd.grad(out, [g_inputs[i] for i in need], go) if need else ()
    ref = masked_blend_step_reference(inputs[0], inputs[1], mask, inputs[2], inputs[3], t, tn)
    ref_grads = torch.autograd.grad(ref, [inputs[i] for i in need], go) if need else ()
    assert out.dtype == dtype and out.shape == x_shape and out.requires_grad == bool(need)
    torch.testing.assert_close(out, ref, **TOL[dtype])
    for g, rg in zip(grads_out, ref_grads, strict=True):
        assert g.dtype == dtype
        torch.testing.assert_close(g, rg, **TOL[dtype])


@pytest.mark.parametrize("block", [16, 64])
@pytest.mark.parametrize("delta", [-1, 0, 1])
@pytest.mark.parametrize("per_token", [False, True])
def test_edge_sizes(block, delta, per_token):
    n = max(1, block + delta)
    x_shape, m_shape = ((2, 3, n), (2, 3, 1)) if per_token else ((2, n), (2, n))
    inputs = blend_inputs(x_shape, torch.float64, n)
    mask = rand(m_shape, seed=n)
    with guarded_buffers():
        out = masked_blend_step_triton(*[guarded(x) for x in inputs[:2]], guarded(mask),
                                       *[guarded(x) for x in inputs[2:]], 0.7, 0.45, block=block)
    ref = masked_blend_step_reference(inputs[0], inputs[1], mask, inputs[2], inputs[3], 0.7, 0.45)
    torch.testing.assert_close(out, ref, **TOL[torch.float64])
    one = masked_blend_step_triton(*blend_inputs((1,), torch.float64, 3)[:2], torch.ones(1),
                                   *blend_inputs((1,), torch.float64, 3)[2:], 1.0, 0.0, block=block)
    assert one.shape == (1,)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mask_one_is_the_euler_step_and_mask_zero_the_renoised_source(dtype):
    B = 3
    x, v, x0, noise = blend_inputs((B, 20, 12), dtype, 5)
    t, tn = rand(B, dtype, 1) * 0.5 + 0.5, rand(B, dtype, 2) * 0.5
    tb, tnb = t[:, None, None], tn[:, None, None]
    mask = torch.zeros(B, 20, 1)
    mask[:, ::3] = 1.0
    out = masked_blend_step_triton(x, v, mask, x0, noise, t, tn, block=64)
    euler = x + (tnb - tb) * v
    renoised = (1 - tnb) * x0 + tnb * noise
    keep = mask.expand_as(x) == 0
    same = torch.equal if EXACT_FP else lambda a, b: torch.allclose(a, b, rtol=4 * torch.finfo(dtype).eps, atol=0)
    assert same(out[~keep], euler[~keep])
    assert same(out[keep], renoised[keep])
    # at t' = 0 the kept region is exactly the source
    out0 = masked_blend_step_triton(x, v, mask, x0, noise, t, 0.0, block=64)
    assert torch.equal(out0[keep], x0[keep])


def pack2x2(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/2)(W/2), 4C], FLUX's layout (written here, not imported from core)."""
    B, C, H, W = x.shape
    return x.view(B, C, H // 2, 2, W // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, (H // 2) * (W // 2), 4 * C)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_blending_commutes_with_2x2_packing(dtype):
    B, C, H, W = 2, 3, 6, 8
    x, v, x0, noise = blend_inputs((B, C, H, W), dtype, 7)
    t, tn = rand(B, dtype, 3), 0.25
    pixel_mask = rand((B, 1, H, W), seed=4)
    unpacked = masked_blend_step_triton(x, v, pixel_mask, x0, noise, t, tn, block=64)
    packed = masked_blend_step_triton(pack2x2(x), pack2x2(v), pack2x2(pixel_mask.expand(B, C, H, W)), pack2x2(x0),
                                      pack2x2(noise), t, tn, block=64)
    assert torch.equal(packed, pack2x2(unpacked))
    # a mask constant over each 2x2 patch is a per-token mask [B, L, 1] once packed
    token_mask = (rand((B, 1, H // 2, W // 2), seed=5) > 0.5).double()
    patch_mask = token_mask.repeat_interleave(2, 2).repeat_interleave(2, 3)
    unpacked = masked_blend_step_triton(x, v, patch_mask, x0, noise, t, tn, block=64)
    packed = masked_blend_step_triton(pack2x2(x), pack2x2(v), token_mask.reshape(B, -1, 1), pack2x2(x0),
                                      pack2x2(noise), t, tn, block=64)
    assert torch.equal(packed, pack2x2(unpacked))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision(dtype):
    B = 2
    x, v, x0, noise = blend_inputs((B, 40, 16), dtype, 9, grad=True)
    mask = rand((B, 40, 1), seed=1)
    t, tn = rand(B, torch.float32, 2), rand(B, torch.float32, 3) * 0.5
    out = masked_blend_step_triton(x, v, mask, x0, noise, t, tn, block=256)
    eager = masked_blend_step_reference(x, v, mask, x0, noise, t, tn)
    exact = masked_blend_step_reference(*[a.detach().double() for a in (x, v)], mask, x0.detach().double(),
                                        noise.detach().double(), t, tn)
    assert out.dtype == dtype
    assert_low_precision(out, eager, exact, dtype, scale=exact.abs().max().item())
    go = randn(out.shape, dtype, 4)
    got = torch.autograd.grad(out, (x, v), go)
    want = torch.autograd.grad(eager, (x, v), go)
    for g, w in zip(got, want):
        assert g.dtype == dtype
        atol = 2 * float(torch.finfo(dtype).eps) * w.abs().max().item()
        torch.testing.assert_close(g.double(), w.double(), rtol=0, atol=atol)


def test_gradcheck_fp64():
    inputs = blend_inputs((2, 2, 3), torch.float64, 2, grad=True)
    mask = rand((2, 2, 1), seed=1)
    t = rand(2, seed=3)

    def f(x, v, x0, noise):
        return masked_blend_step_triton(x, v, mask, x0, noise, t, 0.2, block=16)

    assert torch.autograd.gradcheck(f, tuple(inputs))


def test_two_runs_are_bit_identical_and_no_grad_matches():
    x, v, x0, noise = blend_inputs((2, 300, 12), torch.float32, 3, grad=True)
    mask = rand((2, 300, 1), seed=1)
    t = rand(2, torch.float32, 2)
    a = masked_blend_step_triton(x, v, mask, x0, noise, t, 0.3, block=512)
    b = masked_blend_step_triton(x, v, mask, x0, noise, t, 0.3, block=512)
    with torch.no_grad():
        c = masked_blend_step_triton(x, v, mask, x0, noise, t, 0.3, block=512)
    assert torch.equal(a, b) and torch.equal(a.detach(), c)


def test_layouts_read_the_mask_per_row():
    # per token: one mask value per row of C; per pixel: rows of H W with the channel folded away
    assert mask_layout((2, 5, 8), (2, 5, 1)) == ((10, 8, 1, 0, 1, 0, 5), False)
    assert mask_layout((2, 3, 4, 6), (2, 1, 4, 6)) == ((6, 24, 3, 0, 24, 1, 3), False)
    assert mask_layout((2, 3, 4, 6), (2, 1, 4, 1))[1] is True


def test_public_dispatch_with_default_config():
    """Through the public function with the default tile: backend="triton" (interpreted on CPU,
    compiled on a GPU) against backend="torch" (the eager reference); "auto" takes the Triton path
    here."""
    x, v, x0, noise = blend_inputs((2, 64, 64), torch.float32, 1, grad=True)
    mask = rand((2, 64, 1), seed=1).float()
    t = torch.full((2,), 0.8)
    go = randn(x.shape, torch.float32, 5)
    results = {}
    for backend in ("triton", "torch", "auto"):
        out = kernels.masked_blend_step(x, v, mask, x0, noise, t, 0.6, backend=backend)
        results[backend] = (out, *torch.autograd.grad(out, (x, v, x0, noise), go))
    for got, want in zip(results["triton"], results["torch"]):
        torch.testing.assert_close(got, want, **TOL[torch.float32])
    assert all(torch.equal(a, b) for a, b in zip(results["auto"], results["triton"]))
