"""Refreshing a learned judge on the policy's own edits while RL runs (refresh.*).

A judge trained offline on one editor's edits ranks the edits of the policy that RL makes at chance
once the policy moves, and reward feedback learning follows its gradient into edits it never saw
(docs/results.md: extend and removal lose 5-18 dB while the judge rises). OneReward's annotators
labelled the model's own outputs; here an annotator (the rule judge on the built-in world, or any
judge) labels every ReFL step's (policy edit, reference edit) pairs per dimension, and every
`refresh.every` steps the judge takes `refresh.updates` AdamW steps on the newest labelled pairs,
with the same preference loss as `python -m reward.train` (both orders, Yes for the winner first).

Before a step's pairs are learned they measure the judge: `refresh_agreement` is the share of the
step's labelled (pair, dimension)s on which the judge's answer (P(policy better) > 0.5) agrees with
the annotator, the judge's accuracy on exactly the edits it is rewarding. A judge being gamed reads
near or below 0.5 here before the ground truth is ever looked at.

Under DDP every process labels its own share, every process keeps all of them (the same buffer
everywhere, so rank 0's checkpoint holds it), each draws its own pairs from it and the judges'
gradients are averaged, so the judge stays the same on every process. The judge's weights, its optimiser and the buffer are part of each
checkpoint: a resumed run continues the same judge.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor

from core.synthetic.world import EditSample
from reward.judge import Judge, JudgeRequest
from reward.judges.vlm_judge import TransformersJudge
from reward.training.pairwise_loss import pairwise_loss
from reward.vlm.judge_card import JudgeCard
from rl.algorithms.reward_scoring import ScoreTable, judge_images
from rl.algorithms.trainer import keyed_generator
from rl.plumbing.config import RefreshConfig
from rl.plumbing.distributed import DistContext


class JudgeRefresh:
    """The annotator, the buffer of labelled pairs and the judge's optimiser."""

    def __init__(self, cfg: RefreshConfig, judge: Judge, annotator: Judge, annotator_mode: str, ctx: DistContext,
                 seed: int):
        if not isinstance(judge, TransformersJudge):
            raise ValueError(f"refresh.every fine-tunes the judge in-process; {type(judge).__name__} cannot learn")
        self.cfg, self.judge, self.annotator, self.mode, self.ctx, self.seed = (
            cfg, judge, annotator, annotator_mode, ctx, seed)
        self.params = list(judge.model.parameters())
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=0.0)
        self.buffer: list[dict[str, Any]] = []

    # -- labelling -------------------------------------------------------------------------------
    def annotator_margins(self, samples: list[EditSample], images: Tensor, others: Tensor) -> Tensor:
        """Per (image, dimension) in judge_images' order: > 0 when the annotator prefers the policy's edit."""
        if self.mode == "pairwise":
            return judge_images(self.annotator, samples, images, mode="pairwise", others=others).per_request - 0.5
        mine = judge_images(self.annotator, samples, images, mode=self.mode).per_request
        theirs = judge_images(self.annotator, samples, others, mode=self.mode).per_request
        return mine - theirs

    @torch.no_grad()
    def observe(self, step: int, samples: list[EditSample], images: Tensor, others: Tensor,
                table: ScoreTable, metrics: dict[str, Any]) -> None:
        """Label this step's pairs (policy `images` vs reference `others`), score the judge's answers on them
        (`table`: its pairwise scores of the same requests) and keep them in the buffer."""
        images, others = images.detach(), others.detach()
        margin = self.annotator_margins(samples, images, others).float().cpu()
        judged = table.per_request.detach().float().cpu() - 0.5
        # a zero margin is no preference (identical edits, a saturated score), whatever refresh.margin says
        labelled = (margin.abs() >= self.cfg.margin) & (margin != 0)
        # each process its own draws: its share's annotator errs independently of the others'
        noise = keyed_generator(self.seed, step, "label_noise", self.ctx.rank)
        flip = torch.rand(margin.shape, generator=noise) < self.cfg.label_noise
        policy_wins = (margin > 0) ^ flip
        agree = ((judged > 0) == (margin > 0))[labelled]
        n = self.ctx.all_reduce_sum(torch.tensor([float(agree.numel()), float(agree.sum())], device=self.ctx.device))
        metrics.update(refresh_labelled=int(n[0]), refresh_agreement=float(n[1] / n[0]) if n[0] else float("nan"))
        new = []
        for r in torch.nonzero(labelled).flatten().tolist():
            i, dim = table.image_of_request[r], table.dimension_of_request[r]
            s = samples[i]
            win, lose = (images[i], others[i]) if policy_wins[r] else (others[i], images[i])
            new.append({"task": s.task, "dimension": dim, "source": s.source.cpu(), "mask": s.mask.cpu(),
                        "prompt": s.prompt, "winner": win.cpu().float(), "loser": lose.cpu().float()})
        # every process keeps every process's pairs (in rank order): the buffer rank 0 checkpoints is
        # each process's, so a resumed run draws what an uninterrupted one would
        for share in self.ctx.all_gather_objects(new):
            self.buffer.extend(share)
        del self.buffer[:-self.cfg.buffer]

    # -- learning --------------------------------------------------------------------------------
    def due(self, step: int) -> bool:
        return bool(self.cfg.every) and (step + 1) % self.cfg.every == 0

    def update(self, step: int, metrics: dict[str, Any]) -> None:
        """`refresh.updates` optimiser steps on pairs drawn from the buffer (every process the same count)."""
        c, model = self.cfg, self.judge.model
        gen = keyed_generator(self.seed, step, "refresh_draw", self.ctx.rank)
        model.requires_grad_(True)
        losses = []
        try:
            for _ in range(c.updates):
                self.optimizer.zero_grad(set_to_none=True)
                if self.buffer:
                    pick = torch.randint(len(self.buffer), (min(c.batch_size, len(self.buffer)),), generator=gen)
                    loss = pairwise_loss(self.judge, [self._request(self.buffer[i]) for i in pick.tolist()])
                    loss.backward()
                    losses.append(float(loss.detach()))
                self._average_gradients()
                torch.nn.utils.clip_grad_norm_(self.params, 1.0)
                self.optimizer.step()
        finally:
            self.optimizer.zero_grad(set_to_none=True)
            model.requires_grad_(False)
        self._check_lockstep()
        metrics.update(refresh_loss=sum(losses) / len(losses) if losses else float("nan"),
                       refresh_buffer=len(self.buffer))

    def _average_gradients(self) -> None:
        """DDP-style mean of the judge's gradients over processes (a process with no pairs adds zeros)."""
        if not self.ctx.enabled:
            return
        for p in self.params:
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            p.grad = self.ctx.all_reduce_sum(g) / self.ctx.world_size

    def _check_lockstep(self) -> None:
        """Every process must hold the same judge (averaged gradients, the same AdamW): refuse to go on
        with judges that differ, which would score the same edit differently on different processes."""
        if not self.ctx.enabled:
            return
        with torch.no_grad():
            digest = torch.stack([p.detach().double().sum() for p in self.params]).sum().reshape(1)
        every = self.ctx.all_gather_cat(digest.to(self.ctx.device))
        if not torch.all(every == every[0]):
            raise RuntimeError(f"refresh: the judge differs between processes after its update (weight sums "
                               f"{every.tolist()}); this is a bug, please report it with the run's config.yaml")

    def _request(self, entry: dict[str, Any]) -> JudgeRequest:
        device = self.judge.device
        return JudgeRequest(entry["task"], entry["dimension"], entry["source"].to(device), entry["winner"].to(device),
                            entry["mask"].to(device), entry["prompt"], other=entry["loser"].to(device))

    def save(self, directory, judge_cfg, made_by: str) -> None:
        """The refreshed judge as a judge directory (weights, tokenizer, processor, judge_card.json) that
        judge.model / rl.eval / the server load like the one it started from."""
        self.judge.parts.save_pretrained(directory)
        JudgeCard(modes=self.judge.trained_modes or ("pairwise",), view=dataclasses.asdict(self.judge.view),
                  max_pixels=judge_cfg.max_pixels, templates=judge_cfg.templates, made_by=made_by).save(directory)

    # -- checkpoint state ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"judge": {k: v.detach().cpu().clone() for k, v in self.judge.model.state_dict().items()},
                "optimizer": self.optimizer.state_dict(), "buffer": list(self.buffer)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.judge.model.load_state_dict(state["judge"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.buffer = list(state["buffer"])
