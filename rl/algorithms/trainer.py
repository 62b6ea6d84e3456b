"""What the RL algorithms share: weights and their copies, the optimiser, conditions, rollouts.

A trainer owns the policy's trainable weights (updated by the optimiser) and three copies kept as
plain tensor dicts (rl/algorithms/weight_copies.py): `old` (DiffusionNFT's sampling policy), `ema` (evaluation,
export, and OneReward's dynamic reference) and `ref` (the initial weights: KL anchor and OneReward's
static reference). Everything random in a step is drawn from generators seeded by (seed, step),
so a resumed run repeats exactly what an uninterrupted one would have done. Several processes run
DDP, or with dist.strategy=fsdp2 FSDP2 (rl/plumbing/fsdp.py): the weights are DTensor shards and the
copies DTensor shards alike (on the device or in host memory, dist.copies).
"""
from __future__ import annotations

import abc
import contextlib
import hashlib
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from core.policies.policy import Condition, Policy, swapped_weights
from core.sampling.samplers import sample_policy
from core.synthetic.world import EditSample, collate
from reward.judge import Judge
from rl.algorithms.judge_pipeline import ChunkJudging, rollout_chunks
from rl.algorithms.lr_schedule import lr_factor
from rl.algorithms.weight_copies import clone, ema_decay, lerp_
from rl.plumbing.config import RunConfig
from rl.plumbing.distributed import DistContext
from rl.plumbing.fsdp import local


@contextlib.contextmanager
def timed(metrics: dict[str, Any], key: str):
    """Seconds spent in the block, into metrics[key] (the rollout / judge / update split)."""
    tic = time.perf_counter()
    try:
        yield
    finally:
        metrics[key] = time.perf_counter() - tic


