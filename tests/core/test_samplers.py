"""Samplers on flows whose exact solutions are known in closed form.

Gaussian data N(m, s^2) per element: x_t = (1 - t) x0 + t eps has variance V_t = (1 - t)^2 s^2 + t^2,
the exact velocity is v(x, t) = (t - (1 - t) s^2) / V_t (x - (1 - t) m) - m, and the ODE carries
x_1 = z to x_t = (1 - t) m + sqrt(V_t) z (so x_0 = m + s z).
"""
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import core.sampling.samplers as samplers
from core.policies.policy import Condition, Policy
from core.sampling.samplers import Blend, cfg_velocity, sample, sample_policy
from core.sampling.schedules import flux_sigmas

M, S = 0.3, 0.5


def gaussian_velocity(x, t):
    t = t.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
    var = (1 - t) ** 2 * S**2 + t**2
    return (t - (1 - t) * S**2) / var * (x - (1 - t) * M) - M


def gaussian_state(t, z):
    return (1 - t) * M + math.sqrt((1 - t) ** 2 * S**2 + t**2) * z


def point_mass_velocity(x0):
    """The exact velocity when the data is the single point x0: v = (x - x0) / t."""
    def velocity(x, t):
        return (x - x0) / t.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
    return velocity


@given(method=st.sampled_from(["euler", "dpm2", "sde"]), steps=st.integers(1, 12),
       shift=st.sampled_from([None, 1.0, 3.0, 0.4]), shape=st.sampled_from([(1, 5), (2, 4, 3), (3, 2, 2, 2)]),
       noise_level=st.sampled_from([0.0, 0.3, 1.0]), seed=st.integers(0, 2**16))
def test_point_mass_data_is_recovered_exactly(method, steps, shift, shape, noise_level, seed):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(shape, generator=g, dtype=torch.float64)
    eps = torch.randn(shape, generator=g, dtype=torch.float64)
    out = sample(point_mass_velocity(x0), eps, flux_sigmas(steps, shift=shift), method=method,
                 noise_level=noise_level, generator=g)
    assert out.dtype == torch.float64 and out.shape == shape
    torch.testing.assert_close(out, x0, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("method", ["euler", "dpm2"])
def test_straight_paths_are_exact(method):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 3, 16, 8, generator=g)
    v = eps - x0
    out = sample(lambda x, t: v, eps, flux_sigmas(7, shift=3.0), method=method)
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-5)


def convergence(method, a, b, steps):
    z = torch.linspace(-2, 2, 9, dtype=torch.float64)[:, None]
    errs = []
    for n in steps:
        out = sample(gaussian_velocity, gaussian_state(a, z), torch.linspace(a, b, n + 1, dtype=torch.float64),
                     method=method)
        errs.append(float((out - gaussian_state(b, z)).abs().max()))
    return [errs[i] / errs[i + 1] for i in range(len(errs) - 1)], errs


def test_dpm2_converges_at_second_order_and_euler_at_first():
    ratios, _ = convergence("dpm2", 0.9, 0.1, [16, 32, 64])
    assert all(3.5 < r < 4.5 for r in ratios), ratios
    ratios, _ = convergence("euler", 0.9, 0.1, [16, 32, 64])
    assert all(1.8 < r < 2.2 for r in ratios), ratios


def test_dpm2_beats_euler_on_the_full_schedule():
    z = torch.linspace(-2, 2, 9, dtype=torch.float64)[:, None]
    sig = flux_sigmas(32).double()
    err = {m: float((sample(gaussian_velocity, z, sig, method=m) - (M + S * z)).abs().max()) for m in ("euler", "dpm2")}
    assert err["dpm2"] < err["euler"] / 4, err


