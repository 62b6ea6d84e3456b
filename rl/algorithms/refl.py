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

import dataclasses
from typing import Any

import torch

from core.policies.policy import Condition
from rl.algorithms.judge_refresh import JudgeRefresh
from rl.algorithms.reward_scoring import ScoreTable, judge_images
from rl.algorithms.trainer import Trainer, step_generator, timed
from rl.plumbing.builders import build_annotator

_REF_NOISE, _POLICY_NOISE, _STEP, _SDE = 1, 2, 3, 4


class ReFLTrainer(Trainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not getattr(self.judge, "differentiable", False):
            raise ValueError(
                f"reward feedback learning back-propagates through the judge, but {type(self.judge).__name__} "
                "is not differentiable: use the rule judge or the in-process transformers judge, or "
                "train.algorithm=nft")
        #: refresh.every: the judge fine-tuned on the policy's edits as labelled by an annotator
        self.judge_refresh = None
        if self.cfg.refresh.every:
            annotator, mode = build_annotator(self.cfg.refresh, self.ctx.device)
            self.judge_refresh = JudgeRefresh(self.cfg.refresh, self.judge, annotator, mode, self.ctx,
                                              self.cfg.train.seed)

    @property
    def reference_weights(self) -> dict[str, torch.Tensor]:
        return self.ema if self.cfg.refl.reference == "dynamic" else self.ref

    def train_step(self, step: int) -> dict[str, Any]:
        """rollout (the reference's image, the policy part-way) -> score (one x0 prediction with
        gradients, the pairwise judge) -> rewards (the bounded shortfall) -> update."""
        metrics: dict[str, Any] = {"images": self.cfg.refl.batch_size}
        with timed(metrics, "time_rollout"):
            batch = self.rollout(step)
        with timed(metrics, "time_judge"):
            table, images = self.score(batch, metrics)
            loss = self.rewards(table.per_image, metrics)
        with timed(metrics, "time_update"):
            self.update(step, loss, metrics)
        if self.judge_refresh is not None:
            with timed(metrics, "time_refresh"):
                self.judge_refresh.observe(step, batch.samples, images.detach(), batch.ref_images, table, metrics)
                if self.judge_refresh.due(step):
                    self.judge_refresh.update(step, metrics)
        return metrics

    def rollout(self, step: int) -> ReFLRollout:
        cfg = self.cfg
        B = cfg.refl.batch_size
        mine = self.ctx.share(B)
        seed = cfg.train.seed
        samples = self.data.conditions(seed, step, B)
        cond = self.encode(samples).index(mine)
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
        return ReFLRollout(samples[mine], cond, k, x_k, ref_images)

    def one_step_images(self, batch: ReFLRollout) -> torch.Tensor:
        """The policy's decoded x0 prediction from step k, the known region kept, with gradients."""
        k, x_k, cond = batch.k, batch.x_k, batch.cond
        t_k = self.sigmas[k].to(self.device).expand(x_k.shape[0])
        v = self.trained_velocity(x_k, t_k, cond)
        x0 = x_k - t_k.view(-1, *([1] * (x_k.dim() - 1))) * v
        m = cond.blend_mask.to(x0.dtype)
        x0 = m * x0 + (1 - m) * cond.x0_known.to(x0.dtype)
        return self.policy.decode(x0, cond)

    def score(self, batch: ReFLRollout, metrics: dict[str, Any]) -> tuple[ScoreTable, torch.Tensor]:
        """The judge's table of P(policy's image better than the reference's) per image and dimension,
        with gradients into the policy, and the images it judged."""
        images = self.one_step_images(batch)
        table = judge_images(self.judge, batch.samples, images, mode="pairwise", others=batch.ref_images)
        metrics.update(denoise_step=batch.k, reward_by_task=table.by_task(),
                       reward_by_task_dim=table.by_task_dimension())
        return table, images

    def rewards(self, reward: torch.Tensor, metrics: dict[str, Any]) -> torch.Tensor:
        """The loss relu(bound - P): no push beyond the upper bound (OneReward's guard)."""
        B, ctx = self.cfg.refl.batch_size, self.ctx
        bound = self.cfg.refl.reward_upper_bound
        # each image's term has the same weight in the step's mean; DDP averages over processes
        loss = torch.relu(bound - reward).sum() * (ctx.world_size / B)
        all_rewards = ctx.all_gather_cat(reward.detach().float())
        metrics.update(reward=float(all_rewards.mean()), reward_std=float(all_rewards.std()) if B > 1 else 0.0,
                       at_bound=float((all_rewards >= bound).float().mean()),
                       loss=float(ctx.all_reduce_sum(loss.detach())) / ctx.world_size)
        return loss

    def update(self, step: int, loss: torch.Tensor, metrics: dict[str, Any]) -> None:
        loss.backward()
        grad_norm, applied = self.optimizer_step()
        if applied:
            self.update_ema(step)
        metrics.update(grad_norm=grad_norm, skipped=not applied, nonfinite=not applied)


    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.judge_refresh is not None:
            state["judge_refresh"] = self.judge_refresh.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if self.judge_refresh is not None:
            if "judge_refresh" not in state:
                raise ValueError("this checkpoint holds no refreshed judge (it was written with refresh.every=0): "
                                 "resume it as it was written, or start a new run with refresh.every set")
            self.judge_refresh.load_state_dict(state["judge_refresh"])


@dataclasses.dataclass
class ReFLRollout:
    samples: list                     # this process's conditions
    cond: Condition
    k: int                            # the step the policy denoised to
    x_k: torch.Tensor                 # the policy's latents at step k (no gradients)
    ref_images: torch.Tensor          # the reference's decoded images
