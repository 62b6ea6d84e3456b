"""DiffusionNFT with group filtering (Edit-R1 / UniWorld-V2).

One step:
1. K conditions, each repeated G times (a group); the sampling ("old") policy generates every image
   with the fast black-box sampler, blending the known region each step; only x0 is kept. The images
   are made in chunks of sampler.rollout_chunk, each handed to the judge when it is made (with
   judge.overlap scored in a background thread while the next is generated: the same step,
   rl/algorithms/judge_pipeline.py).
2. The judge scores each image on every dimension of its task; the dimension mean is the score.
   Scores are gathered from all processes and `kernels.group_rewards` turns each group into
   rewards r in [0, 1] (normalised, clipped) and drops low-spread, high-mean groups.
3. Training: per image, n = `timestep_fraction` x (rollout steps) times, fresh noise each,
   x_t = (1 - t) x0 + t eps; the times are n distinct rollout step times (DiffusionNFT's,
   time_sampling="rollout") or one uniform time in each of n equal bins of (0, 1) ("uniform": with
   FLUX's shifted schedules the rollout grid is crowded at high noise, and the tiny default gained on
   fill from also training the low-noise end); the old policy (and, for the KL term, the reference) give
   velocities without gradients, the trained policy with; `kernels.nft_loss` mixes them by r.
   The loss is a weighted mean over kept images (and over timesteps) of the whole step.
   With `shared_noise` the G images of a group share their timesteps and eps (common random
   numbers): the gradient on the output is sum_i (2 r_i - 1)(v_old_i - eps + x0_i), and the
   (2 r_i - 1) of a group sum to zero when no advantage is clipped (nft.clip=5), so the shared eps
   cancels instead of adding noise; each image's loss keeps its expectation.
4. The old policy follows the trained one by a soft update, and the evaluation EMA is updated.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

import kernels
from core.policies.policy import Condition
from rl.algorithms.judge_pipeline import ChunkJudging
from rl.algorithms.trainer import Trainer, step_generator, timed
from rl.algorithms.weight_copies import always_on_policy, lerp_, old_policy_decay

# streams of the per-step generators
_ROLLOUT_NOISE, _TIMESTEPS, _TRAIN_NOISE, _SDE = 1, 2, 3, 4
# uniform training times start here: at t = 0, x_t is the sample itself and carries no reward signal
_T_MIN = 1e-3


def training_times(sigmas: torch.Tensor, n_draws: int, n_train: int, sampling: str,
                   gen: torch.Generator) -> torch.Tensor:
    """[n_draws, n_train] training times: distinct rollout step times ("rollout"), or one uniform
    time in each of n_train equal bins of (_T_MIN, 1), in random order over the passes ("uniform").
    The rollout draw is made in both modes so that each mode's stream stays as it was measured."""
    n_times = len(sigmas) - 1
    order = torch.stack([torch.randperm(n_times, generator=gen)[:n_train] for _ in range(n_draws)])
    if sampling == "rollout":
        return sigmas[order]
    bins = torch.stack([torch.randperm(n_train, generator=gen) for _ in range(n_draws)])
    return (bins + torch.rand(n_draws, n_train, generator=gen)) / n_train * (1 - _T_MIN) + _T_MIN


@dataclasses.dataclass
class Rollout:
    """What one step's rollout made, for this process's share of the step's images."""

    step: int
    mine: slice                       # this process's images among the step's K x G
    samples: list                     # the condition of each local image
    cond: Condition
    x0: torch.Tensor                  # packed final latents
    images: torch.Tensor              # decoded [n, 3, H, W]
    judging: ChunkJudging             # the judge's work on the images (`score` takes its result)


@dataclasses.dataclass
class Rewards:
    """The group rewards of a step: r and keep for the local images, and the step-wide facts."""

    r: torch.Tensor                   # [n] in [0, 1]
    keep: torch.Tensor                # [n] 1.0 where the image's group survived the filter
    kept_total: float                 # kept images over the whole step (all processes)


