"""Learning-rate factor of a step: linear warm-up, then constant, cosine or linear decay.

Used by the RL trainers (optim.decay). The factor depends on
the step index alone, so a resumed run sets the same rate an uninterrupted one would have.
"""
from __future__ import annotations

import math

DECAYS = ("constant", "cosine", "linear")


def lr_factor(step: int, total: int, warmup: int = 0, decay: str = "constant", min_ratio: float = 0.0) -> float:
    """Multiplier of the base rate at `step` (0-based) of `total`: (step + 1) / warmup during the
    warm-up, then 1 (constant) or a decay from 1 at the warm-up's end to `min_ratio` at the last
    step (total - 1), so the final update is made at the floor."""
    if decay not in DECAYS:
        raise ValueError(f"unknown lr decay {decay!r}; choose one of {DECAYS}")
    if step < warmup:
        return (step + 1) / warmup
    if decay == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - 1 - warmup))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if decay == "cosine" else 1.0 - progress
    return min_ratio + (1.0 - min_ratio) * shape
