"""Sampling time grids for rectified flow: linear, statically shifted, or FLUX's resolution shift.

A schedule is a float32 tensor of num_steps + 1 times running from ~1 (noise) down to exactly 0
(data); samplers step from each time to the next. The construction is the one FluxFillPipeline and
`FlowMatchEulerDiscreteScheduler` use (tested against them):

    t_i    = 1 - i / n                            i = 0 .. n-1, then a final 0 is appended
    static:  t' = s t / (1 + (s - 1) t)           (SD3 / Qwen-Image style `shift = s`)
    dynamic: t' = e^mu / (e^mu + (1/t - 1))       (FLUX; exponential time shift with exponent 1)
             mu = base_shift + (max_shift - base_shift) (L - base_seq_len) / (max_seq_len - base_seq_len)

where L is the number of packed image tokens ((H / 16) (W / 16) for FLUX's 8x VAE and 2x2 packing).
A static shift s equals the dynamic shift with mu = log s, so both give t' = 1 at t = 1.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

#: FluxFillPipeline's defaults (the scheduler config of FLUX.1 Fill [dev])
FLUX_BASE_SEQ_LEN = 256
FLUX_MAX_SEQ_LEN = 4096
FLUX_BASE_SHIFT = 0.5
FLUX_MAX_SHIFT = 1.15


def calculate_shift(image_seq_len: int, base_seq_len: int = FLUX_BASE_SEQ_LEN,
                    max_seq_len: int = FLUX_MAX_SEQ_LEN, base_shift: float = FLUX_BASE_SHIFT,
                    max_shift: float = FLUX_MAX_SHIFT) -> float:
    """FLUX's mu: linear in the image token count through (base_seq_len, base_shift) and
    (max_seq_len, max_shift); extrapolates outside that range, as diffusers does."""
    if max_seq_len == base_seq_len:
        raise ValueError("max_seq_len must differ from base_seq_len (they define mu's slope)")
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return base_shift + slope * (image_seq_len - base_seq_len)


def image_seq_len(height: int, width: int, vae_scale_factor: int = 8) -> int:
    """Packed image tokens for a height x width image (2x2 packing after the codec's downscale)."""
    return (height // (2 * vae_scale_factor)) * (width // (2 * vae_scale_factor))


def static_shift(t: Tensor, shift: float) -> Tensor:
    """t' = s t / (1 + (s - 1) t): s > 1 spends more steps at high noise."""
    return shift * t / (1 + (shift - 1) * t)


def exponential_shift(t: Tensor, mu: float) -> Tensor:
    """t' = e^mu / (e^mu + 1/t - 1), written as e^mu t / (e^mu t + 1 - t) so that t = 0 maps to 0."""
    e = math.exp(mu)
    return e * t / (e * t + (1 - t))


def flux_sigmas(
    num_steps: int,
    *,
    image_seq_len: int | None = None,
    shift: float | None = None,
    base_seq_len: int = FLUX_BASE_SEQ_LEN,
    max_seq_len: int = FLUX_MAX_SEQ_LEN,
    base_shift: float = FLUX_BASE_SHIFT,
    max_shift: float = FLUX_MAX_SHIFT,
    device: torch.device | str | None = None,
) -> Tensor:
    """The sampling times t_0 = 1 > ... > t_n = 0 as a float32 tensor of `num_steps + 1` values.

    - neither `image_seq_len` nor `shift`: plain linear times;
    - `image_seq_len` (packed image tokens, see `image_seq_len()`): FLUX's dynamic shift, exactly
      what FluxFillPipeline uses for an image of that size;
    - `shift`: the static shift s t / (1 + (s - 1) t); `shift=1` is linear.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
    if image_seq_len is not None and shift is not None:
        raise ValueError("give either image_seq_len (FLUX's dynamic shift) or shift (a static shift), not both")
    # float64 for the maths; the scheduler works in float32, so results agree to ~1 ulp
    t = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    if image_seq_len is not None:
        if image_seq_len < 1:
            raise ValueError(f"image_seq_len must be a positive token count, got {image_seq_len}")
        t = exponential_shift(t, calculate_shift(image_seq_len, base_seq_len, max_seq_len, base_shift, max_shift))
    elif shift is not None:
        if not (shift > 0 and math.isfinite(shift)):
            raise ValueError(f"shift must be a positive finite number, got {shift!r} (1 = no shift)")
        t = static_shift(t, shift)
    t[0], t[-1] = t[0].clamp(max=1.0), 0.0
    return t.to(torch.float32).to(device)


def check_sigmas(sigmas: Tensor) -> Tensor:
    """Validate a schedule for the samplers: 1-D, finite, within [0, 1], strictly decreasing."""
    if not isinstance(sigmas, Tensor) or sigmas.dim() != 1 or sigmas.numel() < 1:
        raise ValueError("sigmas must be a 1-D tensor of times from 1 (noise) towards 0 (data), "
                         "e.g. core.sampling.schedules.flux_sigmas(num_steps)")
    s = sigmas.detach().to("cpu", torch.float64)
    if not torch.isfinite(s).all() or float(s.min()) < 0 or float(s.max()) > 1:
        raise ValueError(f"sigmas must lie in [0, 1], got values in [{float(s.min())}, {float(s.max())}]")
    if s.numel() > 1 and not bool((s[1:] < s[:-1]).all()):
        raise ValueError("sigmas must be strictly decreasing (sampling runs from t = 1 to t = 0)")
    return sigmas
