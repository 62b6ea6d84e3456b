"""Input checks of the public kernel functions: every bad input becomes a ValueError that names
the problem and the fix, raised before anything is launched (whatever the backend).

Structure (shapes, dtypes, devices, options, Python numbers) is checked on the host for free.
Values of the small per-sample / per-group tensors (r, t, weight, scores, dim_weights, sampler
times) are checked too: for CUDA tensors that costs one host sync per call, taken with a single
`tolist()` of all their min/max. The large tensors (velocities, latents, masks) are not scanned:
that would cost a full extra pass over memory; a non-finite value there shows up as a non-finite
result.
"""
from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
HUGE = float(torch.finfo(torch.float64).max)


def fail(op: str, message: str) -> None:
    raise ValueError(f"{op}: {message}")


def real(op: str, name: str, value, *, low: float = -math.inf, low_open: bool = False) -> float:
    """A finite Python number >= low (> low when low_open)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        fail(op, f"{name} must be a finite number, got {value!r}")
    if value < low or (low_open and value == low):
        fail(op, f"{name} must be {'>' if low_open else '>='} {low}, got {value!r}")
    return float(value)


def choice(op: str, name: str, value, options: tuple) -> None:
    if value not in options:
        fail(op, f"unknown {name} {value!r}; expected one of {list(options)}")


def tensor(op: str, name: str, x, *, device: torch.device | None = None, allow_bool: bool = False) -> Tensor:
    """A floating tensor (or bool when allowed), on `device` when given."""
    if not isinstance(x, Tensor):
        fail(op, f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOATS and not (allow_bool and x.dtype == torch.bool):
        kinds = "a floating (or bool)" if allow_bool else "a floating"
        fail(op, f"{name} must be {kinds} tensor (fp16, bf16, fp32 or fp64), got {x.dtype}; convert it with .float()")
    if device is not None and x.device != device:
        fail(op, f"{name} is on {x.device} but the main input is on {device}; move it with .to({str(device)!r})")
    return x


def like(op: str, name: str, x, ref: Tensor, ref_name: str) -> Tensor:
    """A tensor with exactly ref's shape, dtype and device."""
    tensor(op, name, x, device=ref.device)
    if x.shape != ref.shape:
        fail(op, f"{name} has shape {tuple(x.shape)} but {ref_name} has {tuple(ref.shape)}; they must match")
    if x.dtype != ref.dtype:
        fail(op, f"{name} is {x.dtype} but {ref_name} is {ref.dtype}; convert it with .to({ref_name}.dtype)")
    return x


def per_sample(op: str, name: str, x, B: int, device: torch.device) -> Tensor:
    """A floating tensor of shape [B] on `device`."""
    tensor(op, name, x, device=device)
    if x.shape != (B,):
        fail(op, f"{name} must have shape [B] = [{B}] (one value per sample), got {tuple(x.shape)}")
    return x


def no_grad_needed(op: str, names_values: list[tuple[str, object]]) -> None:
    if not torch.is_grad_enabled():
        return
    for name, x in names_values:
        if isinstance(x, Tensor) and x.requires_grad:
            fail(op, f"gradients with respect to {name} are not supported; pass {name}.detach()")


def value_ranges(op: str, checks: list[tuple[str, Tensor, float, float, str]]) -> None:
    """Each (name, tensor, low, high, hint): all values finite and within [low, high].

    One host round trip for all checks together (a single sync on CUDA): min and max of every
    tensor (NaN propagates through both), gathered into one small tensor. Tensors of one shape and
    dtype (the per-sample r, t, weight) take one stack and one aminmax."""
    checks = [c for c in checks if c[1] is not None and c[1].numel() > 0]
    if not checks:
        return
    xs = [c[1].detach() for c in checks]
    with torch.no_grad():
        if all(x.shape == xs[0].shape and x.dtype == xs[0].dtype for x in xs):
            lo_hi = torch.aminmax(torch.stack(xs).reshape(len(xs), -1), dim=1)
            stats = torch.stack([lo_hi.min, lo_hi.max], 1).tolist()
        else:
            pairs = [torch.aminmax(x.reshape(-1)) for x in xs]
            stats = torch.stack([torch.stack([p.min.double(), p.max.double()]) for p in pairs]).tolist()
    for (name, _, low, high, hint), (lo, hi) in zip(checks, stats):
        if not (low <= lo and hi <= high and math.isfinite(lo) and math.isfinite(hi)):
            finite = math.isfinite(lo) and math.isfinite(hi)
            what = f"values in [{lo:.6g}, {hi:.6g}]" if finite else "non-finite values"
            fail(op, f"{name} must be finite and within [{low:g}, {high:g}], got {what}{hint}")


