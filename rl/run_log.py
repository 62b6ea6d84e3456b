"""What a run leaves behind while it trains: metrics.jsonl, TensorBoard scalars, sample grids."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from torch import Tensor

from core.image_io import image_grid, save_image


def flatten(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """{"reward_by_task": {"fill": 0.5}} -> {"reward_by_task/fill": 0.5}; drops non-numbers."""
    out: dict[str, float] = {}
    for k, v in metrics.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "/"))
        elif isinstance(v, bool):
            out[key] = float(v)
        elif isinstance(v, (int, float)) and v is not None:
            out[key] = float(v)
    return out


def read_metrics(path: Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class RunLog:
    """Appends one JSON line per step (flushed at once) and mirrors scalars to TensorBoard."""

    def __init__(self, run_dir: Path, *, tensorboard: bool = True, resume_step: int | None = None):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        if resume_step is not None:  # forget steps after the checkpoint: they will be redone
            kept = [m for m in read_metrics(self.path) if m.get("step", -1) <= resume_step]
            self.path.write_text("".join(json.dumps(m) + "\n" for m in kept))
        self._file = open(self.path, "a")
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.run_dir / "tensorboard"))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        clean = {k: v for k, v in metrics.items() if v is not None}
        record = {"step": step, **clean}
        # strict JSON (readers other than Python refuse bare NaN): a non-finite number is logged as null
        self._file.write(json.dumps(strict_json(record), allow_nan=False, default=_json_default) + "\n")
        self._file.flush()
        if self.writer is not None:
            for k, v in flatten(clean).items():
                if math.isfinite(v):
                    self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        self._file.close()
        if self.writer is not None:
            self.writer.close()


def strict_json(value: Any) -> Any:
    """`value` with every NaN / infinity (also inside dicts, lists and tensors) replaced by None."""
    if isinstance(value, Tensor):
        value = value.tolist()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def _json_default(o: Any) -> Any:
    if isinstance(o, Tensor):
        return o.tolist()
    raise TypeError(f"cannot log {type(o).__name__}")


def save_sample_grid(path: Path, sources: Tensor, masks: Tensor, columns: dict[str, Tensor]) -> None:
    """One row per condition: source | mask | each named column (e.g. base, current)."""
    rows = [[sources[i], masks[i]] + [col[i] for col in columns.values()] for i in range(sources.shape[0])]
    save_image(image_grid(rows), path)
