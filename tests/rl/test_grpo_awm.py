"""Flow-GRPO and AWM: the pieces with a known right answer (log-probabilities, ratios, step and time
selection, the AWM loss, config checks). Learning, resume and DDP are in test_learning_direction.py,
test_train.py and test_distributed.py with the other algorithms."""
import math

import pytest
import torch

import kernels
import rl.algorithms.grpo
import rl.train
from core.config.loading import ConfigError
from core.sampling.samplers import sample, sde_step_moments
from rl.algorithms.awm import awm_loss, awm_times
from rl.algorithms.grpo import GRPOTrainer
from rl.algorithms.sde_rollout import sde_rollout, stochastic_steps, trained_steps
from rl.plumbing.config import load_config
from rl.plumbing.distributed import init_distributed


def grpo_trainer(quick, **extra):
    torch.manual_seed(0)
    cfg = load_config(None, quick(**{"train.algorithm": "grpo", "sampler.method": "sde", **extra}))
    return rl.train.make_trainer(cfg, init_distributed("cpu"))


def test_rollout_log_probs_are_the_gaussian_of_each_sampled_step(quick):
    """The recorded log-probability of each trained step is, per image, the mean over the generated
    latents of torch.distributions.Normal(mean_x x_t + mean_v v(x_t), std).log_prob(x_next), with the
    sampling policy's velocity; and the sampler's step really is that Gaussian there (standardised
    residuals of unit variance), while the known region is the re-noised source."""
    trainer = grpo_trainer(quick, **{"grpo.trained_steps": 3, "grpo.sde_only_trained": False})
    batch = trainer.rollout(0)
    traj, cond = batch.traj, batch.cond
    times = trainer.sigmas.tolist()
    assert traj.steps == [0, 1, 2] and traj.logp.shape == (8, 3)
    m = cond.blend_mask.expand_as(traj.x_t[0]).reshape(8, -1)
    assert 0 < float(m.mean()) < 1  # both regions are present
    for j, k in enumerate(traj.steps):
        x, x_next = traj.x_t[j], traj.x_next[j]
        with torch.no_grad():
            v = trainer.policy.velocity(x, torch.full((8,), times[k]), cond)
        mean_x, mean_v, std = sde_step_moments(times[k], times[k + 1], trainer.cfg.sampler.noise_level)
        mean = mean_x * x + mean_v * v
        density = torch.distributions.Normal(mean, std).log_prob(x_next).reshape(8, -1)
        want = (m * density).sum(1) / m.sum(1)
        torch.testing.assert_close(traj.logp[:, j], want, rtol=1e-5, atol=1e-5)
        z = ((x_next - mean) / std).reshape(8, -1)[m > 0]
        assert abs(float(z.std()) - 1) < 0.05 and abs(float(z.mean())) < 0.05
        renoised = (1 - times[k + 1]) * cond.x0_known + times[k + 1] * batch.traj.x_t[0] if k == 0 else None
        if renoised is not None:  # at the first step x_t is the starting noise itself
            known = (m == 0).reshape(x_next.shape)
            torch.testing.assert_close(x_next[known], renoised[known], rtol=1e-5, atol=1e-5)


