"""ODE/SDE samplers for rectified flow, with mask-guided blending of the known region.

Convention: x_t = (1 - t) x0 + t eps, v = eps - x0, and sampling runs over a schedule
t_0 > t_1 > ... > t_n (core.sampling.schedules), normally from 1 to 0. A velocity function maps
(x [B, ...], t [B] float32) to v with x's shape; the packed layout [B, L, C] is the usual one.
From (x, v) the model's predictions are x0_hat = x - t v and eps_hat = x + (1 - t) v.

Methods (`sample(method=...)`):
- "euler": x' = x + (t' - t) v.
- "dpm2":  DPM-Solver++(2M) with data prediction, lambda = log((1 - t) / t), h = lambda' - lambda:
           x' = (t'/t) x + (1 - t') (1 - e^-h) D,   e^-h = t' (1 - t) / (t (1 - t'))
           D = x0_hat (first order, which equals the Euler step for this flow), or
           D = (1 + 1/(2r)) x0_hat - 1/(2r) x0_hat_prev with r = h_prev / h (second order).
           First order on the first step (and on the second one when the schedule starts at t = 1,
           where h_prev is infinite); a step to t' = 0 returns x0_hat exactly.
- "sde":   Flow-GRPO's Euler-Maruyama step of the reverse SDE with the same marginals,
           diffusion sigma_t = a sqrt(t / (1 - t)) (a = `noise_level`):
           x' = x + (t' - t) [v + sigma_t^2 / (2t) eps_hat] + sigma_t sqrt(t - t') z
           (the score of p_t is -eps_hat / t). At t = 1 sigma_t is infinite; like Flow-GRPO we
           evaluate it there as a sqrt(1 / (1 - t')). A step to t' = 0 is deterministic
           (returns x0_hat) so no injected noise is left in the output. a = 0 is the Euler step.
           The step is Gaussian, x' ~ N(mean_x x + mean_v v, std^2) per element, with the
           per-step numbers of `sde_step_moments` (Flow-GRPO's log-probabilities use them);
           `noise_level` may be one number per step (0 = an Euler step there: Flow-GRPO-Fast and
           MixGRPO inject noise only at the steps they train).

Blending (`Blend(mask, x0_known, noise)`, mask 1 = generate): every step ends in
`kernels.masked_blend_step`, which keeps the known region on the re-noised source
(1 - t') x0_known + t' noise, so it equals x0_known exactly at t = 0. For Euler the kernel's step IS
the sampler's step; for dpm2/sde the solver's update is handed to the same kernel as the effective
velocity (x'_solver - x) / (t' - t), which reproduces x'_solver in the generated region (up to
rounding) with one kernel call per step.

Nothing here switches gradients off: run under `torch.no_grad()` when you do not need them.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from core.policies.policy import Condition, Policy
from core.sampling.schedules import check_sigmas
from kernels import masked_blend_step

VelocityFn = Callable[[Tensor, Tensor], Tensor]
METHODS = ("euler", "dpm2", "sde")


@dataclasses.dataclass
class Blend:
    """The known region to keep: mask (1 = generate; broadcastable to x, e.g. [B, L, 1] or
    [B, L, C]), the source's clean latents and the noise that started the trajectory."""

    mask: Tensor
    x0_known: Tensor
    noise: Tensor


def cfg_velocity(cond: VelocityFn, uncond: VelocityFn, scale: float) -> VelocityFn:
    """True classifier-free guidance: v = v_uncond + scale (v_cond - v_uncond).
    Scale 1 returns `cond` itself (no unconditional pass)."""
    if scale == 1.0:
        return cond

    def guided(x: Tensor, t: Tensor) -> Tensor:
        v_u = uncond(x, t)
        return v_u + scale * (cond(x, t) - v_u)

    return guided