def test_dpm2_last_step_is_the_data_prediction():
    z = torch.randn(4, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    sig = flux_sigmas(5, shift=3.0).double()
    out, traj = sample(gaussian_velocity, z, sig, method="dpm2", return_trajectory=True)
    t = sig[-2].expand(4)
    torch.testing.assert_close(out, traj[-2] - sig[-2] * gaussian_velocity(traj[-2], t), rtol=0, atol=0)
    assert traj.shape == (6, 4, 6) and torch.equal(traj[0], z) and torch.equal(traj[-1], out)


@pytest.mark.parametrize("noise_level", [0.4, 1.0])
def test_sde_marginals_match_the_data(noise_level):
    # 32000 values: under torch's parallel grain size, so a busy 2-core machine does not make
    # OpenMP threads spin (that made this test 50x slower)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(16000, 2, generator=g, dtype=torch.float64)
    out, traj = sample(gaussian_velocity, z, flux_sigmas(100).double(), method="sde", noise_level=noise_level,
                       generator=g, return_trajectory=True)
    assert abs(float(out.mean()) - M) < 0.01 and abs(float(out.std()) - S) < 0.01
    mid = traj[50]  # t = 0.5; Euler-Maruyama's O(dt) bias is ~0.008 here at a = 1 (halves as steps double)
    assert abs(float(mid.mean()) - 0.5 * M) < 0.01
    assert abs(float(mid.std()) - math.sqrt(0.25 * S**2 + 0.25)) < 0.015
    # the noise really is injected: the samples leave the ODE's deterministic map z -> m + s z
    assert float((out - (M + S * z)).std()) > 0.1 * noise_level


def test_sde_without_noise_is_euler_and_is_reproducible():
    z = torch.randn(3, 5, generator=torch.Generator().manual_seed(2))
    sig = flux_sigmas(6, shift=3.0)
    euler = sample(gaussian_velocity, z, sig, method="euler")
    assert torch.equal(sample(gaussian_velocity, z, sig, method="sde", noise_level=0.0), euler)
    a = sample(gaussian_velocity, z, sig, method="sde", generator=torch.Generator().manual_seed(5))
    b = sample(gaussian_velocity, z, sig, method="sde", generator=torch.Generator().manual_seed(5))
    c = sample(gaussian_velocity, z, sig, method="sde", generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.allclose(a, c)


@pytest.mark.parametrize("method", ["euler", "dpm2", "sde"])
def test_stopping_early_gives_the_intermediate_state(method):
    z = torch.randn(2, 7, generator=torch.Generator().manual_seed(3))
    sig = flux_sigmas(8, shift=3.0)
    _, traj = sample(gaussian_velocity, z, sig, method=method, generator=torch.Generator().manual_seed(9),
                     return_trajectory=True)
    for k in (1, 2, 5):
        part = sample(gaussian_velocity, z, sig[: k + 1], method=method, generator=torch.Generator().manual_seed(9))
        torch.testing.assert_close(part, traj[k], rtol=0, atol=0)


def _blend_inputs(seed=4, shape=(2, 12, 4)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g), g


@pytest.mark.parametrize("method", ["euler", "dpm2", "sde"])
def test_blend_mask_zero_keeps_the_source_and_mask_one_is_unblended(method):
    noise, x0_known, _ = _blend_inputs()
    sig = flux_sigmas(6, shift=3.0)
    kw = dict(method=method, noise_level=0.5)
    zero = sample(gaussian_velocity, noise, sig, blend=Blend(torch.zeros(2, 12, 1), x0_known, noise),
                  generator=torch.Generator().manual_seed(1), **kw)
    assert torch.equal(zero, x0_known)
    one = sample(gaussian_velocity, noise, sig, blend=Blend(torch.ones(2, 12, 1), x0_known, noise),
                 generator=torch.Generator().manual_seed(1), **kw)
    plain = sample(gaussian_velocity, noise, sig, generator=torch.Generator().manual_seed(1), **kw)
    torch.testing.assert_close(one, plain, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", ["euler", "dpm2", "sde"])
def test_blend_keeps_known_region_on_the_renoised_source(method):
    # the Gaussian velocity is elementwise, so the generated region evolves as without blending
    noise, x0_known, g = _blend_inputs()
    mask = (torch.rand(2, 12, 4, generator=g) > 0.5).float()
    sig = flux_sigmas(6)
    out, traj = sample(gaussian_velocity, noise, sig, method=method, blend=Blend(mask, x0_known, noise),
                       generator=torch.Generator().manual_seed(1), return_trajectory=True)
    plain = sample(gaussian_velocity, noise, sig, method=method, generator=torch.Generator().manual_seed(1))
    keep = mask == 0
    for i, t in enumerate(sig.tolist()):
        torch.testing.assert_close(traj[i][keep], ((1 - t) * x0_known + t * noise)[keep], rtol=0, atol=1e-6)
    assert torch.equal(out[keep], x0_known[keep])
    torch.testing.assert_close(out[~keep], plain[~keep], rtol=1e-5, atol=1e-5)


def test_blend_goes_through_the_kernel_once_per_step(monkeypatch):
    calls = []
    real = samplers.masked_blend_step

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(samplers, "masked_blend_step", counting)
    noise, x0_known, _ = _blend_inputs()
    sample(gaussian_velocity, noise, flux_sigmas(5), method="dpm2", blend=Blend(torch.ones(2, 12, 1), x0_known, noise))
    assert len(calls) == 5
    t, t_next = calls[0][5], calls[0][6]
    assert t.shape == (2,) and t.dtype == torch.float32 and float(t[0]) == 1.0 and float(t_next[0]) == pytest.approx(0.8)


def test_cfg_velocity():
    vc, vu = torch.full((2, 3), 2.0), torch.full((2, 3), -1.0)

    def uncond(x, t):
        raise AssertionError("scale 1 must not evaluate the unconditional branch")

    cond = lambda x, t: vc  # noqa: E731
    assert cfg_velocity(cond, uncond, 1.0) is cond
    guided = cfg_velocity(cond, lambda x, t: vu, 4.0)
    torch.testing.assert_close(guided(vc, None), vu + 4.0 * (vc - vu))


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="heun"), "unknown sampling method"),
    (dict(sigmas=torch.tensor([1.0, 1.0, 0.0])), "strictly decreasing"),
    (dict(method="sde", noise_level=-0.1), "noise_level"),
    (dict(blend=Blend(torch.ones(2, 5, 1), torch.zeros(2, 4, 3), torch.zeros(2, 4, 3))), "does not broadcast"),
    (dict(blend=Blend(torch.ones(2, 4, 1), torch.zeros(2, 4, 2), torch.zeros(2, 4, 3))), "must have the sampler"),
])
def test_bad_arguments(kwargs, message):
    args = dict(sigmas=flux_sigmas(3), method="euler")
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        sample(gaussian_velocity, torch.zeros(2, 4, 3), args.pop("sigmas"), **args)


