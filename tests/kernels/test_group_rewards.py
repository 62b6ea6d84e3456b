"""Group rewards: the Triton kernel (interpreted on CPU) against the eager reference, and the
properties of the normalisation and the filter."""
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from kernel_testing import (
    TOL,
    assert_low_precision,
    guarded,
    guarded_buffers,
    per_combination,
    rand,
    ulp,
)

import kernels
from kernels.group_rewards import group_rewards_triton
from kernels.reference import GroupRewards, group_rewards_reference

TAU_MEAN, TAU_STD = 0.6, 0.15

# The options that select a different kernel path: the std (GLOBAL), the filter (FILTER: off,
# paper, strict) and the scores' layout ([G, S]; [G, S, D] averaged; [G, S, D] with dim_weights:
# HAS_WD): 2 x 3 x 3 = 18 combinations, each a test case; hypothesis draws scores, clip, eps, tiles.
GR_OPTIONS = [(std, rule, layout) for std in ("group", "global") for rule in (None, "paper", "strict")
              for layout in ("2d", "3d", "3d_weighted")]


@st.composite
def score_tensors(draw, dtype=torch.float64, layout=None):
    """Small score tensors drawn element by element, with equal-score groups and ties."""
    G = draw(st.sampled_from([3, 1, 2, 4, 5, 6]))  # (first choices: hypothesis's simplest example)
    S = draw(st.sampled_from([5, 1, 2, 3, 24]))
    if layout is None:
        D = draw(st.sampled_from([None, 1, 2, 4]))
    else:
        D = None if layout == "2d" else draw(st.sampled_from([2, 1, 4]))
    cells = G * S * (D or 1)
    value = st.one_of(st.floats(0, 1, allow_nan=False), st.sampled_from([0.0, 0.5, 0.95, 1.0]))
    flat = draw(st.lists(value, min_size=cells, max_size=cells))
    scores = torch.tensor(flat, dtype=dtype).reshape(G, S, *([D] if D else []))
    if draw(st.booleans()):  # a group whose members all agree (std 0)
        scores[draw(st.integers(0, G - 1))] = draw(value)
    return scores


def options(draw, std=None, rule="drawn"):
    if rule == "drawn":
        rule = draw(st.sampled_from([None, "paper", "strict"]))
    return dict(std=std or draw(st.sampled_from(["group", "global"])), clip=draw(st.sampled_from([1.0, 5.0, 0.3])),
                eps=draw(st.sampled_from([1e-4, 1e-2])), tau_mean=None if rule is None else TAU_MEAN,
                tau_std=None if rule is None else TAU_STD, rule=rule or "paper")


def amplification(scores, dim_weights, opts):
    """1 / (sigma + eps) per group ([G, 1]) or for the batch: how much the advantage magnifies a
    rounding difference in a score or a mean. A group of (nearly) equal scores has sigma ~ 0, so two
    correct implementations that round the dimension average or the mean differently (summation
    order) may differ there by ulp / eps in A: up to ~1e-3 in fp32 with eps = 1e-4."""
    s = scores.double()
    if s.dim() == 3:
        w = torch.ones(s.shape[2], dtype=torch.float64) if dim_weights is None else dim_weights.double()
        s = (s * w).sum(2) / w.sum()
    sigma = s.std(1, unbiased=False, keepdim=True) if opts["std"] == "group" else s.std(unbiased=False)
    return 1 / (sigma + opts["eps"])


def assert_rewards_close(got, ref, dtype, opts, amp):
    """Values within TOL; A and r also within 8 ulp of the scores times the amplification."""
    for name in ("r", "advantage", "mean", "std"):
        a, b = getattr(got, name), getattr(ref, name)
        assert a.dtype == b.dtype and a.shape == b.shape, name
        if name in ("r", "advantage"):
            slack = 8 * ulp(dtype) * amp / (2 * opts["clip"] if name == "r" else 1.0)
            bound = TOL[dtype]["atol"] + TOL[dtype]["rtol"] * b.double().abs() + slack
            err = (a.double() - b.double()).abs()
            excess = (err - bound).max().item()
            assert excess <= 0, f"{name}: error {err.max().item():.3g}, {excess:.3g} over the bound"
        else:
            torch.testing.assert_close(a, b, **TOL[dtype], msg=lambda m, name=name: f"{name}: {m}")
    assert got.keep.dtype == torch.bool and torch.equal(got.keep, ref.keep)


