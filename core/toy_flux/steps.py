"""What a pretraining step is a function of, shared by the VAE's and the editor's training: a seed
derived from (seed, purpose, step) — so data and noise need no saved generator state and a run cut
into pieces replays exactly — and the learning rate at the step."""
from __future__ import annotations

import hashlib
import math


def step_seed(*parts: object) -> int:
    """A 62-bit seed from any parts (stable across processes and Python versions, unlike hash())."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**62 - 1)


def warmup_cosine(step: int, *, lr: float, warmup: int, steps: int, min_lr_ratio: float,
                  constant: bool = False) -> float:
    """Linear warm-up over `warmup` steps, then constant or cosine decay to `min_lr_ratio * lr` at
    `steps` (a new `steps` on resume re-times the decay from the current step on)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if constant:
        return lr
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
