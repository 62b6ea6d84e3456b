"""Group rewards: the Triton kernel (interpreted on CPU) against the eager reference, and the
properties of the normalisation and the filter."""
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from kernel_testing import TOL, assert_low_precision, guarded, guarded_buffers, rand

import kernels
from kernels.group_rewards import group_rewards_triton
from kernels.reference import group_rewards_reference

TAU_MEAN, TAU_STD = 0.6, 0.15


@st.composite
def score_tensors(draw, dtype=torch.float64):
    """Small score tensors drawn element by element, with equal-score groups and ties."""
    G = draw(st.integers(1, 6))
    S = draw(st.sampled_from([1, 2, 3, 5, 24]))
    D = draw(st.sampled_from([None, 1, 2, 4]))
    cells = G * S * (D or 1)
    value = st.one_of(st.floats(0, 1, allow_nan=False), st.sampled_from([0.0, 0.5, 0.95, 1.0]))
    flat = draw(st.lists(value, min_size=cells, max_size=cells))
    scores = torch.tensor(flat, dtype=dtype).reshape(G, S, *([D] if D else []))
    if draw(st.booleans()):  # a group whose members all agree (std 0)
        scores[draw(st.integers(0, G - 1))] = draw(value)
    return scores


def options(draw):
    filtered = draw(st.booleans())
    return dict(std=draw(st.sampled_from(["group", "global"])), clip=draw(st.sampled_from([1.0, 5.0, 0.3])),
                eps=draw(st.sampled_from([1e-4, 1e-2])), tau_mean=TAU_MEAN if filtered else None,
                tau_std=TAU_STD if filtered else None, rule=draw(st.sampled_from(["paper", "strict"])))


def assert_rewards_close(got, ref, dtype):
    for name in ("r", "advantage", "mean", "std"):
        a, b = getattr(got, name), getattr(ref, name)
        assert a.dtype == b.dtype and a.shape == b.shape, name
        torch.testing.assert_close(a, b, **TOL[dtype], msg=name)
    assert got.keep.dtype == torch.bool and torch.equal(got.keep, ref.keep)


def away_from_thresholds(ref, opts):
    """fp32 and fp64 may land on different sides of a threshold: keep examples clear of them."""
    if opts["tau_mean"] is None:
        return True
    return bool(((ref.mean - TAU_MEAN).abs() > 1e-6).all() and ((ref.std - TAU_STD).abs() > 1e-6).all())


@given(score_tensors(), st.data())
def test_matches_reference(scores, data):
    opts = options(data.draw)
    weighted = scores.dim() == 3 and data.draw(st.booleans())
    dim_weights = torch.tensor(data.draw(st.lists(st.sampled_from([0.0, 0.5, 1.0, 3.0]), min_size=scores.shape[2],
                                                  max_size=scores.shape[2])), dtype=torch.float64) if weighted else None
    if dim_weights is not None:
        assume(dim_weights.sum() > 0)
    dtype = data.draw(st.sampled_from([torch.float64, torch.float32]))
    s = scores.to(dtype)
    wd = None if dim_weights is None else dim_weights.to(dtype)
    ref = group_rewards_reference(s, dim_weights=wd, **opts)
    exact = group_rewards_reference(scores, dim_weights=dim_weights, **opts)
    assume(away_from_thresholds(exact, opts))
    block_g = data.draw(st.sampled_from([None, 1, 2]))
    with guarded_buffers():
        got = group_rewards_triton(guarded(s), dim_weights=None if wd is None else guarded(wd), block_g=block_g, **opts)
    assert_rewards_close(got, ref, dtype)
    clip = opts["clip"]
    assert bool(((got.r >= 0) & (got.r <= 1)).all()) and bool((got.advantage.abs() <= clip).all())


@given(score_tensors(), st.data())
def test_permuting_members_and_groups_permutes_outputs(scores, data):
    opts = options(data.draw)
    G, S = scores.shape[:2]
    base = group_rewards_triton(scores, **opts)
    members = torch.tensor(data.draw(st.permutations(range(S))))
    groups = torch.tensor(data.draw(st.permutations(range(G))))
    moved = group_rewards_triton(scores[groups][:, members], **opts)
    torch.testing.assert_close(moved.r, base.r[groups][:, members], **TOL[torch.float64])
    torch.testing.assert_close(moved.advantage, base.advantage[groups][:, members], **TOL[torch.float64])
    torch.testing.assert_close(moved.mean, base.mean[groups], **TOL[torch.float64])
    torch.testing.assert_close(moved.std, base.std[groups], **TOL[torch.float64])
    if away_from_thresholds(base, opts):
        assert torch.equal(moved.keep, base.keep[groups])


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


def test_two_runs_are_bit_identical_and_public_dispatch_agrees():
    scores = rand((48, 24, 2), torch.float32, seed=1)
    a = kernels.group_rewards(scores, std="global", clip=5.0, tau_mean=0.9, tau_std=0.05)
    b = group_rewards_triton(scores, std="global", clip=5.0, tau_mean=0.9, tau_std=0.05)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