def away_from_thresholds(ref, opts):
    """fp32 and fp64 may land on different sides of a threshold: keep examples clear of them."""
    if opts["tau_mean"] is None:
        return True
    clear_of_mean = (ref.mean - opts["tau_mean"]).abs() > 1e-6
    clear_of_std = (ref.std - opts["tau_std"]).abs() > 1e-6
    return bool(clear_of_mean.all() and clear_of_std.all())


@pytest.mark.parametrize("std, rule, layout", GR_OPTIONS, ids=[f"{s}-{r or 'nofilter'}-{d}" for s, r, d in GR_OPTIONS])
@per_combination(1 / 5)
@given(data=st.data())
def test_matches_reference(std, rule, layout, data):
    scores = data.draw(score_tensors(layout=layout), label="scores")
    opts = options(data.draw, std=std, rule=rule)
    dim_weights = None
    if layout == "3d_weighted":
        w = data.draw(st.lists(st.sampled_from([0.0, 0.5, 1.0, 3.0]), min_size=scores.shape[2],
                               max_size=scores.shape[2]), label="dim_weights")
        if not any(w):  # the weights must not all be 0 (the public function refuses that)
            w[0] = 0.5
        dim_weights = torch.tensor(w, dtype=torch.float64)
    dtype = data.draw(st.sampled_from([torch.float64, torch.float32]), label="dtype")
    s = scores.to(dtype)
    wd = None if dim_weights is None else dim_weights.to(dtype)
    ref = group_rewards_reference(s, dim_weights=wd, **opts)
    exact = group_rewards_reference(scores, dim_weights=dim_weights, **opts)
    assume(away_from_thresholds(exact, opts))
    block_g = data.draw(st.sampled_from([2, None, 1]), label="block_g")
    with guarded_buffers():
        got = group_rewards_triton(guarded(s), dim_weights=None if wd is None else guarded(wd), block_g=block_g, **opts)
    assert_rewards_close(got, ref, dtype, opts, amplification(scores, dim_weights, opts))
    clip = opts["clip"]
    assert bool(((got.r >= 0) & (got.r <= 1)).all()) and bool((got.advantage.abs() <= clip).all())


@given(score_tensors(), st.data())
def test_permuting_members_and_groups_permutes_outputs(scores, data):
    opts = options(data.draw)
    G, S = scores.shape[:2]
    base = group_rewards_triton(scores, **opts)
    members = torch.tensor(data.draw(st.permutations(range(S))))
    groups = torch.tensor(data.draw(st.permutations(range(G))))
    permuted = scores[groups][:, members]
    moved = group_rewards_triton(permuted, **opts)
    expected = GroupRewards(r=base.r[groups][:, members], advantage=base.advantage[groups][:, members],
                            keep=base.keep[groups] if away_from_thresholds(base, opts) else moved.keep,
                            mean=base.mean[groups], std=base.std[groups])
    # (the sums run in another order: A may differ by the rounding amplification)
    assert_rewards_close(moved, expected, torch.float64, opts, amplification(permuted, None, opts))


def test_equal_scores_give_zero_advantage_and_half_reward():
    scores = torch.tensor([[0.7] * 24, [0.2] * 12 + [0.9] * 12])
    out = group_rewards_triton(scores, clip=5.0)
    assert torch.equal(out.advantage[0], torch.zeros(24)) and torch.equal(out.r[0], torch.full((24,), 0.5))
    assert out.std[0].item() == 0.0
    # a clear split saturates the clip: +-0.35 / (0.35 + 1e-4) is just under 1
    torch.testing.assert_close(out.advantage[1], torch.tensor([-1.0] * 12 + [1.0] * 12), rtol=0, atol=1e-3)


