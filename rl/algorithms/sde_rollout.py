"""Flow-GRPO's rollout: the SDE sampler, recording the steps that will be trained.

Which steps are trained (`trained_steps`): the stochastic steps are those with t' > 0 (the step to
t = 0 returns x0_hat, deterministically: it has no log-probability). "random" draws a fresh subset
every training step (Flow-GRPO's timestep_fraction < 1, Flow-GRPO-Fast); "window" takes consecutive
steps from the start of the schedule, moved one step later every `shift_every` training steps, and
stops at the last stochastic step (MixGRPO's sliding window as we read it: its exact shift schedule,
and its higher-order ODE solver outside the window, were not checked; outside the window this takes
Euler steps).

The rollout (`sde_rollout`) samples with `core.sampling.samplers.sample(method="sde")` and the mask blend,
noise level `noise_level` at the trained steps and, with `sde_only_trained`, 0 (an Euler step, no
noise drawn) elsewhere (Flow-GRPO-Fast, MixGRPO: fewer random steps, the same trained ones). At each
trained step k it keeps x_{t_k}, x_{t_k+1} and the sampling policy's log-probability of that step,
`kernels.sde_step_logprob` with the step's Gaussian (`core.sampling.samplers.sde_step_moments`) over the
generated latents (`cond.blend_mask`; the known region is blended, not sampled). Each stochastic
step's noise is drawn for the whole step's batch and sliced to the process's share, so a rollout does
not depend on the number of processes.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

import kernels
from core.policies.policy import Condition, Policy
from core.sampling.samplers import Blend, sample, sde_step_moments


def stochastic_steps(sigmas: Tensor) -> list[int]:
    """Indices k of the schedule's steps t_k -> t_k+1 that inject noise (t_k+1 > 0)."""
    return [k for k in range(len(sigmas) - 1) if float(sigmas[k + 1]) > 0]


def trained_steps(sigmas: Tensor, n: int, selection: str, step: int, shift_every: int,
                  gen: torch.Generator) -> list[int]:
    """The n step indices trained at training step `step` (sorted), the same for every image."""
    candidates = stochastic_steps(sigmas)
    n = min(n, len(candidates))
    if selection == "random":
        return sorted(candidates[i] for i in torch.randperm(len(candidates), generator=gen)[:n].tolist())
    start = min(step // shift_every, len(candidates) - n) if shift_every else 0
    return candidates[start:start + n]


def step_tensors(t: float, t_next: float, noise_level: float, n: int, like: Tensor) -> dict[str, Tensor]:
    """mean_x, mean_v, std of the step as [n] tensors (kernels.grpo_loss / sde_step_logprob's form)."""
    mean_x, mean_v, std = sde_step_moments(t, t_next, noise_level)
    return {k: torch.full((n,), v, dtype=like.dtype, device=like.device)
            for k, v in (("mean_x", mean_x), ("mean_v", mean_v), ("std", std))}


@dataclasses.dataclass
class SDETrajectory:
    x0: Tensor                        # [n, ...] the final (blended) latents
    steps: list[int]                  # the recorded step indices k
    x_t: Tensor                       # [S, n, ...] the state before each recorded step
    x_next: Tensor                    # [S, n, ...] the state after it
    logp: Tensor                      # [n, S] the sampling policy's log-probability of each recorded step

    @classmethod
    def cat(cls, parts: list[SDETrajectory]) -> SDETrajectory:
        """The trajectories of consecutive chunks of images as one (the same recorded steps)."""
        return cls(torch.cat([p.x0 for p in parts]), list(parts[0].steps), torch.cat([p.x_t for p in parts], 1),
                   torch.cat([p.x_next for p in parts], 1), torch.cat([p.logp for p in parts]))


@torch.no_grad()
def sde_rollout(policy: Policy, cond: Condition, noise: Tensor, sigmas: Tensor, *, noise_level: float,
                steps: list[int], sde_only_trained: bool, generator: torch.Generator,
                share: tuple[int, slice] | None = None, weights: dict[str, Tensor] | None = None) -> SDETrajectory:
    """Sample with the SDE sampler (see the module docstring) and record the `steps`.

    `share` = (N, rows): these images are rows `rows` of a batch of N (a process's share): every
    stochastic step draws the whole batch's noise from `generator` and keeps its rows, so the
    images do not depend on the number of processes."""
    levels = [noise_level if (k in steps or not sde_only_trained) else 0.0 for k in range(len(sigmas) - 1)]
    total, rows = share if share is not None else (noise.shape[0], slice(None))

    def step_noise(k: int) -> Tensor:
        dtype = torch.promote_types(noise.dtype, torch.float32)  # the sampler's state dtype
        return torch.randn((total, *noise.shape[1:]), generator=generator, dtype=dtype)[rows]

    velocities: dict[int, Tensor] = {}
    calls = iter(range(len(sigmas) - 1))

    def velocity(x: Tensor, t: Tensor) -> Tensor:
        k = next(calls)
        v = policy.velocity(x, t, cond, weights=weights)
        if k in steps:
            velocities[k] = v
        return v

    x0, traj = sample(velocity, noise, sigmas, method="sde", blend=Blend(cond.blend_mask, cond.x0_known, noise),
                      noise_level=levels, return_trajectory=True, sde_noise=step_noise)
    times = [float(s) for s in sigmas.detach().to("cpu", torch.float64)]
    logp = []
    for k in steps:
        x, x_next = traj[k], traj[k + 1]
        logp.append(kernels.sde_step_logprob(velocities[k].to(x.dtype), x, x_next, mask=cond.blend_mask,
                                             **step_tensors(times[k], times[k + 1], noise_level, x.shape[0], x)))
    return SDETrajectory(x0, list(steps), traj[steps], traj[[k + 1 for k in steps]], torch.stack(logp, 1))