def step_generator(seed: int, step: int, stream: int) -> torch.Generator:
    """A CPU generator for one purpose (stream) of one step; draws are moved to the device after."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 101 + stream)


def keyed_generator(*parts: object) -> torch.Generator:
    """A CPU generator seeded by a hash of `parts` joined by "/" (e.g. seed, step, a condition's key):
    the same on every process and for any selection or order of conditions."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**62 - 1))


class Trainer(abc.ABC):
    def __init__(self, cfg: RunConfig, policy: Policy, judge: Judge, data, ctx: DistContext, sigmas: Tensor):
        self.cfg, self.policy, self.judge, self.data, self.ctx = cfg, policy, judge, data, ctx
        self.device = ctx.device
        self.sigmas = sigmas.to(torch.float32)
        fsdp2 = cfg.dist.strategy == "fsdp2"
        #: FSDP2 over several processes: the weights, gradients, AdamW state and copies are DTensor shards,
        #: and every process takes part in each forward of the model (evaluations included)
        self.sharded = fsdp2 and ctx.enabled
        #: checkpoints in the sharded format (rl/plumbing/fsdp.py), also for fsdp2 on one process, so that a
        #: run can resume on another number of processes
        self.sharded_checkpoints = fsdp2
        if self.sharded:  # before the parameters are collected: fully_shard replaces them with DTensors
            from rl.plumbing.fsdp import shard_model

            shard_model(policy.model, cfg.dist, self.device)
        self.params = policy.trainable_parameters()
        if not self.params:
            raise ValueError("the policy has no trainable parameters (all frozen?)")
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(self.params.values(), lr=o.lr, betas=tuple(o.betas),
                                           weight_decay=o.weight_decay)
        where = cfg.dist.copies if fsdp2 else "device"
        self.ref = clone(self.params, where)
        self.old = clone(self.params, where)
        self.ema = clone(self.params, where)
        self.ddp = None
        if ctx.enabled and not self.sharded:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(policy.model, device_ids=ids)
        if fsdp2 and ctx.is_main:
            from rl.plumbing.fsdp import memory_line

            print(memory_line(self), file=sys.stderr)

    # -- pieces of a step ---------------------------------------------------------------------
    def encode(self, samples: list[EditSample]) -> Condition:
        batch = collate(samples)
        with torch.no_grad():
            return self.policy.encode(batch.images.to(self.device), batch.masks.to(self.device), batch.prompts)

    def draw_noise(self, step: int, stream: int, shape: tuple[int, ...]) -> Tensor:
        return torch.randn(shape, generator=step_generator(self.cfg.train.seed, step, stream)).to(self.device)

    @torch.no_grad()
    def generate(self, cond: Condition, noise: Tensor, weights: dict[str, Tensor] | None,
                 sigmas: Tensor | None = None, generator: torch.Generator | None = None,
                 sde_noise: Callable[[int], Tensor] | None = None) -> Tensor:
        """Packed x at the end of `sigmas` (default: the full rollout schedule), without gradients.
        `generator` drives the SDE sampler's noise (pass a step generator for reproducibility), or
        `sde_noise` gives it (`chunk_sde_noise`)."""
        s = self.cfg.sampler
        return sample_policy(self.policy, cond, sigmas=self.sigmas if sigmas is None else sigmas,
                             method=s.method, noise=noise, weights=weights, blend=True,
                             noise_level=s.noise_level, generator=generator, sde_noise=sde_noise)

    def chunk_sde_noise(self, step: int, stream: int, noise: Tensor, rows: slice) -> Callable[[int], Tensor]:
        """The SDE sampler's noise for rows `rows` of this process's rollout (starting noise `noise`):
        each stochastic step draws the whole share's z from the step's generator, as an unchunked
        rollout does, and keeps the rows, so a chunk's images do not depend on the chunking."""
        gen = step_generator(self.cfg.train.seed, step, stream)
        dtype = torch.promote_types(noise.dtype, torch.float32)  # the sampler's state dtype
        return lambda i: torch.randn(noise.shape, generator=gen, dtype=dtype)[rows]

    @torch.no_grad()
    def pairwise_anchors(self, step: int, samples: list[EditSample]) -> Tensor:
        """judge.mode pairwise in a group algorithm (a judge trained on comparisons only, OneReward's):
        each image is scored as P(it beats its condition's anchor), [n, 3, H, W]: one edit of the
        condition by the sampling policy (`old`) with the ODE sampler (euler in place of sde) and noise
        keyed by (seed, step, condition), so a group shares one anchor on whichever process its images
        are. A shared anchor leaves the group's normalised advantages ranking the images against each
        other, as absolute scores would; the anchor's own level cancels in the normalisation."""
        unique = list({s.key: s for s in samples}.values())
        cond = self.encode(unique)
        shape = cond.x0_known.shape[1:]
        noise = torch.stack([torch.randn(shape, generator=keyed_generator(self.cfg.train.seed, step, s.key))
                             for s in unique]).to(self.device, cond.x0_known.dtype)
        s = self.cfg.sampler
        x0 = sample_policy(self.policy, cond, sigmas=self.sigmas, method="euler" if s.method == "sde" else s.method,
                           noise=noise, weights=self.old, blend=True, noise_level=0.0)
        images = self.policy.decode(x0, cond)
        row = {u.key: i for i, u in enumerate(unique)}
        return images[[row[x.key] for x in samples]]

    def judged_rollout(self, step: int, samples: list, n: int, make: Callable[[slice], tuple[Any, Tensor]]
                       ) -> tuple[list, ChunkJudging]:
        """The rollout of this process's n images in chunks of sampler.rollout_chunk: `make(chunk)` ->
        (what the update needs, decoded images) for each, in order; each chunk's images go to the judge
        as they are made (judge.overlap: scored in a background thread meanwhile; rl/algorithms/judge_pipeline.py).
        judge.mode pairwise compares each image with its condition's anchor (`pairwise_anchors`).
        Returns the (piece, images) of each chunk and the judging, whose `result()` is the step's scores."""
        anchors = self.pairwise_anchors(step, samples) if self.cfg.judge.mode == "pairwise" else None
        chunks = rollout_chunks(n, self.cfg.sampler.rollout_chunk)
        overlap = self.cfg.judge.overlap
        if overlap and len(chunks) < 2 and self.ctx.is_main and not getattr(self, "_warned_one_chunk", False):
            self._warned_one_chunk = True
            print(f"[rl.train] judge.overlap: sampler.rollout_chunk ({self.cfg.sampler.rollout_chunk}) holds all "
                  f"{n} images of a process: one chunk, nothing to overlap; lower it", file=sys.stderr)
        judging = ChunkJudging(self.judge, self.cfg.judge.mode, overlap)
        pieces = []
        try:
            for c in chunks:
                piece, images = make(c)
                judging.submit(samples[c], images, None if anchors is None else anchors[c])
                pieces.append((piece, images))
        except BaseException:
            judging.close()
            raise
        return pieces, judging

    def trained_velocity(self, x_t: Tensor, t: Tensor, cond: Condition) -> Tensor:
        """The policy's velocity with gradients (through DDP when distributed; a model sharded by FSDP2
        is its own wrapper)."""
        if self.ddp is None:
            return self.policy.velocity(x_t, t, cond)
        with self.policy.route_model(self.ddp):
            return self.policy.velocity(x_t, t, cond)

    def backward_context(self, last: bool):
        """DDP syncs gradients only on the last backward of an accumulation. FSDP2 reduce-scatters after
        every backward and accumulates sharded gradients (skipping the sync would keep whole gradients)."""
        if self.ddp is None or last:
            return contextlib.nullcontext()
        return self.ddp.no_sync()

    def _all_finite(self, x: Tensor) -> bool:
        """True when x is finite on every process (all processes must take the same branch)."""
        bad = (~torch.isfinite(x.detach())).any().float().reshape(1)
        return float(self.ctx.all_reduce_sum(bad)) == 0.0

    def optimizer_step(self) -> tuple[float, bool]:
        """Clip, check and apply the accumulated gradient. Returns (grad norm, applied).

        After the update every weight is checked: a non-finite one sets `weights_nonfinite`, and
        the run stops without writing a checkpoint from it (AdamW's step cannot be undone cheaply,
        and a checkpoint of NaN weights would poison every resume)."""
        params = list(self.params.values())
        norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.optim.grad_clip)
        if self.sharded:  # the norm of sharded gradients is a DTensor: its value is the same on every process
            norm = norm.full_tensor()
        ok = bool(torch.isfinite(norm))
        if ok:
            o = self.cfg.optim
            scale = lr_factor(self.step_index, self.cfg.train.steps, o.warmup_steps, o.decay, o.min_lr_ratio)
            for group in self.optimizer.param_groups:
                group["lr"] = o.lr * scale
            self.updated = True
            self.optimizer.step()
            bad = sum((~torch.isfinite(local(p.detach()))).any().float() for p in params).reshape(1)
            self.weights_nonfinite = float(self.ctx.all_reduce_sum(bad)) > 0
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm), ok

    def update_ema(self, step: int) -> None:
        lerp_(self.ema, self.params, ema_decay(step, self.cfg.train.ema_max_decay))

    # -- the algorithm ------------------------------------------------------------------------
    step_index: int = 0
    updated: bool = False            # the optimiser changed the weights in the current step
    weights_nonfinite: bool = False  # ... and left a NaN or an infinity in them

    @abc.abstractmethod
    def train_step(self, step: int) -> dict[str, Any]:
        """One RL step; returns the metrics to log (and "skipped": True when no update was made)."""

    def export(self, out_dir) -> None:
        """Save the evaluation EMA where the model's own library can load it: a LoRA adapter in
        diffusers' format when the policy trains one (FluxFillPipeline.load_lora_weights), else
        the transformer (FLUX.1 Fill: transformer/ only) or the whole pipeline directory (the toy:
        FluxFillPipeline.from_pretrained loads it). Sharded (FSDP2): every process calls it, the EMA's full
        weights are gathered to rank 0, which writes the same files."""
        if self.sharded:
            from rl.plumbing.fsdp import export_sharded

            export_sharded(self, out_dir)
            return
        if getattr(self.policy, "has_lora", False) and hasattr(self.policy, "save_lora_weights"):
            self.policy.save_lora_weights(out_dir, weights=self.ema)
            return
        with torch.no_grad(), swapped_weights(self.policy.model, self.ema):
            if self.cfg.model.kind == "flux_fill":
                self.policy.save_pretrained(out_dir, transformer_only=True)
            else:
                self.policy.save_pretrained(out_dir)

    # -- checkpoint state ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The checkpoint's state (rank 0; a sharded run writes rl.plumbing.fsdp.sharded_state on every process)."""
        return {
            "weights": {k: v.detach().cpu().clone() for k, v in self.params.items()},
            "old": {k: v.cpu() for k, v in self.old.items()},
            "ema": {k: v.cpu() for k, v in self.ema.items()},
            "ref": {k: v.cpu() for k, v in self.ref.items()},
            "optimizer": self.optimizer.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "sharded" in state:  # every process reads its shards of a sharded checkpoint
            from rl.plumbing.fsdp import load_sharded

            load_sharded(self, state["checkpoint_dir"], state)
            return
        if self.sharded_checkpoints:
            raise ValueError("this checkpoint was written by a DDP run; dist.strategy=fsdp2 resumes sharded "
                             "checkpoints only")
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(state["weights"][name])
        for key in ("old", "ema", "ref"):
            copy = getattr(self, key)
            for name in copy:
                copy[name] = state[key][name].to(copy[name].device, copy[name].dtype).clone()
        self.optimizer.load_state_dict(state["optimizer"])
