"""Flow-GRPO (Liu et al. 2025, arXiv 2505.05470) for mask-guided editing, with its fast variants.

One step (rl/algorithms/group_trainer.py's frame):
1. Rollout: K conditions x G images from the current policy with the SDE sampler (Flow-GRPO's
   Euler-Maruyama step, noise level `sampler.noise_level`, known region blended each step),
   recording at the trained steps x_t, x_t' and the sampling policy's per-step log-probability
   (rl/algorithms/sde_rollout.py). Which steps are trained: `grpo.trained_steps` of them, a random
   subset each step or a sliding window (`grpo.step_selection`), noise injected only there with
   `grpo.sde_only_trained` (Flow-GRPO-Fast / MixGRPO) or at every step (Flow-GRPO).
2. The judge scores every image; `kernels.group_rewards` gives group-normalised advantages A clipped
   at nft.clip (Flow-GRPO: per-prompt std, +-5), the group filter drops groups (weight 0).
3. Update: the step's images split into `grpo.mini_batches` interleaved mini-batches (image i of the
   step goes to i mod U, the same on any number of processes), one optimiser step each. For every
   image and trained step, `kernels.grpo_loss`: the log-probability of the recorded step under the
   trained policy (Flow-GRPO's: the mean over elements of the Gaussian log-density; here over the
   generated latents only, cond.blend_mask), the ratio to the sampling policy's, the PPO-clipped
   objective max(-A ratio, -A clip(ratio, 1 - c, 1 + c)) and, with grpo.kl_coef, Flow-GRPO's KL to the
   initial model, mean (mu_theta - mu_ref)^2 / (2 sigma_t^2) with sigma_t the step's diffusion
   coefficient: the step Gaussians' KL per element times the step length t - t'. The first
   mini-batch is on-policy (no optimiser step since the rollout): its ratio is exactly 1
   (logp_old = None; the recomputed log-probabilities equal the rollout's, `logp_drift`); later ones
   use the rollout's log-probabilities and the clip acts. Each mini-batch's loss is the mean over its
   kept images and the trained steps, as Flow-GRPO accumulates it.
4. The evaluation EMA follows. (`old` is not used: the sampling policy is the current one.)
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

import kernels
from core.policies.policy import Condition
from rl.algorithms.group_trainer import SDE, STEPS, GroupAdvantages, GroupTrainer
from rl.algorithms.judge_pipeline import ChunkJudging
from rl.algorithms.sde_rollout import (
    SDETrajectory,
    sde_rollout,
    step_tensors,
    trained_steps,
)
from rl.algorithms.trainer import step_generator


@dataclasses.dataclass
class GRPORollout:
    """What one step's rollout made, for this process's share of the step's images."""

    step: int
    mine: slice
    samples: list
    cond: Condition
    traj: SDETrajectory               # x0, the recorded steps, their states and log-probabilities
    images: torch.Tensor              # decoded [n, 3, H, W]
    judging: ChunkJudging             # the judge's work on the images (`score` takes its result)


