"""Each algorithm must move the policy the way its reward points, on a toy task with a known answer.

The judge pays for red inside the mask (tests/rl/toy_judges.py). A few steps of every trainer,
with the group filter on, must raise that reward on fixed conditions and noise; a sign error
(minimising the reward, a swapped reference, ...) lowers it or leaves it flat.
"""
import pytest
import torch
from toy_judges import RedJudge

import rl.train
from rl.algorithms.reward_scoring import judge_images
from rl.evaluation.heldout import generate_images, held_out_samples
from rl.plumbing.config import load_config
from rl.plumbing.distributed import init_distributed


def make_toy_trainer(quick, monkeypatch, judge, **overrides):
    monkeypatch.setattr(rl.train, "build_judge", lambda cfg, device: judge)
    torch.manual_seed(0)
    return rl.train.make_trainer(load_config(None, quick(**overrides)), init_distributed("cpu"))


def toy_reward(trainer, samples) -> float:
    images = generate_images(trainer.policy, samples, weights=None, sigmas=trainer.sigmas, method="dpm2",
                             seed=5, device=trainer.device)
    return float(judge_images(RedJudge(), samples, images).per_image.mean())


def train(trainer, steps: int) -> None:
    for step in range(steps):
        trainer.step_index = step
        trainer.train_step(step)


@pytest.mark.parametrize("algorithm, extra", [
    ("nft", {}),
    ("nft", {"nft.adaptive": False, "nft.shared_noise": False, "nft.time_sampling": "rollout"}),
    ("refl", {"refl.reference": "dynamic"}),
    ("refl", {"refl.reference": "static"}),
    ("grpo", {"sampler.method": "sde"}),
    ("grpo", {"sampler.method": "sde", "grpo.step_selection": "window", "grpo.sde_only_trained": False,
              "grpo.mini_batches": 2, "grpo.kl_coef": 0.04}),
    ("awm", {}),
    ("awm", {"awm.weighting": "uniform", "awm.kl_coef": 0.0, "awm.old_kl_coef": 0.0}),
])
def test_a_few_steps_raise_the_known_reward(quick, monkeypatch, algorithm, extra):
    overrides = {"train.algorithm": algorithm, "optim.lr": 3e-3, "nft.tau_mean": 0.9, "nft.tau_std": 0.05, **extra}
    if algorithm == "refl":
        overrides.update({"judge.mode": "pairwise", "refl.batch_size": 8})
    trainer = make_toy_trainer(quick, monkeypatch, RedJudge(), **overrides)
    samples = held_out_samples(trainer.data, trainer.data.tasks, 3)
    before = toy_reward(trainer, samples)
    train(trainer, 16)
    after = toy_reward(trainer, samples)
    # measured (test model: the trained toy VAE, a small random transformer): from 0.56, NFT's slowest
    # variant reached +0.08 in 12 steps, +0.1 in 16; ReFL more; a minimising trainer ends below where it began.
    # GRPO (from 0.57): +0.34 / +0.35 in 16 steps; AWM: +0.135 (ghuber, both KL terms) / +0.18 (uniform)
    assert after > before + 0.1, (before, after)