def _check_inputs(noise: Tensor, sigmas: Tensor, method: str, blend: Blend | None,
                  noise_level: float | Sequence[float]) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown sampling method {method!r}; expected one of {list(METHODS)}")
    check_sigmas(sigmas)
    levels = [noise_level] if isinstance(noise_level, (int, float)) else list(noise_level)
    if method == "sde" and not all(isinstance(a, (int, float)) and a >= 0 and math.isfinite(a) for a in levels):
        raise ValueError(f"noise_level must be a finite number >= 0 (0 = deterministic), got {noise_level!r}")
    if method == "sde" and not isinstance(noise_level, (int, float)) and len(levels) != len(sigmas) - 1:
        raise ValueError(f"noise_level gives {len(levels)} per-step levels for {len(sigmas) - 1} steps; give one "
                         "number, or one per step")
    if blend is not None:
        if blend.x0_known.shape != noise.shape or blend.noise.shape != noise.shape:
            raise ValueError(f"blend.x0_known {tuple(blend.x0_known.shape)} and blend.noise "
                             f"{tuple(blend.noise.shape)} must have the sampler state's shape {tuple(noise.shape)}")
        try:
            torch.broadcast_shapes(blend.mask.shape, noise.shape)
        except RuntimeError:
            raise ValueError(f"blend.mask {tuple(blend.mask.shape)} does not broadcast to the sampler state "
                             f"{tuple(noise.shape)}: give [B, L, 1] or [B, L, C]") from None


def _sde_sigma(t: float, t_next: float, a: float) -> float:
    """Flow-GRPO's diffusion sigma_t = a sqrt(t / (1 - t)), evaluated at t' instead of t in the
    denominator when t = 1 (where it is infinite)."""
    return a * math.sqrt(t / (1 - (t_next if t >= 1 else t)))


def sde_step_moments(t: float, t_next: float, noise_level: float) -> tuple[float, float, float]:
    """(mean_x, mean_v, std) of the "sde" step from t to t' < t: x' ~ N(mean_x x + mean_v v, std^2)
    per element, with sigma_t = `_sde_sigma`, dt = t' - t:
        mean_x = 1 + sigma_t^2 dt / (2t),  mean_v = dt (1 + sigma_t^2 (1 - t) / (2t)),  std = sigma_t sqrt(-dt)
    (Flow-GRPO's eq. 9 written in x and v). std = 0 for an Euler step (noise_level 0) and for the
    deterministic step to t' = 0, whose mean x - t v is then x0_hat."""
    if t_next <= 0 or noise_level == 0:
        return 1.0, t_next - t, 0.0
    sig = _sde_sigma(t, t_next, noise_level)
    dt = t_next - t
    return 1 + sig**2 * dt / (2 * t), dt * (1 + sig**2 * (1 - t) / (2 * t)), sig * math.sqrt(-dt)