class GRPOTrainer(GroupTrainer):
    def rollout(self, step: int) -> GRPORollout:
        cfg, g = self.cfg, self.cfg.grpo
        mine, samples, cond, noise = self.group_conditions(step)
        seed = cfg.train.seed
        steps = trained_steps(self.sigmas, g.trained_steps, g.step_selection, step, g.window_shift_every,
                              step_generator(seed, step, STEPS))
        N = cfg.nft.groups_per_step * cfg.nft.group_size

        def make(c: slice) -> tuple[SDETrajectory, torch.Tensor]:
            # every chunk redraws the step's whole SDE noise and keeps its rows: chunks do not change the images
            rows = slice(mine.start + c.start, mine.start + c.stop)
            sub = cond.index(c)
            traj = sde_rollout(self.policy, sub, noise[c], self.sigmas.to(self.device),
                               noise_level=cfg.sampler.noise_level, steps=steps, sde_only_trained=g.sde_only_trained,
                               generator=step_generator(seed, step, SDE), share=(N, rows))
            with torch.no_grad():
                return traj, self.policy.decode(traj.x0, sub)

        pieces, judging = self.judged_rollout(step, samples, noise.shape[0], make)
        images = torch.cat([p[1] for p in pieces])
        return GRPORollout(step, mine, samples, cond, SDETrajectory.cat([p[0] for p in pieces]), images, judging)

    def update(self, batch: GRPORollout, adv: GroupAdvantages, metrics: dict[str, Any]) -> None:
        """One optimiser step per mini-batch (see the module docstring), then the EMA."""
        cfg, g, ctx = self.cfg, self.cfg.grpo, self.ctx
        U, traj = g.mini_batches, batch.traj
        n = traj.x0.shape[0]
        if n % U:
            raise ValueError(f"grpo.mini_batches ({U}) must divide each process's {n} images: make nft.groups_per_step "
                             "x nft.group_size a multiple of mini_batches x the process count")
        times = [float(s) for s in self.sigmas.detach().to("cpu", torch.float64)]
        micro = cfg.optim.micro_batch or n
        stats = _Stats()
        applied_any, nonfinite, grad_norm = False, False, 0.0
        for u in range(U):
            kept_u = float(adv.keep_all[u::U].sum())  # the step's images i with i mod U == u
            if kept_u == 0:
                continue
            idx = [p for p in range(n) if (batch.mine.start + p) % U == u]
            chunks = [idx[i:i + micro] for i in range(0, len(idx), micro)]
            passes = [(j, c) for j in range(len(traj.steps)) for c in chunks]
            scale = ctx.world_size / (kept_u * len(traj.steps))
            for p, (j, c) in enumerate(passes):
                k = traj.steps[j]
                x_t, x_next, sub = traj.x_t[j, c], traj.x_next[j, c], batch.cond.index(c)
                t_vec = torch.full((len(c),), times[k], device=x_t.device, dtype=torch.float32)
                with torch.no_grad():
                    v_ref = self.policy.velocity(x_t, t_vec, sub, weights=self.ref) if g.kl_coef > 0 else None
                v = self.trained_velocity(x_t, t_vec, sub)
                if not self._all_finite(v):  # a diverged policy: skip the step, do not crash
                    nonfinite = True
                    break
                v = v.to(x_t.dtype)  # the step's Gaussian in fp32, as Flow-GRPO (bf16 would blur it)
                step = step_tensors(times[k], times[k + 1], cfg.sampler.noise_level, len(c), x_t)
                # no optimiser step since the rollout: the sampling policy is the trained one, ratio 1
                logp_old = None if not applied_any else traj.logp[c, j]
                per_sample, logp = kernels.grpo_loss(
                    v, x_t, x_next, adv.advantage[c], logp_old, mask=sub.blend_mask, clip_range=g.clip_range,
                    v_ref=None if v_ref is None else v_ref.to(x_t.dtype),
                    kl_coef=g.kl_coef * (times[k] - times[k + 1]), reduction="none", return_logp=True, **step)
                loss = (per_sample * adv.keep[c]).sum() * scale
                with self.backward_context(last=p == len(passes) - 1):
                    loss.backward()
                stats.add(loss, logp, logp_old, traj.logp[c, j], g.clip_range, ctx.world_size,
                          None if v_ref is None else _kl(v, v_ref, sub.blend_mask, step))
            if nonfinite:
                self.optimizer.zero_grad(set_to_none=True)
                break
            grad_norm, applied = self.optimizer_step()
            applied_any = applied_any or applied
            if self.weights_nonfinite:
                break
        if applied_any:
            self.update_ema(batch.step)
        loss_sum = float(ctx.all_reduce_sum(torch.tensor(stats.loss, device=self.device)))
        metrics.update(loss=loss_sum, grad_norm=grad_norm if not nonfinite else float("nan"), skipped=not applied_any,
                       nonfinite=(adv.kept_total > 0 and not applied_any) or nonfinite,
                       trained_steps=list(traj.steps), **stats.summary(g.kl_coef > 0))


def _kl(v, v_ref, mask, step) -> float:
    """Mean over the chunk of the step Gaussians' KL per generated element (for the metrics)."""
    with torch.no_grad():
        m = mask.to(v.dtype).expand_as(v).reshape(v.shape[0], -1)
        d = (step["mean_v"][:, None] * (v.detach() - v_ref.to(v.dtype)).reshape(v.shape[0], -1)).square()
        kl = (m * d).sum(1) / (2 * step["std"] ** 2 * m.sum(1).clamp_min(1))
        return float(kl.mean())


class _Stats:
    """Flow-GRPO's logged quantities over the step's (image, trained step) terms."""

    def __init__(self):
        self.loss, self.terms, self.kl_terms = 0.0, 0, 0
        self.ratio_sum, self.ratio_dev, self.clipped, self.approx_kl, self.drift, self.kl = 0.0, 0.0, 0, 0.0, 0.0, 0.0

    def add(self, loss, logp, logp_old, logp_rollout, clip_range, world_size, kl) -> None:
        self.loss += float(loss.detach()) / world_size
        ratio = torch.ones_like(logp) if logp_old is None else torch.exp(logp - logp_old)
        if logp_old is None:  # on-policy: how far the recomputed log-probability is from the rollout's
            self.drift = max(self.drift, float((logp - logp_rollout).abs().max()))
        else:
            self.approx_kl += float(0.5 * ((logp - logp_old) ** 2).sum())
        self.terms += logp.numel()
        self.ratio_sum += float(ratio.sum())
        self.ratio_dev = max(self.ratio_dev, float((ratio - 1).abs().max()))
        self.clipped += int(((ratio - 1).abs() > clip_range).sum())
        if kl is not None:
            self.kl += kl * logp.numel()
            self.kl_terms += logp.numel()

    def summary(self, with_kl: bool) -> dict[str, Any]:
        terms = max(self.terms, 1)
        return dict(ratio_mean=self.ratio_sum / terms, ratio_max_dev=self.ratio_dev, clip_fraction=self.clipped / terms,
                    approx_kl=self.approx_kl / terms, logp_drift=self.drift,
                    kl=self.kl / max(self.kl_terms, 1) if with_kl else None)