class NFTTrainer(Trainer):
    """DiffusionNFT: a step is rollout -> score -> rewards -> update, one method each."""

    def train_step(self, step: int) -> dict[str, Any]:
        metrics: dict[str, Any] = {"images": self.cfg.nft.groups_per_step * self.cfg.nft.group_size}
        with timed(metrics, "time_rollout"):
            batch = self.rollout(step)
        with timed(metrics, "time_judge"):
            scores = self.score(batch, metrics)
            rewards = self.rewards(scores, metrics)
        with timed(metrics, "time_update"):
            self.update(batch, rewards, metrics)
        return metrics

    def rollout(self, step: int) -> Rollout:
        """K conditions, G images each, from the sampling ("old") policy, in chunks of
        sampler.rollout_chunk handed to the judge as they are made; only x0 is kept."""
        cfg, nft = self.cfg, self.cfg.nft
        K, G = nft.groups_per_step, nft.group_size
        N = K * G
        mine = self.ctx.share(N)
        seed = cfg.train.seed
        samples = self.data.conditions(seed, step, K)
        cond = self.encode(samples).repeat_interleave(G).index(mine)
        group_samples = [samples[i // G] for i in range(N)][mine]
        shape = (N, *cond.x0_known.shape[1:])
        noise = self.draw_noise(step, _ROLLOUT_NOISE, shape)[mine]

        def make(c: slice) -> tuple[torch.Tensor, torch.Tensor]:
            sub = cond.index(c)
            x0 = self.generate(sub, noise[c], self.old, sde_noise=self.chunk_sde_noise(step, _SDE, noise, c))
            with torch.no_grad():
                return x0, self.policy.decode(x0, sub)

        pieces, judging = self.judged_rollout(step, group_samples, noise.shape[0], make)
        x0, images = (torch.cat([p[i] for p in pieces]) for i in (0, 1))
        return Rollout(step, mine, group_samples, cond, x0, images, judging)

    def score(self, batch: Rollout, metrics: dict[str, Any]) -> torch.Tensor:
        """Every image on every dimension of its task (the judge's result for the rollout's chunks);
        the dimension means of the whole step."""
        table, floored, busy = batch.judging.result()
        scores = self.ctx.all_gather_cat(table.per_image.detach().float().to(self.device))
        metrics.update(reward=float(scores.mean()), reward_std=float(scores.std()),
                       reward_by_task=table.by_task(), reward_by_task_dim=table.by_task_dimension())
        # served judges: the share of labels missing from the top-k logprobs (floored) in this step
        metrics["judge_floored_share"] = floored
        # seconds the judge worked on this step's chunks (with judge.overlap, partly inside time_rollout)
        metrics["judge_busy_s"] = busy
        return scores

    def rewards(self, scores: torch.Tensor, metrics: dict[str, Any]) -> Rewards:
        """Group-normalised rewards in [0, 1] and the low-std group filter (kernels.group_rewards)."""
        nft = self.cfg.nft
        K, G = nft.groups_per_step, nft.group_size
        N = K * G
        mine = self.ctx.share(N)
        groups = kernels.group_rewards(
            scores.view(K, G), std=nft.std, clip=nft.clip, eps=nft.std_eps, tau_mean=nft.tau_mean,
            tau_std=nft.tau_std, rule=nft.filter_rule)
        r = groups.r.reshape(N)[mine].float()
        keep = groups.keep.repeat_interleave(G)[mine].float()
        metrics.update(kept_groups=float(groups.keep.float().mean()),
                       zero_std_groups=float((groups.std < 1e-6).float().mean()))
        return Rewards(r, keep, float(groups.keep.float().sum()) * G)

    def update(self, batch: Rollout, rewards: Rewards, metrics: dict[str, Any]) -> None:
        """The NFT loss over sampled training times, one optimiser step, then the copies follow."""
        cfg, nft, ctx = self.cfg, self.cfg.nft, self.ctx
        K, G = nft.groups_per_step, nft.group_size
        N = K * G
        step, mine, seed = batch.step, batch.mine, cfg.train.seed
        x0, cond, r, keep, kept_total = batch.x0, batch.cond, rewards.r, rewards.keep, rewards.kept_total
        shape = (N, *x0.shape[1:])
        n_train = max(1, round(nft.timestep_fraction * (len(self.sigmas) - 1)))
        gen = step_generator(seed, step, _TIMESTEPS)
        # shared_noise: one draw of timesteps and noise per group, used by all its G images
        n_draws, rep = (K, G) if nft.shared_noise else (N, 1)
        times = training_times(self.sigmas, n_draws, n_train, nft.time_sampling, gen)
        times = times.repeat_interleave(rep, 0)[mine].to(self.device)
        train_noise = self.draw_noise(step, _TRAIN_NOISE, (n_train, n_draws, *shape[1:]))
        train_noise = train_noise.repeat_interleave(rep, 1)[:, mine]
        n_local = x0.shape[0]
        micro = cfg.optim.micro_batch or n_local
        chunks = [slice(i, min(i + micro, n_local)) for i in range(0, n_local, micro)]
        loss_sum, dev_sum, kl_sum = 0.0, 0.0, 0.0
        if kept_total > 0:
            # every (timestep, image) term has the same weight in the step's mean; DDP averages
            # gradients over processes, hence the world-size factor
            scale = ctx.world_size / (kept_total * n_train)
            passes = [(j, c) for j in range(n_train) for c in chunks]
            # on-policy, the old velocity is the trained one, detached (the weights only change at
            # the optimiser step after all passes): one forward pass saved per training pass
            on_policy = always_on_policy(nft.old_decay_rate, nft.old_decay_max)
            nonfinite = False
            for p, (j, c) in enumerate(passes):
                t = times[c, j]
                eps = train_noise[j, c]
                tb = t.view(-1, *([1] * (x0.dim() - 1)))
                x_t = (1 - tb) * x0[c] + tb * eps
                v_target = eps - x0[c]
                sub = cond.index(c)
                with torch.no_grad():
                    v_old = None if on_policy else self.policy.velocity(x_t, t, sub, weights=self.old)
                    v_ref = self.policy.velocity(x_t, t, sub, weights=self.ref) if nft.kl_coef > 0 else None
                v_theta = self.trained_velocity(x_t, t, sub)
                if on_policy:
                    v_old = v_theta.detach()
                if not self._all_finite(v_theta):  # a diverged policy: skip the step, do not crash
                    nonfinite = True
                    break
                if nft.mask_loss:  # only the generated region carries the reward's signal
                    m = sub.blend_mask.to(v_theta.dtype)
                    v_theta, v_old, v_target = v_theta * m, v_old * m, v_target * m
                    v_ref = None if v_ref is None else v_ref * m
                per_sample = kernels.nft_loss(
                    v_theta, v_old, v_target, r[c], t, beta=nft.beta, adaptive=nft.adaptive,
                    v_ref=v_ref, kl_coef=nft.kl_coef, reduction="none")
                loss = (per_sample * keep[c]).sum() * scale
                with self.backward_context(last=p == len(passes) - 1):
                    loss.backward()
                loss_sum += float(loss.detach()) / ctx.world_size
                with torch.no_grad():
                    dev_sum += float(((v_theta - v_old) ** 2).mean()) / len(passes)
                    if v_ref is not None:
                        kl_sum += float(((v_theta - v_ref) ** 2).mean()) / len(passes)
            if nonfinite:
                self.optimizer.zero_grad(set_to_none=True)
                grad_norm, applied = float("nan"), False
            else:
                grad_norm, applied = self.optimizer_step()
        else:  # every group filtered out: nothing to learn from this step
            grad_norm, applied = 0.0, False
            self.optimizer.zero_grad(set_to_none=True)
        loss_sum = float(ctx.all_reduce_sum(torch.tensor(loss_sum, device=self.device)))

        # the copies follow
        if applied:
            lerp_(self.old, self.params, old_policy_decay(step, nft.old_decay_rate, nft.old_decay_max))
            self.update_ema(step)
        metrics.update(loss=loss_sum, grad_norm=grad_norm, deviation_from_old=dev_sum,
                       kl=kl_sum if nft.kl_coef > 0 else None, skipped=not applied,
                       nonfinite=(kept_total > 0 and not applied))