def test_the_ratio_is_exactly_one_at_the_sampling_policy(quick, monkeypatch):
    """First mini-batch (no optimiser step since the rollout): the trained policy's log-probability of
    each recorded step equals the rollout's bit for bit, so the ratio to the sampling policy is exactly
    1 (and the loss runs on-policy); after the first optimiser step the second mini-batch's ratio moves."""
    calls, rollouts = [], []
    real_loss, real_rollout = kernels.grpo_loss, GRPOTrainer.rollout

    def recording_loss(*args, **kw):
        out = real_loss(*args, **kw)
        calls.append((args[4], out[1].detach().clone(), kw["kl_coef"]))
        return out

    def recording_rollout(self, step):
        rollouts.append(real_rollout(self, step))
        return rollouts[-1]

    monkeypatch.setattr(rl.algorithms.grpo.kernels, "grpo_loss", recording_loss)
    monkeypatch.setattr(GRPOTrainer, "rollout", recording_rollout)
    trainer = grpo_trainer(quick, **{"grpo.mini_batches": 2, "optim.lr": 1e-3, "grpo.kl_coef": 0.04})
    metrics = trainer.train_step(0)
    traj = rollouts[0].traj
    assert len(calls) == 2 * len(traj.steps)  # 2 mini-batches x trained steps (one chunk each)
    first, second = calls[:len(traj.steps)], calls[len(traj.steps):]
    times = trainer.sigmas.tolist()
    for j, (logp_old, logp, kl_coef) in enumerate(first):
        assert logp_old is None
        assert torch.equal(torch.exp(logp - traj.logp[0::2, j]), torch.ones(4))
        # Flow-GRPO's KL, mean (mu - mu_ref)^2 / (2 sigma_t^2): the step KL times the step length
        k = traj.steps[j]
        assert kl_coef == pytest.approx(0.04 * (times[k] - times[k + 1]))
    for j, (logp_old, logp, _) in enumerate(second):
        assert torch.equal(logp_old, traj.logp[1::2, j])
        assert not torch.equal(torch.exp(logp - logp_old), torch.ones(4))
    assert metrics["logp_drift"] == 0.0 and metrics["ratio_max_dev"] > 0 and metrics["kl"] > 0


def test_noise_only_at_the_trained_steps(quick):
    """sde_only_trained: the steps before the trained one are ODE (Euler) steps, so the state the
    trained step starts from does not depend on the SDE noise; without it, it does."""
    trainer = grpo_trainer(quick)
    mine, _, cond, noise = trainer.group_conditions(0)
    starts = {}
    for only in (True, False):
        for seed in (1, 2):
            traj = sde_rollout(trainer.policy, cond, noise, trainer.sigmas, noise_level=0.7, steps=[2],
                               sde_only_trained=only, generator=torch.Generator().manual_seed(seed))
            starts[only, seed] = traj.x_t[0]
    assert torch.equal(starts[True, 1], starts[True, 2])
    assert not torch.allclose(starts[False, 1], starts[False, 2])


def test_trained_steps_random_and_window():
    sigmas = torch.tensor([1.0, 0.8, 0.6, 0.4, 0.2, 0.0])
    assert stochastic_steps(sigmas) == [0, 1, 2, 3]  # the step to t = 0 is deterministic
    draws = {tuple(trained_steps(sigmas, 2, "random", s, 0, torch.Generator().manual_seed(s))) for s in range(40)}
    assert all(len(d) == 2 and list(d) == sorted(set(d)) and set(d) <= {0, 1, 2, 3} for d in draws)
    assert len(draws) == 6  # every pair of the four steps comes up
    window = [trained_steps(sigmas, 2, "window", s, 3, torch.Generator()) for s in range(12)]
    assert window[0] == window[2] == [0, 1] and window[3] == [1, 2] and window[6] == window[11] == [2, 3]
    assert trained_steps(sigmas, 9, "window", 0, 0, torch.Generator()) == [0, 1, 2, 3]


def test_per_step_noise_levels_make_euler_steps_and_draw_no_noise():
    """noise_level per step: 0 is an Euler step (the generator is not drawn from there), so a rollout
    with noise only at step 1 equals Euler, then the same stochastic step as a run noisy from step 1."""
    def velocity(x, t):
        return -x * t[:, None]

    sigmas = torch.tensor([1.0, 0.7, 0.4, 0.0])
    z = torch.randn(3, 5, generator=torch.Generator().manual_seed(1))
    _, mixed = sample(velocity, z, sigmas, method="sde", noise_level=[0.0, 0.7, 0.0],
                      generator=torch.Generator().manual_seed(2), return_trajectory=True)
    _, euler = sample(velocity, z, sigmas, method="euler", return_trajectory=True)
    assert torch.equal(mixed[1], euler[1])
    _, late = sample(velocity, mixed[1], sigmas[1:], method="sde", noise_level=[0.7, 0.0],
                     generator=torch.Generator().manual_seed(2), return_trajectory=True)
    assert torch.equal(mixed[2], late[1])
    with pytest.raises(ValueError, match="per-step levels for 3 steps"):
        sample(velocity, z, sigmas, method="sde", noise_level=[0.7, 0.7])