# -- sample_policy on a small real Policy ---------------------------------------------------------
class LinearPolicy(Policy):
    """A per-token linear velocity model conditioned on t and the condition latents."""

    def __init__(self, channels=4):
        torch.manual_seed(0)
        self.model = nn.Linear(2 * channels + 1, channels)

    @property
    def latent_channels(self):
        return self.model.out_features

    def encode(self, images, masks, prompts):
        raise NotImplementedError("tests build Conditions directly")

    def _velocity(self, x_t, t, cond):
        tt = t.view(-1, 1, 1).expand(-1, x_t.shape[1], 1).to(x_t.dtype)
        return self.call_model(torch.cat([x_t, cond.cond_latents, tt], -1))

    def decode(self, x0, cond):
        return x0


def make_condition(B=2, L=6, C=4, seed=0, mask=None):
    g = torch.Generator().manual_seed(seed)
    return Condition(prompt_embeds=torch.zeros(B, 1, 1), pooled=torch.zeros(B, 1),
                     cond_latents=torch.randn(B, L, C, generator=g), x0_known=torch.randn(B, L, C, generator=g),
                     blend_mask=torch.ones(B, L, 1) if mask is None else mask, img_ids=torch.zeros(L, 3),
                     text_ids=torch.zeros(1, 3), latent_hw=(2, 2 * L // 2), image_hw=(8, 8))


def test_sample_policy_matches_sample_with_the_policy_velocity():
    policy, cond = LinearPolicy(), make_condition()
    sig = flux_sigmas(4)
    out = sample_policy(policy, cond, sigmas=sig, generator=torch.Generator().manual_seed(0))
    noise = policy.initial_noise(cond, torch.Generator().manual_seed(0))
    ref = sample(lambda x, t: policy.velocity(x, t, cond), noise, sig, method="dpm2",
                 blend=Blend(cond.blend_mask, cond.x0_known, noise))
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_sample_policy_blends_with_the_starting_noise_and_uses_weights():
    policy = LinearPolicy()
    mask = torch.zeros(2, 6, 1)
    mask[:, :3] = 1
    cond = make_condition(mask=mask)
    noise = torch.randn(2, 6, 4, generator=torch.Generator().manual_seed(7))
    sig = flux_sigmas(5, shift=3.0)
    x3 = sample_policy(policy, cond, sigmas=sig[:4], method="euler", noise=noise)
    t3 = float(sig[3])
    torch.testing.assert_close(x3[:, 3:], ((1 - t3) * cond.x0_known + t3 * noise)[:, 3:], rtol=0, atol=1e-6)
    # a weight set changes the result exactly as changing the model would
    other = {k: v + 0.1 for k, v in policy.snapshot().items()}
    with_weights = sample_policy(policy, cond, sigmas=sig, noise=noise, weights=other)
    base = sample_policy(policy, cond, sigmas=sig, noise=noise)
    with torch.no_grad():
        for k, p in policy.model.named_parameters():
            p.add_(0.1)
    torch.testing.assert_close(sample_policy(policy, cond, sigmas=sig, noise=noise), with_weights)
    assert not torch.allclose(base, with_weights)


def test_sample_policy_cfg_and_gradients():
    policy, cond = LinearPolicy(), make_condition()
    uncond = make_condition(seed=1)
    noise = torch.randn(2, 6, 4, generator=torch.Generator().manual_seed(7))
    sig = flux_sigmas(3)
    one = sample_policy(policy, cond, sigmas=sig, noise=noise, cfg_scale=1.0, uncond=uncond)
    torch.testing.assert_close(one, sample_policy(policy, cond, sigmas=sig, noise=noise), rtol=0, atol=0)
    guided = sample_policy(policy, cond, sigmas=sig, noise=noise, cfg_scale=3.0, uncond=uncond, blend=False)
    ref = sample(cfg_velocity(lambda x, t: policy.velocity(x, t, cond), lambda x, t: policy.velocity(x, t, uncond), 3.0),
                 noise, sig, method="dpm2")
    torch.testing.assert_close(guided, ref, rtol=0, atol=0)
    with pytest.raises(ValueError, match="needs `uncond`"):
        sample_policy(policy, cond, sigmas=sig, cfg_scale=2.0)
    # ReFL: denoise k steps with gradients; the result depends on the weights
    x_k = sample_policy(policy, cond, sigmas=sig[:3], noise=noise)
    x_k.square().sum().backward()
    assert policy.model.weight.grad is not None and policy.model.weight.grad.abs().sum() > 0