# -- per-op checks ----------------------------------------------------------------------------------
def nft_loss_args(v_theta, v_old, v_target, r, t, *, beta, adaptive, v_ref, kl_coef, weight,
                  reduction) -> None:
    op = "nft_loss"
    choice(op, "reduction", reduction, ("mean", "none"))
    if not isinstance(adaptive, bool):
        fail(op, f"adaptive must be True or False, got {adaptive!r}")
    real(op, "beta", beta, low=0.0, low_open=True)
    real(op, "kl_coef", kl_coef, low=0.0)
    tensor(op, "v_theta", v_theta)
    if v_theta.dim() < 1 or v_theta.numel() == 0:
        fail(op, f"v_theta must be a non-empty [B, ...] tensor, got shape {tuple(v_theta.shape)}")
    like(op, "v_old", v_old, v_theta, "v_theta")
    like(op, "v_target", v_target, v_theta, "v_theta")
    B, dev = v_theta.shape[0], v_theta.device
    per_sample(op, "r", r, B, dev)
    if t is None and adaptive:
        fail(op, "adaptive=True needs t, the [B] training times of the samples; pass t or adaptive=False")
    if t is not None:
        per_sample(op, "t", t, B, dev)
    if v_ref is not None:
        like(op, "v_ref", v_ref, v_theta, "v_theta")
    elif kl_coef > 0:
        fail(op, f"kl_coef={kl_coef} needs v_ref, the reference policy's velocity; pass v_ref or kl_coef=0")
    if weight is not None:
        if reduction == "none":
            fail(op, "weight only applies to reduction='mean'; with reduction='none' weight the [B] losses yourself")
        per_sample(op, "weight", weight, B, dev)
    value_ranges(op, [
        ("r", r, 0.0, 1.0, " (r is the reward in [0, 1], e.g. group_rewards(...).r, not the advantage)"),
        ("t", t, 0.0, 1.0, " (t is the flow time of each sample)"),
        ("weight", weight, 0.0, HUGE, " (weights are >= 0; 0 drops a sample)"),
    ])


def group_rewards_args(scores, *, dim_weights, std, clip, eps, tau_mean, tau_std, rule) -> None:
    op = "group_rewards"
    choice(op, "std", std, ("group", "global"))
    choice(op, "rule", rule, ("paper", "strict"))
    real(op, "clip", clip, low=0.0, low_open=True)
    real(op, "eps", eps, low=0.0, low_open=True)
    if (tau_mean is None) != (tau_std is None):
        fail(op, "the group filter needs both tau_mean and tau_std (or neither for no filtering)")
    if tau_mean is not None:
        real(op, "tau_mean", tau_mean)
        real(op, "tau_std", tau_std)
    tensor(op, "scores", scores)
    if scores.dim() not in (2, 3) or scores.numel() == 0:
        fail(op, f"scores must be a non-empty [G, S] or [G, S, D] tensor (groups x members x dimensions), "
                 f"got shape {tuple(scores.shape)}")
    if dim_weights is not None:
        if scores.dim() != 3:
            fail(op, "dim_weights needs [G, S, D] scores; 2-D scores have a single dimension")
        tensor(op, "dim_weights", dim_weights, device=scores.device)
        if dim_weights.shape != (scores.shape[2],):
            fail(op, f"dim_weights must have shape [D] = [{scores.shape[2]}], got {tuple(dim_weights.shape)}")
    # the Triton kernel has no backward: refuse, rather than differ from the differentiable reference
    no_grad_needed(op, [("scores", scores), ("dim_weights", dim_weights)])
    value_ranges(op, [
        ("scores", scores, 0.0, 1.0, " (judge scores are in [0, 1])"),
        ("dim_weights", dim_weights, 0.0, HUGE, ""),
        ("the sum of dim_weights", None if dim_weights is None else dim_weights.sum().reshape(1),
         float(torch.finfo(torch.float64).tiny), HUGE, " (at least one dimension needs a positive weight)"),
    ])


def masked_blend_step_args(x_t, v, mask, x0_known, noise, t, t_next) -> None:
    op = "masked_blend_step"
    tensor(op, "x_t", x_t)
    if x_t.dim() < 1 or x_t.numel() == 0:
        fail(op, f"x_t must be a non-empty [B, ...] tensor, got shape {tuple(x_t.shape)}")
    like(op, "v", v, x_t, "x_t")
    like(op, "x0_known", x0_known, x_t, "x_t")
    like(op, "noise", noise, x_t, "x_t")
    tensor(op, "mask", mask, device=x_t.device, allow_bool=True)
    if mask.dim() > x_t.dim() or any(m not in (1, x) for m, x in zip(mask.shape[::-1], x_t.shape[::-1])):
        fail(op, f"mask {tuple(mask.shape)} does not broadcast to x_t {tuple(x_t.shape)}; give e.g. "
                 "[B, 1, H, W] for [B, C, H, W], or [B, L, 1] / [B, L, C] for packed [B, L, C]")
    B = x_t.shape[0]
    checks = []
    for name, a in (("t", t), ("t_next", t_next)):
        if isinstance(a, Tensor):
            tensor(op, name, a, device=x_t.device)
            if a.dim() > 1 or (a.dim() == 1 and a.shape[0] not in (1, B)):
                fail(op, f"{name} must be a number, a 0-d tensor or a [B] = [{B}] tensor, got shape {tuple(a.shape)}")
            checks.append((name, a, 0.0, 1.0, " (flow times run from 1 = noise to 0 = data)"))
        else:
            value = real(op, name, a)
            if not 0.0 <= value <= 1.0:
                fail(op, f"{name} must lie in [0, 1] (flow time), got {value!r}")
    no_grad_needed(op, [("mask", mask), ("t", t), ("t_next", t_next)])
    value_ranges(op, checks)


