"""The frame the group-advantage algorithms share (GRPO, AWM): a step is rollout -> score -> rewards -> update.

Like DiffusionNFT (rl/algorithms/nft.py), a step draws K conditions, makes G images of each (a group)
and has the judge score every image on every dimension of its task (NFT's `score`, reused). The
groups and their advantages come from nft's group keys (group_size, groups_per_step, std, clip,
std_eps, tau_mean / tau_std, filter_rule) through `kernels.group_rewards`: A = clip((s - mean_g) /
(std + eps), -c, c), and a group the filter drops weighs 0 in the update. Each process holds its
contiguous share of the step's images (`ctx.share`); scores are gathered so groups are whole.
Subclasses make the rollout (their own sampler, in chunks through `Trainer.judged_rollout`, so that
judge.overlap scores a chunk while the next is generated) and the update (their own loss).
"""
from __future__ import annotations

import abc
import dataclasses
from typing import Any

import torch

import kernels
from core.policies.policy import Condition
from rl.algorithms.nft import NFTTrainer
from rl.algorithms.trainer import Trainer, timed

# streams of the per-step generators shared by the group algorithms (rl/algorithms/trainer.py)
ROLLOUT_NOISE, TIMESTEPS, TRAIN_NOISE, SDE, STEPS = 1, 2, 3, 4, 5


@dataclasses.dataclass
class GroupAdvantages:
    """The group advantages of a step: for the local images, and which images of the whole step count."""

    advantage: torch.Tensor           # [n] clipped at nft.clip
    keep: torch.Tensor                # [n] 1.0 where the image's group survived the filter
    keep_all: torch.Tensor            # [N] the same for every image of the step (all processes)
    kept_total: float                 # kept images over the whole step


class GroupTrainer(Trainer):
    """Rollout -> score -> rewards -> update, the first and last made by the subclass."""

    score = NFTTrainer.score  # every image on every dimension of its task; the dimension means of the step

    def train_step(self, step: int) -> dict[str, Any]:
        nft = self.cfg.nft
        metrics: dict[str, Any] = {"images": nft.groups_per_step * nft.group_size}
        with timed(metrics, "time_rollout"):
            batch = self.rollout(step)
        with timed(metrics, "time_judge"):
            scores = self.score(batch, metrics)
            advantages = self.rewards(scores, metrics)
        with timed(metrics, "time_update"):
            self.update(batch, advantages, metrics)
        return metrics

    def group_conditions(self, step: int) -> tuple[slice, list, Condition, torch.Tensor]:
        """(this process's share of the K x G images, their samples, conditions and starting noise)."""
        nft = self.cfg.nft
        K, G = nft.groups_per_step, nft.group_size
        N = K * G
        mine = self.ctx.share(N)
        samples = self.data.conditions(self.cfg.train.seed, step, K)
        cond = self.encode(samples).repeat_interleave(G).index(mine)
        group_samples = [samples[i // G] for i in range(N)][mine]
        noise = self.draw_noise(step, ROLLOUT_NOISE, (N, *cond.x0_known.shape[1:]))[mine]
        return mine, group_samples, cond, noise

    def rewards(self, scores: torch.Tensor, metrics: dict[str, Any]) -> GroupAdvantages:
        """Group-normalised, clipped advantages and the low-std group filter (kernels.group_rewards)."""
        nft = self.cfg.nft
        K, G = nft.groups_per_step, nft.group_size
        mine = self.ctx.share(K * G)
        groups = kernels.group_rewards(
            scores.view(K, G), std=nft.std, clip=nft.clip, eps=nft.std_eps, tau_mean=nft.tau_mean,
            tau_std=nft.tau_std, rule=nft.filter_rule)
        keep_all = groups.keep.repeat_interleave(G).float()
        metrics.update(kept_groups=float(groups.keep.float().mean()),
                       zero_std_groups=float((groups.std < 1e-6).float().mean()))
        return GroupAdvantages(groups.advantage.reshape(K * G)[mine].float(), keep_all[mine], keep_all,
                               float(keep_all.sum()))

    @abc.abstractmethod
    def rollout(self, step: int):
        """The step's images (a dataclass with at least `samples` and decoded `images`)."""

    @abc.abstractmethod
    def update(self, batch, advantages: GroupAdvantages, metrics: dict[str, Any]) -> None:
        """The algorithm's loss, the optimiser step(s), the copies; metrics loss, grad_norm, skipped, nonfinite."""
