"""Every setting that changes an update reaches it: each test checks the exact quantity the setting
should change (the kernel's arguments, the loss, the gradient, a weight copy), so a trainer that
ignores the setting fails here rather than training something else in silence."""
import pytest
import torch
from test_learning_direction import make_toy_trainer
from toy_judges import ConstantJudge, RedJudge

import kernels
import rl.algorithms.nft
import rl.algorithms.refl
from rl.algorithms.weight_copies import clone, ema_decay, old_policy_decay


def spy(monkeypatch, module, name):
    """Record every call's (args, kwargs) to module.name, calling the real function."""
    real = getattr(module, name)
    calls = []

    def wrapper(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls


def nft_trainer(quick, monkeypatch, judge=None, **overrides):
    return make_toy_trainer(quick, monkeypatch, judge or RedJudge(), **overrides)


@pytest.mark.parametrize("override, kernel, kwarg, value", [
    ({"nft.beta": 0.5}, "nft_loss", "beta", 0.5),
    ({"nft.adaptive": False}, "nft_loss", "adaptive", False),
    ({"nft.adaptive": True}, "nft_loss", "adaptive", True),
    ({"nft.kl_coef": 0.25}, "nft_loss", "kl_coef", 0.25),
    ({"nft.clip": 2.0}, "group_rewards", "clip", 2.0),
    ({"nft.std": "global"}, "group_rewards", "std", "global"),
    ({"nft.std_eps": 0.05}, "group_rewards", "eps", 0.05),
    ({"nft.tau_mean": 0.3, "nft.tau_std": 0.05}, "group_rewards", "tau_mean", 0.3),
    ({"nft.tau_mean": 0.9, "nft.tau_std": 0.2}, "group_rewards", "tau_std", 0.2),
    ({"nft.filter_rule": "strict", "nft.tau_mean": 0.9, "nft.tau_std": 0.01}, "group_rewards", "rule", "strict"),
])
def test_nft_settings_reach_the_kernels(quick, monkeypatch, override, kernel, kwarg, value):
    calls = spy(monkeypatch, rl.algorithms.nft.kernels, kernel)
    trainer = nft_trainer(quick, monkeypatch, **override)
    trainer.train_step(0)
    assert calls and all(kw[kwarg] == value for _, kw in calls)
    if kwarg == "kl_coef":  # the KL term needs the reference's velocity
        assert all(kw["v_ref"] is not None for _, kw in calls)


def test_the_filter_keep_decides_which_groups_teach(quick, monkeypatch):
    """Group 0 filtered out: its rewards, whatever they are, must not change the update."""
    real = kernels.group_rewards

    def run(r0_order, keep0):
        def designed(scores, **kw):
            out = real(scores, **kw)
            r = out.r.clone()
            r[0] = torch.tensor(r0_order, dtype=r.dtype)
            return out._replace(r=r, keep=torch.tensor([keep0, True]))

        monkeypatch.setattr(rl.algorithms.nft.kernels, "group_rewards", designed)
        trainer = nft_trainer(quick, monkeypatch)
        trainer.train_step(0)
        return {k: v.detach().clone() for k, v in trainer.params.items()}

    a, b = run([0.0, 1.0, 0.2, 0.8], False), run([1.0, 0.0, 0.8, 0.2], False)
    assert all(torch.equal(a[k], b[k]) for k in a)
    c, d = run([0.0, 1.0, 0.2, 0.8], True), run([1.0, 0.0, 0.8, 0.2], True)
    assert not all(torch.equal(c[k], d[k]) for k in c)  # kept, the same change is visible


def test_a_step_whose_groups_are_all_filtered_changes_nothing(quick, monkeypatch):
    trainer = nft_trainer(quick, monkeypatch, ConstantJudge(0.95), **{"nft.tau_mean": 0.9, "nft.tau_std": 0.05})
    before = {name: clone(getattr(trainer, name)) for name in ("params", "old", "ema")}
    metrics = trainer.train_step(0)
    assert metrics["skipped"] and metrics["kept_groups"] == 0.0 and not metrics["nonfinite"]
    for name, copy in before.items():
        assert all(torch.equal(getattr(trainer, name)[k], v) for k, v in copy.items()), name


@pytest.mark.parametrize("mask_loss", [True, False])
def test_mask_loss_trains_only_the_generated_region(quick, monkeypatch, mask_loss):
    calls = spy(monkeypatch, rl.algorithms.nft.kernels, "nft_loss")
    trainer = nft_trainer(quick, monkeypatch, **{"nft.mask_loss": mask_loss})
    masks = []
    real_index = type(trainer.encode(trainer.data.conditions(0, 0, 1))).index

    def keep_mask(self, idx):
        sub = real_index(self, idx)
        masks.append(sub.blend_mask)
        return sub

    monkeypatch.setattr(type(trainer.encode(trainer.data.conditions(0, 0, 1))), "index", keep_mask)
    trainer.train_step(0)
    v_theta, mask = calls[0][0][0], masks[-1]
    outside = (v_theta * (1 - mask.to(v_theta.dtype))).abs().sum()
    assert (outside == 0) if mask_loss else (outside > 0)


@pytest.mark.parametrize("shared", [True, False])
def test_shared_noise_shares_times_within_a_group(quick, monkeypatch, shared):
    calls = spy(monkeypatch, rl.algorithms.nft.kernels, "nft_loss")
    trainer = nft_trainer(quick, monkeypatch, **{"nft.shared_noise": shared})
    trainer.train_step(0)
    t = calls[0][0][4].view(2, 4)  # 2 groups of 4 images
    same = bool((t == t[:, :1]).all())
    assert same == shared


@pytest.mark.parametrize("sampling", ["rollout", "uniform"])
def test_time_sampling_decides_the_training_times(quick, monkeypatch, sampling):
    calls = spy(monkeypatch, rl.algorithms.nft.kernels, "nft_loss")
    trainer = nft_trainer(quick, monkeypatch, **{"nft.time_sampling": sampling, "nft.timestep_fraction": 0.5})
    trainer.train_step(0)
    assert len(calls) == 2  # half of the 4 rollout steps
    times = torch.cat([args[4] for args, _ in calls])
    on_grid = torch.isclose(times[:, None], trainer.sigmas[None, :-1]).any(1)
    assert bool(on_grid.all()) == (sampling == "rollout")


def test_micro_batches_split_the_forward_and_keep_the_gradient(quick, monkeypatch):
    calls = spy(monkeypatch, rl.algorithms.nft.kernels, "nft_loss")
    whole = nft_trainer(quick, monkeypatch)
    whole.train_step(0)
    n_whole = len(calls)
    calls.clear()
    split = nft_trainer(quick, monkeypatch, **{"optim.micro_batch": 3})
    split.train_step(0)
    assert [args[0].shape[0] for args, _ in calls] == [3, 3, 2] * n_whole
    for k in whole.params:
        torch.testing.assert_close(split.params[k], whole.params[k], rtol=1e-4, atol=1e-6)


def test_the_sampling_policy_and_the_ema_follow_their_schedules(quick, monkeypatch):
    generated = spy(monkeypatch, rl.algorithms.nft.NFTTrainer, "generate")
    trainer = nft_trainer(quick, monkeypatch, **{"nft.old_decay_rate": 0.05, "nft.old_decay_max": 0.3,
                                                 "train.ema_max_decay": 0.5})
    with torch.no_grad():  # make the copies distinct so that each mix is visible
        for copy, shift in ((trainer.old, 0.01), (trainer.ema, -0.01)):
            for v in copy.values():
                v.add_(shift)
    step = 5
    trainer.step_index = step
    old0, ema0 = clone(trainer.old), clone(trainer.ema)
    trainer.train_step(step)
    assert generated[0][0][3] is trainer.old  # the rollout uses the sampling policy
    d_old, d_ema = old_policy_decay(step, 0.05, 0.3), ema_decay(step, 0.5)
    # both below their caps, so a copy that ignores its schedule (or uses the cap) is caught
    assert (d_old, d_ema) == (pytest.approx(0.25), pytest.approx(0.4))
    for k, p in trainer.params.items():
        torch.testing.assert_close(trainer.old[k], d_old * old0[k] + (1 - d_old) * p.detach())
        torch.testing.assert_close(trainer.ema[k], d_ema * ema0[k] + (1 - d_ema) * p.detach())


@pytest.mark.parametrize("reference", ["static", "dynamic"])
def test_refl_compares_against_the_configured_reference(quick, monkeypatch, reference):
    generated = spy(monkeypatch, rl.algorithms.refl.ReFLTrainer, "generate")
    trainer = nft_trainer(quick, monkeypatch, **{"train.algorithm": "refl", "judge.mode": "pairwise",
                                                 "refl.batch_size": 4, "refl.reference": reference})
    trainer.train_step(0)
    weights = generated[0][0][3]
    assert weights is (trainer.ema if reference == "dynamic" else trainer.ref)
    assert trainer.ema is not trainer.ref


@pytest.mark.parametrize("bound", [0.05, 0.9])
def test_refl_loss_is_the_bounded_shortfall(quick, monkeypatch, bound):
    calls = spy(monkeypatch, rl.algorithms.refl, "judge_images")
    trainer = nft_trainer(quick, monkeypatch, **{"train.algorithm": "refl", "judge.mode": "pairwise",
                                                 "refl.batch_size": 4, "refl.reward_upper_bound": bound})
    metrics = trainer.train_step(0)
    (judge, samples, images), kwargs = calls[-1]
    assert kwargs["mode"] == "pairwise" and kwargs["others"] is not None
    from rl.algorithms.reward_scoring import judge_images

    reward = judge_images(judge, samples, images.detach(), mode="pairwise", others=kwargs["others"]).per_image
    assert float(reward.min()) > 0.05  # P(better) starts near 1/2
    assert metrics["loss"] == pytest.approx(float(torch.relu(bound - reward).mean()), rel=1e-5, abs=1e-7)
    assert (metrics["grad_norm"] == 0.0) == (bound == 0.05)  # nothing to push beyond the bound


def test_gradient_clipping_bounds_the_applied_gradient(quick, monkeypatch):
    trainer = nft_trainer(quick, monkeypatch, **{"optim.grad_clip": 1e-4})
    seen = []
    real_step = trainer.optimizer.step

    def record(*a, **k):
        seen.append(float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in trainer.params.values()
                                                                 if p.grad is not None]))))
        return real_step(*a, **k)

    trainer.optimizer.step = record
    metrics = trainer.train_step(0)
    assert metrics["grad_norm"] > 1e-4  # the norm before clipping
    assert seen and seen[0] <= 1e-4 * (1 + 1e-3)
