"""Reward feedback learning against a reference model (OneReward, Alg. 1 and Alg. 2).

One step:
1. The reference (the frozen initial weights, or — "dynamic", Alg. 2 — the policy's EMA) denoises
   each condition fully: the image the policy must beat.
2. The policy starts from the same condition with different noise, denoises without gradients to
   a random intermediate step k, then predicts x0 in one step with gradients,
   x0 = x_k - t_k v_theta(x_k, t_k), keeps the source in the known region, and decodes.
3. The pairwise judge gives P(policy image better than reference image) for every dimension of
   the task; the dimensions are averaged. The loss relu(bound - P) pushes the reward up, but not
   beyond the upper bound (a guard against reward hacking), and is back-propagated through the
   judge (which must be differentiable), the decoder and the single x0 prediction.
"""
from __future__ import annotations

import time
from typing import Any

import torch

from .rewards import judge_images
from .trainer import Trainer, step_generator

_REF_NOISE, _POLICY_NOISE, _STEP, _SDE = 1, 2, 3, 4


class ReFLTrainer(Trainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not getattr(self.judge, "differentiable", False):
            raise ValueError(
                f"reward feedback learning back-propagates through the judge, but {type(self.judge).__name__} "
                "is not differentiable: use the rule judge or the in-process transformers judge, or "
                "train.algorithm=nft")

    @property
    def reference_weights(self) -> dict[str, torch.Tensor]:
        return self.ema if self.cfg.refl.reference == "dynamic" else self.ref

    def train_step(self, step: int) -> dict[str, Any]:
        cfg, ctx = self.cfg, self.ctx
        B = cfg.refl.batch_size
        mine = ctx.share(B)
        seed = cfg.train.seed
        metrics: dict[str, Any] = {}

        tic = time.perf_counter()
        samples = self.data.conditions(seed, step, B)
        cond = self.encode(samples).index(mine)
        local = samples[mine]
        shape = (B, *cond.x0_known.shape[1:])
        noise_ref = self.draw_noise(step, _REF_NOISE, shape)[mine]
        noise_pol = self.draw_noise(step, _POLICY_NOISE, shape)[mine]
        gen = step_generator(seed, step, _STEP)
        k = int(torch.randint(cfg.refl.min_step, cfg.refl.max_step + 1, (1,), generator=gen))
        x_ref = self.generate(cond, noise_ref, self.reference_weights, generator=step_generator(seed, step, _SDE))
        x_k = self.generate(cond, noise_pol, None, sigmas=self.sigmas[: k + 1],
                            generator=step_generator(seed, step, _SDE + 1))
        with torch.no_grad():
            ref_images = self.policy.decode(x_ref, cond)
        metrics["time_rollout"] = time.perf_counter() - tic

        tic = time.perf_counter()
        t_k = self.sigmas[k].to(self.device).expand(x_k.shape[0])
        v = self.trained_velocity(x_k, t_k, cond)
        x0 = x_k - t_k.view(-1, *([1] * (x_k.dim() - 1))) * v
        m = cond.blend_mask.to(x0.dtype)
        x0 = m * x0 + (1 - m) * cond.x0_known.to(x0.dtype)
        images = self.policy.decode(x0, cond)
        table = judge_images(self.judge, local, images, mode="pairwise", others=ref_images)
        reward = table.per_image
        bound = cfg.refl.reward_upper_bound
        # each image's term has the same weight in the step's mean; DDP averages over processes
        loss = torch.relu(bound - reward).sum() * (ctx.world_size / B)
        metrics["time_judge"] = time.perf_counter() - tic

        tic = time.perf_counter()
        loss.backward()
        grad_norm, applied = self.optimizer_step()
        if applied:
            self.update_ema(step)
        metrics["time_update"] = time.perf_counter() - tic
        all_rewards = ctx.all_gather_cat(reward.detach().float())
        metrics.update(
            reward=float(all_rewards.mean()), reward_std=float(all_rewards.std()) if B > 1 else 0.0,
            at_bound=float((all_rewards >= bound).float().mean()), denoise_step=k,
            loss=float(ctx.all_reduce_sum(loss.detach())) / ctx.world_size, grad_norm=grad_norm,
            skipped=not applied, nonfinite=not applied, images=B,
            reward_by_task=table.by_task(), reward_by_task_dim=table.by_task_dimension())
        return metrics
