"""nft.shared_noise: the images of a group are trained at the same timesteps with the same noise."""
import pytest
import torch

from rl.plumbing.config import load_config
from rl.plumbing.distributed import DistContext
from rl.train import make_trainer


def _training_inputs(cfg, trainer=None):
    """(x0, [(t, x_t)] per training pass) of one NFT step, read off the trained policy's calls."""
    trainer = trainer or make_trainer(cfg, DistContext())
    seen, rollouts = [], []
    trained = trainer.trained_velocity
    generate = trainer.generate

    def spy_velocity(x_t, t, cond):
        seen.append((t.detach().clone(), x_t.detach().clone()))
        return trained(x_t, t, cond)

    def spy_generate(*args, **kwargs):
        x0 = generate(*args, **kwargs)
        rollouts.append(x0.detach().clone())
        return x0

    trainer.trained_velocity, trainer.generate = spy_velocity, spy_generate
    trainer.train_step(0)
    return rollouts[0], seen


@pytest.mark.parametrize("shared", [True, False])
def test_group_members_share_timesteps_and_noise_only_when_asked(quick, shared):
    cfg = load_config(None, quick(**{"nft.shared_noise": shared, "nft.timestep_fraction": 0.5}))
    G = cfg.nft.group_size
    x0, passes = _training_inputs(cfg)
    assert len(passes) == 2  # 2 of the 4 rollout times, the whole batch per pass
    for t, x_t in passes:
        tb = t.view(-1, *([1] * (x0.dim() - 1)))
        eps = (x_t - (1 - tb) * x0) / tb
        t_groups, eps_groups = t.view(-1, G), eps.view(-1, G, *eps.shape[1:])
        same_t = bool((t_groups == t_groups[:, :1]).all())
        same_eps = torch.allclose(eps_groups, eps_groups[:, :1].expand_as(eps_groups), atol=1e-4)
        assert same_eps == shared
        if shared:
            assert same_t
            # ... but groups differ from each other
            assert not torch.allclose(eps_groups[0, 0], eps_groups[1, 0], atol=1e-2)


def test_on_policy_shortcut_gives_the_full_gradient(quick):
    """old_decay_rate 0 reuses the trained velocity as the old one; a rate that still gives d = 0 at
    step 0 runs the old policy's own forward pass. Same first gradient either way."""
    grads = []
    for rate in (0.0, 1e-9):
        cfg = load_config(None, quick(**{"nft.old_decay_rate": rate, "nft.shared_noise": True}))
        trainer = make_trainer(cfg, DistContext())
        step = trainer.optimizer_step

        def spy(step=step, trainer=trainer):
            grads.append({k: p.grad.detach().clone() for k, p in trainer.params.items()})
            return step()

        trainer.optimizer_step = spy
        trainer.train_step(0)
    assert sum(float(g.abs().sum()) for g in grads[0].values()) > 0
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("sampling", ["rollout", "uniform"])
def test_training_times_come_from_the_chosen_distribution(quick, sampling):
    cfg = load_config(None, quick(**{"nft.time_sampling": sampling, "nft.timestep_fraction": 0.5,
                                     "nft.groups_per_step": 8}))
    trainer = make_trainer(cfg, DistContext())
    _, passes = _training_inputs(cfg, trainer)
    times = torch.stack([t for t, _ in passes], 1)  # [images, passes]
    grid = trainer.sigmas[:-1]
    on_grid = (times[..., None] - grid).abs().min(-1).values < 1e-6
    if sampling == "rollout":
        assert bool(on_grid.all())
        assert bool((times[:, 0] != times[:, 1]).all())  # distinct rollout steps per image
    else:
        assert not bool(on_grid.any())
        assert bool(((times > 0) & (times < 1)).all())
        # stratified: each image has one time in [0, 1/2) and one in [1/2, 1)
        assert bool(((times < 0.5).sum(1) == 1).all())