def test_filter_rules():
    # high mean and tiny spread | low mean, tiny spread | high mean, wide spread | low mean, wide spread
    scores = torch.tensor([[0.95, 0.96], [0.30, 0.31], [1.00, 0.85], [0.10, 0.60]], dtype=torch.float64)
    paper = group_rewards_triton(scores, tau_mean=0.9, tau_std=0.05, rule="paper")
    strict = group_rewards_triton(scores, tau_mean=0.9, tau_std=0.05, rule="strict")
    none = group_rewards_triton(scores)
    assert paper.keep.tolist() == [False, True, True, True]
    assert strict.keep.tolist() == [False, False, False, True]
    assert none.keep.all()
    # the filter never changes rewards
    assert torch.equal(paper.r, none.r) and torch.equal(strict.r, none.r)


def test_filter_boundaries_are_strict_inequalities():
    # mean exactly tau_mean, std exactly tau_std (both exact in binary): the paper rule keeps the
    # group (it is not above / below), the strict rule drops it (it is not below / above)
    scores = torch.tensor([[0.25, 0.75]], dtype=torch.float64)
    for kw in (dict(tau_mean=0.5, tau_std=0.1), dict(tau_mean=0.9, tau_std=0.25)):
        assert group_rewards_triton(scores, rule="paper", **kw).keep.tolist() == [True]
        assert group_rewards_triton(scores, rule="strict", **kw).keep.tolist() == [False]
        assert group_rewards_reference(scores, rule="strict", **kw).keep.tolist() == [False]


def test_global_std_uses_the_whole_batch():
    scores = torch.tensor([[0.0, 1.0], [0.4, 0.6]], dtype=torch.float64)
    out = group_rewards_triton(scores, std="global", clip=5.0, eps=0.0 + 1e-12)
    sigma = scores.std(unbiased=False)
    torch.testing.assert_close(out.advantage, (scores - scores.mean(1, keepdim=True)) / (sigma + 1e-12))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_scores(dtype):
    scores = rand((6, 24, 3), dtype, seed=0)
    wd = torch.tensor([1.0, 2.0, 0.5]).to(dtype)
    got = group_rewards_triton(scores, dim_weights=wd, std="global", clip=5.0)
    eager = group_rewards_reference(scores, dim_weights=wd, std="global", clip=5.0)
    exact = group_rewards_reference(scores.double(), dim_weights=wd.double(), std="global", clip=5.0)
    assert got.r.dtype == torch.float32
    for name in ("r", "advantage", "mean", "std"):
        assert_low_precision(getattr(got, name), getattr(eager, name), getattr(exact, name), torch.float32,
                             scale=getattr(exact, name).abs().max().item())


def test_two_runs_are_bit_identical():
    scores = rand((48, 24, 2), torch.float32, seed=1)
    a = group_rewards_triton(scores, std="global", clip=5.0, tau_mean=0.9, tau_std=0.05)
    b = group_rewards_triton(scores, std="global", clip=5.0, tau_mean=0.9, tau_std=0.05)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_public_dispatch_triton_agrees_with_torch():
    """Through the public function: backend="triton" (interpreted on CPU, compiled on a GPU)
    against backend="torch" (the eager reference); "auto" takes the Triton path here."""
    scores = rand((48, 24, 2), torch.float32, seed=1)
    kw = dict(std="global", clip=5.0, tau_mean=0.52, tau_std=0.19, rule="strict")
    triton_out = kernels.group_rewards(scores, backend="triton", **kw)
    torch_out = kernels.group_rewards(scores, backend="torch", **kw)
    exact = group_rewards_reference(scores.double(), **kw)
    assert away_from_thresholds(exact, kw) and 0 < int(exact.keep.sum()) < 48
    assert_rewards_close(triton_out, torch_out, torch.float32, kw, amplification(scores, None, dict(kw, eps=1e-4)))
    for x, y in zip(kernels.group_rewards(scores, **kw), triton_out):
        assert torch.equal(x, y)