def sample(
    velocity: VelocityFn,
    noise: Tensor,
    sigmas: Tensor,
    *,
    method: str = "euler",
    blend: Blend | None = None,
    noise_level: float | Sequence[float] = 0.7,
    generator: torch.Generator | None = None,
    return_trajectory: bool = False,
    sde_noise: Callable[[int], Tensor] | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Integrate from `noise` (the state at sigmas[0]; pure noise when sigmas[0] = 1) over `sigmas`.

    Returns x at sigmas[-1] (x0 when the schedule ends at 0), computed in float32 or wider; with
    `return_trajectory`, also the stacked states [len(sigmas), *noise.shape]. Stopping early
    (sigmas[:k + 1]) gives exactly the state after k steps of the full schedule, for all methods
    (with the same generator state for "sde"). `noise_level` and `generator` are used by "sde"
    only (the generator's device draws the noise, which then moves to x's device); `noise_level`
    may be a sequence of one level per step (a step at level 0 is an Euler step and draws no noise).
    `sde_noise(i)`, when given, returns step i's standard normal z (x's shape) instead of a draw
    from `generator`: a process of a distributed run draws the whole batch's z and keeps its rows.
    """
    _check_inputs(noise, sigmas, method, blend, noise_level)
    times = [float(s) for s in sigmas.detach().to("cpu", torch.float64)]
    levels = ([float(noise_level)] * (len(times) - 1) if isinstance(noise_level, (int, float))
              else [float(a) for a in noise_level])
    dtype = torch.promote_types(noise.dtype, torch.float32)
    x = noise.to(dtype)
    B = x.shape[0]
    traj = [x] if return_trajectory else None
    x0_prev: Tensor | None = None
    for i in range(len(times) - 1):
        t, t_next = times[i], times[i + 1]
        t_vec = torch.full((B,), t, device=x.device, dtype=torch.float32)
        v = velocity(x, t_vec).to(dtype)
        x0_hat = None if method == "euler" else x - t * v
        if method == "euler" or (method == "sde" and levels[i] == 0 and t_next > 0):
            x_next = None  # the blend kernel (or the plain update below) takes v directly
        elif t_next == 0.0:
            x_next = x0_hat
        elif method == "dpm2":
            ratio = t_next * (1 - t) / (t * (1 - t_next))  # e^-h
            d = x0_hat
            if x0_prev is not None and times[i - 1] < 1:
                lam = [math.log((1 - s) / s) for s in (times[i - 1], t, t_next)]
                r = (lam[1] - lam[0]) / (lam[2] - lam[1])
                d = (1 + 0.5 / r) * x0_hat - (0.5 / r) * x0_prev
            x_next = (t_next / t) * x + (1 - t_next) * (1 - ratio) * d
        else:  # sde: x + dt (v + sigma_t^2 / (2t) eps_hat) + sigma_t sqrt(-dt) z, eps_hat = x + (1 - t) v
            mean_x, mean_v, std = sde_step_moments(t, t_next, levels[i])
            if sde_noise is not None:
                z = sde_noise(i).to(device=x.device, dtype=dtype)
            else:
                z = torch.randn(x.shape, generator=generator, dtype=dtype,
                                device=generator.device if generator is not None else x.device).to(x.device)
            x_next = mean_x * x + mean_v * v + std * z
        x0_prev = x0_hat
        if blend is not None:
            v_step = v if x_next is None else (x_next - x) / (t_next - t)
            t_next_vec = torch.full((B,), t_next, device=x.device, dtype=torch.float32)
            x = masked_blend_step(x, v_step, blend.mask, blend.x0_known.to(dtype), blend.noise.to(dtype),
                                  t_vec, t_next_vec)
        else:
            x = x + (t_next - t) * v if x_next is None else x_next
        if traj is not None:
            traj.append(x)
    if return_trajectory:
        return x, torch.stack(traj)
    return x


def sample_policy(
    policy: Policy,
    cond: Condition,
    *,
    sigmas: Tensor,
    method: str = "dpm2",
    blend: bool = True,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
    cfg_scale: float = 1.0,
    uncond: Condition | None = None,
    weights: dict[str, Tensor] | None = None,
    noise_level: float | Sequence[float] = 0.0,
    return_trajectory: bool = False,
    sde_noise: Callable[[int], Tensor] | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Edit with a Policy: packed latents at the end of `sigmas` (x0 when it ends at 0).

    `noise` starts the trajectory (default: `policy.initial_noise(cond, generator)`) and is also
    the noise with which `blend` re-noises the known region (`cond.blend_mask`, `cond.x0_known`).
    `cfg_scale` != 1 applies true CFG against `uncond` (the same edits encoded with the negative
    prompt); `weights` evaluates the policy with that weight set (e.g. the old policy's or EMA's).
    `sde_noise` is `sample`'s (step i's z instead of a draw from `generator`).
    """
    if cfg_scale != 1.0 and uncond is None:
        raise ValueError(f"cfg_scale={cfg_scale} needs `uncond`: the same batch encoded with the negative "
                         "prompt (policy.encode(images, masks, [negative_prompt] * B))")
    if noise is None:
        noise = policy.initial_noise(cond, generator)
    if noise.shape != cond.x0_known.shape:
        raise ValueError(f"noise {tuple(noise.shape)} must match the condition's latents {tuple(cond.x0_known.shape)}")

    def v_cond(x: Tensor, t: Tensor) -> Tensor:
        return policy.velocity(x, t, cond, weights=weights)

    def v_uncond(x: Tensor, t: Tensor) -> Tensor:
        return policy.velocity(x, t, uncond, weights=weights)

    velocity = cfg_velocity(v_cond, v_uncond, cfg_scale)
    mix = Blend(cond.blend_mask, cond.x0_known, noise) if blend else None
    return sample(velocity, noise, sigmas, method=method, blend=mix, noise_level=noise_level,
                  generator=generator, return_trajectory=return_trajectory, sde_noise=sde_noise)