def test_sde_step_moments_are_flow_grpos_step():
    t, tn, a = 0.6, 0.45, 0.7
    sig = a * math.sqrt(t / (1 - t))
    mean_x, mean_v, std = sde_step_moments(t, tn, a)
    x, v = 0.3, -1.2
    eps_hat = x + (1 - t) * v
    assert math.isclose(mean_x * x + mean_v * v, x + (tn - t) * (v + sig**2 / (2 * t) * eps_hat), rel_tol=1e-12)
    assert math.isclose(std, sig * math.sqrt(t - tn))
    assert sde_step_moments(1.0, 0.9, a)[2] == pytest.approx(a * math.sqrt(1 / 0.1) * math.sqrt(0.1))
    assert sde_step_moments(0.3, 0.0, a) == (1.0, -0.3, 0.0)  # the last step: x0_hat, no noise


def test_awm_times_are_stratified_rollout_times_without_t_1():
    sigmas = torch.linspace(1, 0, 15)  # 14 steps, AWM's setting: fraction 0.9 -> indices 1 .. 11
    times = awm_times(sigmas, 500, 6, 0.9, torch.Generator().manual_seed(0))
    idx = torch.round((1 - times) * 14).long()
    assert times.shape == (500, 6) and int(idx.min()) == 1 and int(idx.max()) == 11
    bounds = torch.linspace(1, 12, 7).floor().long()
    for j in range(6):
        assert bool(((idx[:, j] >= bounds[j]) & (idx[:, j] < bounds[j + 1])).all())


def test_awm_loss_is_the_advantage_weighted_flow_matching_loss_on_the_generated_region():
    g = torch.Generator().manual_seed(0)
    v, target, ref = (torch.randn(3, 6, 2, generator=g) for _ in range(3))
    mask = torch.tensor([[1.0] * 3 + [0.0] * 3] * 3)[:, :, None]
    adv, t = torch.tensor([1.0, -0.5, 0.0]), torch.tensor([0.9, 0.5, 0.2])
    mse = ((v - target)[:, :3] ** 2).mean((1, 2))
    uniform = awm_loss(v, target, adv, t, mask, weighting="uniform", power=0.25)
    torch.testing.assert_close(uniform, adv * mse)
    ghuber = awm_loss(v, target, adv, t, mask, weighting="ghuber", power=0.25, v_ref=ref, kl_coef=0.1)
    want = adv * t * ((mse + 1e-10) ** 0.25 - 1e-10**0.25) / 0.25 + 0.1 * ((v - ref)[:, :3] ** 2).mean((1, 2))
    torch.testing.assert_close(ghuber, want)
    moved = v.clone()
    moved[:, 3:] += 5  # outside the mask: no effect
    assert torch.equal(awm_loss(moved, target, adv, t, mask, weighting="uniform", power=0.25), uniform)
    # a positive advantage pulls v_theta toward the flow-matching target, a negative one pushes it away
    vv = v.clone().requires_grad_()
    awm_loss(vv, target, adv, t, mask, weighting="ghuber", power=0.25).sum().backward()
    step = -(vv.grad * (v - target))[:, :3].sum((1, 2))
    assert step[0] < 0 < step[1] and step[2] == 0


@pytest.mark.parametrize("overrides, message", [
    ({"train.algorithm": "grpo"}, "set sampler.method=sde"),
    ({"train.algorithm": "grpo", "sampler.method": "sde", "sampler.noise_level": 0.0}, "noise_level > 0"),
    ({"train.algorithm": "grpo", "sampler.method": "sde", "grpo.trained_steps": 8}, "must be < sampler.steps"),
    ({"train.algorithm": "grpo", "sampler.method": "sde", "grpo.mini_batches": 5}, "must divide the step's images"),
    ({"train.algorithm": "awm", "awm.train_times": 7}, "awm.train_times"),
    ({"train.algorithm": "awm", "awm.ghuber_power": 0.0}, "awm.ghuber_power"),
    ({"train.algorithm": "grpo", "sampler.method": "sde", "grpo.clip_range": 1.0}, "grpo.clip_range"),
])
def test_bad_grpo_and_awm_settings_are_named(overrides, message):
    overrides = {"judge.mode": "score", **overrides}  # the default job's mode is ReFL's pairwise
    with pytest.raises(ConfigError, match=message):
        load_config(None, [f"{k}={v}" for k, v in overrides.items()])