def _broadcast_mask(op: str, mask, ref: Tensor) -> None:
    tensor(op, "mask", mask, device=ref.device, allow_bool=True)
    if mask.dim() > ref.dim() or any(m not in (1, x) for m, x in zip(mask.shape[::-1], ref.shape[::-1])):
        fail(op, f"mask {tuple(mask.shape)} does not broadcast to v {tuple(ref.shape)}; give [B, L, C] (elementwise, "
                 "e.g. cond.blend_mask) or [B, L, 1] (per token)")


def _sde_step_args(op: str, v, x_t, x_next, mean_x, mean_v, std, mask, v_name: str) -> list:
    """The checks grpo_loss and sde_step_logprob share; returns their per-sample value checks."""
    tensor(op, v_name, v)
    if v.dim() < 1 or v.numel() == 0:
        fail(op, f"{v_name} must be a non-empty [B, ...] tensor, got shape {tuple(v.shape)}")
    like(op, "x_t", x_t, v, v_name)
    like(op, "x_next", x_next, v, v_name)
    if mask is not None:
        _broadcast_mask(op, mask, v)
    B, dev = v.shape[0], v.device
    for name, x in (("mean_x", mean_x), ("mean_v", mean_v), ("std", std)):
        per_sample(op, name, x, B, dev)
    return [
        ("mean_x", mean_x, -HUGE, HUGE, " (core.sampling.samplers.sde_step_moments gives it)"),
        ("mean_v", mean_v, -HUGE, HUGE, " (core.sampling.samplers.sde_step_moments gives it)"),
        ("std", std, float(torch.finfo(torch.float64).tiny), HUGE,
         " (the step's std must be > 0: an Euler or final step has no log-probability)"),
    ]


def sde_step_logprob_args(v, x_t, x_next, *, mean_x, mean_v, std, mask) -> None:
    op = "sde_step_logprob"
    value_ranges(op, _sde_step_args(op, v, x_t, x_next, mean_x, mean_v, std, mask, "v"))


def grpo_loss_args(v_theta, x_t, x_next, advantage, logp_old, *, mean_x, mean_v, std, mask, clip_range, v_ref,
                   kl_coef, weight, reduction, return_logp) -> None:
    op = "grpo_loss"
    choice(op, "reduction", reduction, ("mean", "none"))
    if not isinstance(return_logp, bool):
        fail(op, f"return_logp must be True or False, got {return_logp!r}")
    if real(op, "clip_range", clip_range, low=0.0) >= 1:
        fail(op, f"clip_range must be < 1 (the ratio is clipped to [1 - clip_range, 1 + clip_range]), "
                 f"got {clip_range!r}")
    real(op, "kl_coef", kl_coef, low=0.0)
    checks = _sde_step_args(op, v_theta, x_t, x_next, mean_x, mean_v, std, mask, "v_theta")
    B, dev = v_theta.shape[0], v_theta.device
    per_sample(op, "advantage", advantage, B, dev)
    if logp_old is not None:
        per_sample(op, "logp_old", logp_old, B, dev)
    if v_ref is not None:
        like(op, "v_ref", v_ref, v_theta, "v_theta")
    elif kl_coef > 0:
        fail(op, f"kl_coef={kl_coef} needs v_ref, the reference policy's velocity; pass v_ref or kl_coef=0")
    if weight is not None:
        if reduction == "none":
            fail(op, "weight only applies to reduction='mean'; with reduction='none' weight the [B] losses yourself")
        per_sample(op, "weight", weight, B, dev)
    value_ranges(op, checks + [
        ("advantage", advantage, -HUGE, HUGE, " (e.g. group_rewards(...).advantage)"),
        ("logp_old", logp_old, -HUGE, HUGE, " (the sampling policy's sde_step_logprob)"),
        ("weight", weight, 0.0, HUGE, " (weights are >= 0; 0 drops a sample)"),
    ])
