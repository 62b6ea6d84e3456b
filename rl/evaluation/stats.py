"""Bootstrap intervals for means and paired differences (evaluation reports and run summaries)."""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor


@dataclasses.dataclass
class Interval:
    mean: float
    low: float
    high: float
    n: int

    def as_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "low": self.low, "high": self.high, "n": self.n}

    def __str__(self) -> str:
        return f"{self.mean:+.3f} [{self.low:+.3f}, {self.high:+.3f}]"


def bootstrap_mean(values: Tensor | list[float], *, n_boot: int = 2000, level: float = 0.95,
                   seed: int = 0) -> Interval:
    """Percentile bootstrap interval of the mean (paired differences: pass the differences)."""
    v = torch.as_tensor(values, dtype=torch.float64).flatten()
    if v.numel() == 0:
        raise ValueError("bootstrap of an empty sample")
    if v.numel() == 1:
        x = float(v[0])
        return Interval(x, x, x, 1)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, v.numel(), (n_boot, v.numel()), generator=g)
    means = v[idx].mean(1)
    lo, hi = torch.quantile(means, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64))
    return Interval(float(v.mean()), float(lo), float(hi), v.numel())
