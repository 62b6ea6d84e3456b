"""The specification itself: docs/design.md's formulas ("The maths the kernels implement") written out
by hand and in plain Python loops over floats, independent of kernels/reference.py, against both
backends of the public functions.

The other kernel tests compare the Triton kernels with the eager references; a mistake made the
same way in both (a wrong constant, ddof=1, a swapped sign) passes them all. These cases catch it:
every value here comes from the formula, never from torch's reductions or the reference.
"""
import itertools
import math
import random

import pytest
import torch
from kernel_testing import rand, randn

import kernels

BACKENDS = ["torch", "triton"]
SPEC_TOL = dict(rtol=1e-10, atol=1e-12)  # fp64 throughout: only rounding separates formula and code


def f64(x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


# -- NFT loss ---------------------------------------------------------------------------------------
def spec_nft_loss(vt, vo, v, r, t, *, beta, adaptive, v_ref=None, kl_coef=0.0, weight=None, reduction="mean"):
    """docs/design.md's NFT loss and its gradient with respect to v_theta, over lists of per-sample lists.

    e+ = (1 - beta) v_old + beta v_theta - v        e- = (1 + beta) v_old - beta v_theta - v
    velocity:  L = mean(e^2);   adaptive:  L = t^2 mean(e^2) / max(t mean|e|, 1e-5), weight detached
    loss_b = (r L+ + (1 - r) L-) / beta + kl_coef mean((v_theta - v_ref)^2)
    mean: sum over kept samples (weight > 0) of w_b loss_b / sum of their w_b.
    Returns (loss, gradient) with loss a float ("mean") or a list ("none": then the gradient of
    sum_b loss_b, i.e. each row the gradient of its own loss)."""
    losses, grads = [], []
    for b in range(len(vt)):
        N = len(vt[b])
        ep = [(1 - beta) * vo[b][i] + beta * vt[b][i] - v[b][i] for i in range(N)]
        en = [(1 + beta) * vo[b][i] - beta * vt[b][i] - v[b][i] for i in range(N)]
        l_pos = sum(e * e for e in ep) / N
        l_neg = sum(e * e for e in en) / N
        a_pos = a_neg = 1.0  # the factor on mean(e^2): t^2 / w in the adaptive form
        if adaptive:
            w_pos = max(t[b] * sum(abs(e) for e in ep) / N, 1e-5)
            w_neg = max(t[b] * sum(abs(e) for e in en) / N, 1e-5)
            a_pos, a_neg = t[b] ** 2 / w_pos, t[b] ** 2 / w_neg
        loss = (r[b] * a_pos * l_pos + (1 - r[b]) * a_neg * l_neg) / beta
        # d e+_i / d v_theta_i = beta, d e-_i / d v_theta_i = -beta: the 1 / beta cancels
        grad = [2 / N * (r[b] * a_pos * ep[i] - (1 - r[b]) * a_neg * en[i]) for i in range(N)]
        if v_ref is not None:
            loss += kl_coef * sum((vt[b][i] - v_ref[b][i]) ** 2 for i in range(N)) / N
            grad = [grad[i] + 2 * kl_coef / N * (vt[b][i] - v_ref[b][i]) for i in range(N)]
        losses.append(loss)
        grads.append(grad)
    if reduction == "none":
        return losses, grads
    w = [1.0] * len(vt) if weight is None else weight
    total = sum(wb for wb in w if wb > 0)
    mean = sum(wb * lb for wb, lb in zip(w, losses) if wb > 0) / total
    return mean, [[(wb / total if wb > 0 else 0.0) * g for g in grad] for wb, grad in zip(w, grads)]


def public_nft(backend, vt, vo, v, r, t, **kw):
    """(loss, d loss / d v_theta) through kernels.nft_loss; for "none", the gradient of the sum."""
    x = f64(vt).requires_grad_()
    v_ref = kw.pop("v_ref", None)
    weight = kw.pop("weight", None)
    out = kernels.nft_loss(x, f64(vo), f64(v), f64(r), None if t is None else f64(t), backend=backend,
                           v_ref=None if v_ref is None else f64(v_ref), weight=None if weight is None else f64(weight),
                           **kw)
    (grad,) = torch.autograd.grad(out.sum(), x)
    return out, grad


# Hand-computed, exact in binary. beta = 1, v_theta = [1, 3], v_old = [1, 1], v = [0, 0]:
#   e+ = v_theta - v = [1, 3]            L+ = (1 + 9) / 2 = 5        mean|e+| = 2
#   e- = 2 v_old - v_theta - v = [1, -1] L- = (1 + 1) / 2 = 1        mean|e-| = 1
# r = 1/4, velocity: loss = 5/4 + 3/4 = 2; gradient (2/N)(r e+ - (1 - r) e-) = [-1/2, 3/2].
# adaptive, t = 1/2: w+ = 1, w- = 1/2, L+ = 1/4 * 5 / 1 = 5/4, L- = 1/4 * 1 / (1/2) = 1/2,
#   loss = 5/16 + 3/8 = 11/16; gradient r (t^2 / w+) e+ - (1 - r)(t^2 / w-) e- = [-5/16, 9/16].
# beta = 1/2, v_theta = [2, 0], v_old = [1, 1], v = [0, 1], r = 1/2:
#   e+ = v_old / 2 + v_theta / 2 - v = [3/2, -1/2]    L+ = 5/4
#   e- = 3 v_old / 2 - v_theta / 2 - v = [1/2, 1/2]   L- = 1/4
#   velocity loss = (5/8 + 1/8) / (1/2) = 3/2; gradient (2/N)(r e+ - (1 - r) e-) = [1/2, -1/2];
#   with v_ref = [1, 0], kl_coef = 1/4: loss + 1/4 * mean([1, 0]^2) = 13/8,
#   gradient + (2 kl_coef / N)(v_theta - v_ref) = [3/4, -1/2].
NFT_HAND = [
    (dict(vt=[[1.0, 3.0]], vo=[[1.0, 1.0]], v=[[0.0, 0.0]], r=[0.25], t=[0.5], beta=1.0, adaptive=False),
     2.0, [[-0.5, 1.5]]),
    (dict(vt=[[1.0, 3.0]], vo=[[1.0, 1.0]], v=[[0.0, 0.0]], r=[0.25], t=[0.5], beta=1.0, adaptive=True),
     11 / 16, [[-5 / 16, 9 / 16]]),
    (dict(vt=[[2.0, 0.0]], vo=[[1.0, 1.0]], v=[[0.0, 1.0]], r=[0.5], t=[0.5], beta=0.5, adaptive=False),
     1.5, [[0.5, -0.5]]),
    (dict(vt=[[2.0, 0.0]], vo=[[1.0, 1.0]], v=[[0.0, 1.0]], r=[0.5], t=[0.5], beta=0.5, adaptive=False,
          v_ref=[[1.0, 0.0]], kl_coef=0.25), 13 / 8, [[0.75, -0.5]]),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case, loss, grad", NFT_HAND, ids=["velocity", "adaptive", "beta_half", "beta_half_kl"])
def test_nft_loss_hand_computed(backend, case, loss, grad):
    case = dict(case)
    out, g = public_nft(backend, case.pop("vt"), case.pop("vo"), case.pop("v"), case.pop("r"), case.pop("t"), **case)
    torch.testing.assert_close(out, f64(loss), **SPEC_TOL)
    if grad is not None:
        torch.testing.assert_close(g, f64(grad), **SPEC_TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nft_loss_adaptive_floor_and_weighted_mean_by_hand(backend):
    """Sample 0 sits under the adaptive floor: t = 2^-10, e+- = +-2^-8 everywhere (v_theta = v_old
    + 2^-8, v = v_old, beta = 1), so t mean|e| = 2^-18 < 1e-5 and w = 1e-5:
    L+- = t^2 e^2 / 1e-5 = 2^-36 / 1e-5 whatever r. Sample 1 (t = 1/2) is the first hand case
    above: 11/16. The weighted mean with weights [3, 1] is (3 * 2^-36 / 1e-5 + 11/16) / 4; a third
    sample with weight 0 is dropped."""
    e = 2.0**-8
    vt = [[1.0 + e, -2.0 + e], [1.0, 3.0], [5.0, 5.0]]
    vo = [[1.0, -2.0], [1.0, 1.0], [0.0, 0.0]]
    v = [[1.0, -2.0], [0.0, 0.0], [1.0, 1.0]]
    r, t = [0.75, 0.25, 0.5], [2.0**-10, 0.5, 0.5]
    floored = 2.0**-36 / 1e-5
    kw = dict(beta=1.0, adaptive=True)
    per_sample, _ = public_nft(backend, vt, vo, v, r, t, reduction="none", **kw)
    torch.testing.assert_close(per_sample[:2], f64([floored, 11 / 16]), **SPEC_TOL)
    mean, grad = public_nft(backend, vt, vo, v, r, t, weight=[3.0, 1.0, 0.0], **kw)
    torch.testing.assert_close(mean, f64((3 * floored + 11 / 16) / 4), **SPEC_TOL)
    # gradient of sample 0: (2/N) (r (t^2/w) e - (1 - r)(t^2/w)(-e)) = (t^2 / w) e (N = 2), times 3/4
    assert not grad[2].any()
    torch.testing.assert_close(grad[0], torch.full((2,), 0.75 * 2.0**-20 / 1e-5 * e, dtype=torch.float64), **SPEC_TOL)
    torch.testing.assert_close(grad[1], f64([-5 / 64, 9 / 64]), **SPEC_TOL)


def _random_lists(rng, B, N, lo=-2.0, hi=2.0):
    return [[rng.uniform(lo, hi) for _ in range(N)] for _ in range(B)]


NFT_OPTIONS = [(adaptive, reduction, has_ref, has_weight) for adaptive in (False, True)
               for reduction in ("mean", "none") for has_ref in (False, True) for has_weight in (False, True)
               if not (reduction == "none" and has_weight)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("adaptive, reduction, has_ref, has_weight", NFT_OPTIONS)
def test_nft_loss_matches_the_plain_python_formula(backend, adaptive, reduction, has_ref, has_weight):
    """Every valid option combination, on a batch whose last sample is under the adaptive floor."""
    rng = random.Random(7)
    B, N, beta = 4, 5, 0.3
    vt, vo, v = (_random_lists(rng, B, N) for _ in range(3))
    vo[3] = [x + 1e-3 for x in vt[3]]  # tiny errors...
    v[3] = [x + 1e-3 for x in vo[3]]
    r, t = [0.3, 0.85, 0.0, 0.6], [0.7, 1.0, 0.25, 1e-3]  # ...and a tiny t: t mean|e| < 1e-5
    kw = dict(beta=beta, adaptive=adaptive, reduction=reduction)
    if has_ref:
        kw.update(v_ref=_random_lists(rng, B, N), kl_coef=0.2)
    if has_weight:
        kw.update(weight=[0.5, 0.0, 2.0, 1.5])
    want, want_grad = spec_nft_loss(vt, vo, v, r, t, **kw)
    got, grad = public_nft(backend, vt, vo, v, r, t, **kw)
    torch.testing.assert_close(got, f64(want), **SPEC_TOL)
    torch.testing.assert_close(grad, f64(want_grad), **SPEC_TOL)


# -- group rewards ------------------------------------------------------------------------------------
def spec_group_rewards(scores, *, dim_weights=None, std="group", clip=1.0, eps=1e-4, tau_mean=None,
                       tau_std=None, rule="paper"):
    """docs/design.md's group rewards over nested lists [G][S] or [G][S][D]:

    s[g,i] = weighted mean over d; mu_g = mean_i s; sigma_g = population std (ddof 0)
    A = clip((s - mu_g) / (sigma + eps), -c, c) with sigma = sigma_g or the std of all s
    r = 1/2 + A / (2c); keep: paper = not (mu > tau_mu and sigma_g < tau_sigma),
    strict = mu < tau_mu and sigma_g > tau_sigma. Returns (r, A, keep, mu, sigma_g) as lists."""
    s = []
    for group in scores:
        row = []
        for x in group:
            if isinstance(x, list):
                w = dim_weights or [1.0] * len(x)
                x = sum(wd * xd for wd, xd in zip(w, x)) / sum(w)
            row.append(x)
        s.append(row)
    mu = [sum(row) / len(row) for row in s]
    sigma_g = [math.sqrt(sum((x - m) ** 2 for x in row) / len(row)) for row, m in zip(s, mu)]
    every = [x for row in s for x in row]
    mean_all = sum(every) / len(every)
    sigma_all = math.sqrt(sum((x - mean_all) ** 2 for x in every) / len(every))
    adv, r, keep = [], [], []
    for row, m, sg in zip(s, mu, sigma_g):
        sigma = sg if std == "group" else sigma_all
        a_row = [min(max((x - m) / (sigma + eps), -clip), clip) for x in row]
        adv.append(a_row)
        r.append([0.5 + a / (2 * clip) for a in a_row])
        if tau_mean is None:
            keep.append(True)
        elif rule == "paper":
            keep.append(not (m > tau_mean and sg < tau_std))
        else:
            keep.append(m < tau_mean and sg > tau_std)
    return r, adv, keep, mu, sigma_g


def check_group_rewards(got, want):
    r, adv, keep, mu, sigma_g = want
    torch.testing.assert_close(got.r, f64(r), **SPEC_TOL)
    torch.testing.assert_close(got.advantage, f64(adv), **SPEC_TOL)
    torch.testing.assert_close(got.mean, f64(mu), **SPEC_TOL)
    torch.testing.assert_close(got.std, f64(sigma_g), **SPEC_TOL)
    assert got.keep.tolist() == keep


@pytest.mark.parametrize("backend", BACKENDS)
def test_group_rewards_hand_computed(backend):
    """[1/4, 3/4, 1/2]: mu = 1/2, deviations -1/4, 1/4, 0, population variance 1/24 (ddof = 1
    would give 1/16); A = +-(1/4) / (sqrt(1/24) + eps). [0, 1/2, 1]: variance 1/6 (ddof 1: 1/4).
    c = 5: r = 1/2 + A / 10. A group of equal scores: sigma 0, A 0, r exactly 1/2."""
    scores = [[0.25, 0.75, 0.5], [0.0, 0.5, 1.0], [0.625, 0.625, 0.625]]
    eps = 0.01
    got = kernels.group_rewards(f64(scores), clip=5.0, eps=eps, backend=backend)
    a0 = 0.25 / (math.sqrt(1 / 24) + eps)
    a1 = 0.5 / (math.sqrt(1 / 6) + eps)
    torch.testing.assert_close(got.mean, f64([0.5, 0.5, 0.625]), **SPEC_TOL)
    torch.testing.assert_close(got.std, f64([math.sqrt(1 / 24), math.sqrt(1 / 6), 0.0]), **SPEC_TOL)
    torch.testing.assert_close(got.advantage, f64([[-a0, a0, 0.0], [-a1, 0.0, a1], [0.0] * 3]), **SPEC_TOL)
    torch.testing.assert_close(got.r, f64([[0.5 - a0 / 10, 0.5 + a0 / 10, 0.5], [0.5 - a1 / 10, 0.5, 0.5 + a1 / 10],
                                           [0.5] * 3]), **SPEC_TOL)
    # c = 1 (Edit-R1 eq. 7): |A| = 0.25 / 0.214 > 1 saturates, r = 1/2 +- 1/2 exactly
    got = kernels.group_rewards(f64([[0.25, 0.75, 0.5]]), clip=1.0, eps=eps, backend=backend)
    assert got.r.tolist() == [[0.0, 1.0, 0.5]] and got.advantage.tolist() == [[-1.0, 1.0, 0.0]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_group_rewards_global_std_and_dimension_weights_by_hand(backend):
    """Dimensions [a, b] with weights [1, 3] average to (a + 3 b) / 4: [[1, 0], [0, 1]] -> [1/4, 3/4]
    and [[1/2, 1/2], [1/2, 1/2]] -> [1/2, 1/2]. Global std of all four: mean 1/2, variance
    (1/16 + 1/16 + 0 + 0) / 4 = 1/32 (ddof 1: 1/24). A of group 0 = +-(1/4) / (sqrt(1/32) + eps)
    around its own mean 1/2; group 1 has sigma_g = 0 and A = 0; the std output stays per group."""
    scores = [[[1.0, 0.0], [0.0, 1.0]], [[0.5, 0.5], [0.5, 0.5]]]
    eps = 1e-4
    got = kernels.group_rewards(f64(scores), dim_weights=f64([1.0, 3.0]), std="global", clip=5.0, eps=eps,
                                backend=backend)
    a = 0.25 / (math.sqrt(1 / 32) + eps)
    torch.testing.assert_close(got.advantage, f64([[-a, a], [0.0, 0.0]]), **SPEC_TOL)
    torch.testing.assert_close(got.r, f64([[0.5 - a / 10, 0.5 + a / 10], [0.5, 0.5]]), **SPEC_TOL)
    torch.testing.assert_close(got.std, f64([0.25, 0.0]), **SPEC_TOL)
    # unweighted, group 0's members both average to 1/2: nothing to tell apart
    got = kernels.group_rewards(f64(scores), std="global", clip=5.0, backend=backend)
    assert got.advantage.abs().max().item() == 0.0 and bool((got.r == 0.5).all())


# mean, std of each group: high & tiny | low & tiny | high & wide | low & wide | mean and std exactly
# at the thresholds (0.75 +- 0.25: mean 3/4, std 1/4, exact in binary) | mean exactly at 0.75, std 0
# (only the strictness of "mean above" decides it: a filter that drops at >= is caught)
FILTER_GROUPS = [[0.95, 0.96], [0.30, 0.31], [1.00, 0.85], [0.10, 0.70], [0.5, 1.0], [0.75, 0.75]]
FILTER_CASES = [  # (rule, tau_mean, tau_std, keep)
    ("paper", 0.9, 0.05, [False, True, True, True, True, True]),
    ("strict", 0.9, 0.05, [False, False, False, True, True, False]),
    ("paper", 0.75, 0.25, [False, True, False, True, True, True]),    # at the thresholds: not above / below
    ("strict", 0.75, 0.25, [False, False, False, True, False, False]),  # at the thresholds: not below / above
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("std", ["group", "global"])
@pytest.mark.parametrize("rule, tau_mean, tau_std, keep", FILTER_CASES)
def test_group_filter_rules_by_hand(backend, std, rule, tau_mean, tau_std, keep):
    """The filter reads each group's own mean and population std, also when the advantage uses the
    global std; it never changes the rewards."""
    scores = f64(FILTER_GROUPS)
    got = kernels.group_rewards(scores, std=std, tau_mean=tau_mean, tau_std=tau_std, rule=rule, backend=backend)
    assert got.keep.tolist() == keep
    unfiltered = kernels.group_rewards(scores, std=std, backend=backend)
    assert unfiltered.keep.all() and torch.equal(got.r, unfiltered.r)


GR_SPEC_OPTIONS = [(std, rule, layout) for std in ("group", "global") for rule in (None, "paper", "strict")
                   for layout in ("2d", "3d", "3d_weighted")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("std, rule, layout", GR_SPEC_OPTIONS)
def test_group_rewards_match_the_plain_python_formula(backend, std, rule, layout):
    rng = random.Random(3)
    G, S, D = 5, 6, 3
    scores = [[[rng.random() for _ in range(D)] if layout != "2d" else rng.random() for _ in range(S)]
              for _ in range(G)]
    scores[1] = [[0.625] * D if layout != "2d" else 0.625] * S  # equal scores (exact in binary: std 0)
    scores[2] = [[0.9 + 0.01 * rng.random() for _ in range(D)] if layout != "2d" else 0.9 + 0.01 * rng.random()
                 for _ in range(S)]  # high mean, tiny spread: the filters drop it
    kw = dict(std=std, clip=0.7, eps=1e-3)
    if rule is not None:
        kw.update(tau_mean=0.6, tau_std=0.05, rule=rule)
    dim_weights = [0.5, 0.0, 2.0] if layout == "3d_weighted" else None
    want = spec_group_rewards(scores, dim_weights=dim_weights, **kw)
    got = kernels.group_rewards(f64(scores), dim_weights=None if dim_weights is None else f64(dim_weights),
                                backend=backend, **kw)
    check_group_rewards(got, want)
    if rule is not None:
        assert not all(want[2]) and any(want[2])  # the case does exercise the filter


# -- mask-aware blend step ---------------------------------------------------------------------------
def spec_blend(x, v, m, x0, eps, t, tn):
    """x_next = m (x_t + (t' - t) v) + (1 - m) ((1 - t') x0 + t' eps), element by element, with the
    mask broadcast by hand and per-sample times indexed by the first coordinate; and the gradients
    for an upstream gradient of ones: dx = m, dv = m (t' - t), dx0 = (1 - m)(1 - t'), deps = (1 - m) t'."""
    shape = tuple(x.shape)
    m_shape = (1,) * (len(shape) - m.dim()) + tuple(m.shape)
    m = m.double().reshape(m_shape).tolist()
    x, v, x0, eps = (a.tolist() for a in (x, v, x0, eps))  # nested lists of floats

    def at(nested, idx):
        for i in idx:
            nested = nested[i]
        return nested

    out, dx, dv, dx0, deps = ([] for _ in range(5))
    for idx in itertools.product(*map(range, shape)):
        mi = at(m, [i if size > 1 else 0 for i, size in zip(idx, m_shape)])
        tb = t[idx[0]] if isinstance(t, list) else t
        tnb = tn[idx[0]] if isinstance(tn, list) else tn
        euler = at(x, idx) + (tnb - tb) * at(v, idx)
        renoised = (1 - tnb) * at(x0, idx) + tnb * at(eps, idx)
        out.append(mi * euler + (1 - mi) * renoised)
        dx.append(mi)
        dv.append(mi * (tnb - tb))
        dx0.append((1 - mi) * (1 - tnb))
        deps.append((1 - mi) * tnb)
    return [f64(a).reshape(shape) for a in (out, dx, dv, dx0, deps)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_blend_step_hand_computed(backend):
    """x_t = 1, v = 2, x0 = 3, eps = 4, t = 3/4, t' = 1/2: Euler 1 + (-1/4) 2 = 1/2, re-noised source
    (1/2) 3 + (1/2) 4 = 7/2. m = 1 -> 1/2; m = 0 -> 7/2; m = 1/4 -> 1/8 + 21/8 = 11/4."""
    B, n = 3, 4
    ones = torch.ones(B, n, dtype=torch.float64)
    mask = f64([1.0, 0.0, 0.25]).reshape(B, 1)
    out = kernels.masked_blend_step(ones, 2 * ones, mask, 3 * ones, 4 * ones, 0.75, 0.5, backend=backend)
    assert out.tolist() == [[0.5] * n, [3.5] * n, [2.75] * n]
    # per-sample times: sample b steps from t_b to t'_b; at t' = 0 the kept region is exactly x0
    out = kernels.masked_blend_step(ones, 2 * ones, mask, 3 * ones, 4 * ones, f64([0.75, 0.75, 1.0]),
                                    f64([0.5, 0.0, 0.0]), backend=backend)
    # sample 2: Euler 1 - 2 = -1, source 3: 1/4 (-1) + 3/4 3 = 2
    assert out.tolist() == [[0.5] * n, [3.0] * n, [2.0] * n]


BLEND_SPEC_LAYOUTS = {  # x shape, mask shape
    "per_pixel": ((2, 3, 2, 3), (2, 1, 2, 3)),
    "per_token": ((2, 4, 3), (2, 4, 1)),
    "token_shared": ((2, 4, 3), (1, 4, 1)),
    "elementwise": ((2, 4, 3), (2, 4, 3)),
    "two_runs": ((2, 3, 2, 3), (2, 1, 2, 1)),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", sorted(BLEND_SPEC_LAYOUTS))
def test_blend_step_matches_the_plain_python_formula(backend, layout):
    x_shape, m_shape = BLEND_SPEC_LAYOUTS[layout]
    inputs = [randn(x_shape, seed=10 * len(layout) + i) for i in range(4)]
    u = rand(m_shape, seed=len(layout))
    masks = {"zeros": torch.zeros(m_shape, dtype=torch.float64), "ones": torch.ones(m_shape, dtype=torch.float64),
             "binary": (u > 0.5).double(), "soft": u, "bool": u > 0.5}
    times = [(0.8, 0.55), ([0.9, 0.35], [0.6, 0.0]), (0.3, [0.2, 0.1])]
    for k, (kind, mask) in enumerate(masks.items()):
        t, tn = times[k % len(times)]
        want, *want_grads = spec_blend(*inputs[:2], mask, *inputs[2:], t, tn)
        leaves = [x.clone().requires_grad_() for x in inputs]
        out = kernels.masked_blend_step(*leaves[:2], mask, *leaves[2:], f64(t) if isinstance(t, list) else t,
                                        f64(tn) if isinstance(tn, list) else tn, backend=backend)
        torch.testing.assert_close(out, want, **SPEC_TOL, msg=kind)
        grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
        for name, got, expected in zip(("x_t", "v", "x0_known", "noise"), grads, want_grads):
            torch.testing.assert_close(got, expected, **SPEC_TOL, msg=f"{kind}: d/d{name}")


# -- GRPO loss ----------------------------------------------------------------------------------------
def spec_grpo_loss(v, x, xn, adv, logp_old, *, mean_x, mean_v, std, clip_range, mask=None, v_ref=None,
                   kl_coef=0.0, weight=None, reduction="mean"):
    """docs/design.md's GRPO loss and its gradient with respect to v_theta, over per-sample lists:

    mu = mean_x x + mean_v v;  logp = -sum m (xn - mu)^2 / (2 std^2 M) - log std - log sqrt(2 pi),  M = sum m
    ratio = exp(logp - logp_old) (logp_old None: 1, gradient of logp - logp detached)
    loss = max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps)) + kl_coef sum m (mean_v (v - v_ref))^2 / (2 std^2 M)
    The policy term's gradient is -A ratio dlogp, or 0 where the clipped term is the larger."""
    losses, grads = [], []
    for b in range(len(v)):
        N = len(v[b])
        m = [1.0] * N if mask is None else mask[b]
        M = sum(m)
        M = M if M > 0 else 1.0
        a, c, s = mean_x[b], mean_v[b], std[b]
        e = [xn[b][i] - (a * x[b][i] + c * v[b][i]) for i in range(N)]
        logp = -sum(m[i] * e[i] ** 2 for i in range(N)) / (2 * s * s * M) - math.log(s) - 0.5 * math.log(2 * math.pi)
        ratio = 1.0 if logp_old is None else math.exp(logp - logp_old[b])
        clipped = min(max(ratio, 1 - clip_range), 1 + clip_range)
        A = adv[b]
        loss = max(-A * ratio, -A * clipped)
        g = 0.0 if -A * clipped > -A * ratio else -A * ratio
        dlogp = [c * m[i] * e[i] / (s * s * M) for i in range(N)]
        grad = [g * d for d in dlogp]
        if v_ref is not None:
            loss += kl_coef * sum(m[i] * (c * (v[b][i] - v_ref[b][i])) ** 2 for i in range(N)) / (2 * s * s * M)
            grad = [grad[i] + kl_coef * c * c * m[i] * (v[b][i] - v_ref[b][i]) / (s * s * M) for i in range(N)]
        losses.append(loss)
        grads.append(grad)
    if reduction == "none":
        return losses, grads
    w = [1.0] * len(v) if weight is None else weight
    total = sum(wb for wb in w if wb > 0)
    return (sum(wb * lb for wb, lb in zip(w, losses) if wb > 0) / total,
            [[(wb / total if wb > 0 else 0.0) * gi for gi in grad] for wb, grad in zip(w, grads)])


def public_grpo(backend, v, x, xn, adv, logp_old, **kw):
    """(loss, d loss / d v_theta) through kernels.grpo_loss; for "none", the gradient of the sum."""
    vv = f64(v).requires_grad_()
    lists = {k: None if kw.get(k) is None else f64(kw[k]) for k in ("mean_x", "mean_v", "std", "mask", "v_ref",
                                                                       "weight")}
    kw = dict(kw, **lists)
    out = kernels.grpo_loss(vv, f64(x), f64(xn), f64(adv), None if logp_old is None else f64(logp_old),
                            backend=backend, **kw)
    (grad,) = torch.autograd.grad(out.sum(), vv)
    return out, grad


# Hand-computed: x_t = [1, 2], v = [0, 1], mean_x = 1, mean_v = -1/2, std = 1/2, x_next = [1, 1]:
#   mu = x + c v = [1, 3/2], e = [0, -1/2], M = 2, Q = 1/4, Q / (2 s^2 M) = 1/4,
#   logp = -1/4 + log 2 - log sqrt(2 pi); dlogp/dv = c m e / (s^2 M) = -e = [0, 1/2].
# On-policy, A = 2: loss = -2, gradient -A dlogp = [0, -1]; with v_ref = [0, 0], kl_coef = 1:
#   KL = c^2 sum(v - v_ref)^2 / (2 s^2 M) = 1/4 -> loss -7/4, its gradient c^2 (v - v_ref) / (s^2 M) = [0, 1/2].
# logp_old = logp - log 2 (ratio 2), clip 1/2: A = 2 -> clipped (max(-4, -3) = -3), no gradient;
#   A = -2 -> max(4, 3) = 4, gradient -A ratio dlogp = 4 [0, 1/2] = [0, 2].
# mask [1, 0]: M = 1, Q = 0: logp = log 2 - log sqrt(2 pi), gradient 0.
_LOGP = -0.25 + math.log(2) - 0.5 * math.log(2 * math.pi)
_STEP = dict(v=[[0.0, 1.0]], x=[[1.0, 2.0]], xn=[[1.0, 1.0]], mean_x=[1.0], mean_v=[-0.5], std=[0.5])
GRPO_HAND = [
    (dict(_STEP, adv=[2.0], logp_old=None, clip_range=0.5), -2.0, [[0.0, -1.0]]),
    (dict(_STEP, adv=[2.0], logp_old=None, clip_range=0.5, v_ref=[[0.0, 0.0]], kl_coef=1.0), -1.75, [[0.0, -0.5]]),
    (dict(_STEP, adv=[2.0], logp_old=[_LOGP - math.log(2)], clip_range=0.5), -3.0, [[0.0, 0.0]]),
    (dict(_STEP, adv=[-2.0], logp_old=[_LOGP - math.log(2)], clip_range=0.5), 4.0, [[0.0, 2.0]]),
    (dict(_STEP, adv=[-2.0], logp_old=[math.log(2) - 0.5 * math.log(2 * math.pi) - math.log(2)], clip_range=0.5,
          mask=[[1.0, 0.0]]), 4.0, [[0.0, 0.0]]),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case, loss, grad", GRPO_HAND, ids=["on_policy", "on_policy_kl", "clipped", "unclipped",
                                                             "masked"])
def test_grpo_loss_hand_computed(backend, case, loss, grad):
    case = dict(case)
    out, g = public_grpo(backend, case.pop("v"), case.pop("x"), case.pop("xn"), case.pop("adv"),
                         case.pop("logp_old"), **case)
    torch.testing.assert_close(out, f64(loss), **SPEC_TOL)
    torch.testing.assert_close(g, f64(grad), **SPEC_TOL)
    v, x, xn = f64(_STEP["v"]), f64(_STEP["x"]), f64(_STEP["xn"])
    logp = kernels.sde_step_logprob(v, x, xn, mean_x=f64([1.0]), mean_v=f64([-0.5]), std=f64([0.5]), backend=backend)
    torch.testing.assert_close(logp, f64([_LOGP]), **SPEC_TOL)


GRPO_OPTIONS = [(on, reduction, has_ref, has_weight, has_mask) for on in (True, False)
                for reduction in ("mean", "none") for has_ref in (False, True) for has_weight in (False, True)
                for has_mask in (False, True) if not (reduction == "none" and has_weight)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("on_policy, reduction, has_ref, has_weight, has_mask", GRPO_OPTIONS)
def test_grpo_loss_matches_the_plain_python_formula(backend, on_policy, reduction, has_ref, has_weight, has_mask):
    """Every valid option combination; off-policy, the four samples' ratios sit below the clip range
    with A > 0 (the gradient flows), above it with A > 0 (clipped), inside, and below it with A < 0
    (clipped); with the mask, one sample has no generated element."""
    rng = random.Random(11)
    B, N, eps = 4, 5, 0.2
    v, x, xn = (_random_lists(rng, B, N) for _ in range(3))
    mean_x, mean_v, std = [1.1, 0.9, 1.0, 1.05], [-0.3, -0.1, -0.2, -0.05], [0.5, 0.8, 0.3, 0.6]
    adv = [1.5, 2.0, -0.5, -1.0]
    mask = [[1.0, 0.0, 1.0, 0.5, 1.0], [1.0] * 5, [0.0] * 5, [0.0, 1.0, 1.0, 1.0, 0.0]] if has_mask else None
    kw = dict(mean_x=mean_x, mean_v=mean_v, std=std, clip_range=eps, mask=mask, reduction=reduction)
    logp_old = None
    if not on_policy:
        logp = [0.0] * B
        for b in range(B):
            m = [1.0] * N if mask is None else mask[b]
            M = sum(m) or 1.0
            e = [xn[b][i] - (mean_x[b] * x[b][i] + mean_v[b] * v[b][i]) for i in range(N)]
            logp[b] = (-sum(m[i] * e[i] ** 2 for i in range(N)) / (2 * std[b] ** 2 * M) - math.log(std[b])
                       - 0.5 * math.log(2 * math.pi))
        logp_old = [lp - d * math.log1p(eps) for lp, d in zip(logp, [-3.0, 3.0, 0.3, -3.0])]
    if has_ref:
        kw.update(v_ref=_random_lists(rng, B, N), kl_coef=0.7)
    if has_weight:
        kw.update(weight=[0.5, 0.0, 2.0, 1.5])
    want, want_grad = spec_grpo_loss(v, x, xn, adv, logp_old, **kw)
    got, grad = public_grpo(backend, v, x, xn, adv, logp_old, **kw)
    torch.testing.assert_close(got, f64(want), **SPEC_TOL)
    torch.testing.assert_close(grad, f64(want_grad), **SPEC_TOL)
