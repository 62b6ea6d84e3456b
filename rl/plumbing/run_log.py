"""What a run leaves behind while it trains: metrics.jsonl, TensorBoard scalars and images, sample
grids, and optionally the same scalars and images in a Weights & Biases run (train.tracker=wandb).
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from core.io.image_io import labeled_grid, save_image

#: Weights & Biases project of every run (the run is named after its directory)
WANDB_PROJECT = "onejudge"
#: where a run directory keeps its wandb run id, so that a resumed run continues the same wandb run
WANDB_ID_FILE = "wandb_id.txt"
TRACKERS = ("none", "wandb")


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
    """The records of a metrics.jsonl (empty when there is none)."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def require_tracker(tracker: str) -> None:
    """Raise ImportError (saying what to install) when `tracker` needs a package that is missing.

    Called before a run starts, so that a missing wandb does not surface after the model is built."""
    if tracker not in TRACKERS:
        raise ValueError(f"train.tracker must be one of {', '.join(TRACKERS)}, got {tracker!r}")
    if tracker == "wandb":
        _import_wandb()


def _import_wandb():
    try:
        import wandb
    except ImportError as err:
        raise ImportError("train.tracker=wandb needs the wandb package: pip install 'onejudge[wandb]' "
                          "(or pip install wandb), or set train.tracker=none") from err
    return wandb


def image_hwc(image: Any) -> np.ndarray:
    """An image as uint8 [H, W, 3]: from a tensor or array [3, H, W], [H, W, 3], [1, H, W] or [H, W]
    (floats in [0, 1], or uint8), or a PIL image."""
    if hasattr(image, "convert") and not isinstance(image, (Tensor, np.ndarray)):
        return np.asarray(image.convert("RGB"))
    arr = image.detach().float().cpu().numpy() if isinstance(image, Tensor) else np.asarray(image)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise ValueError(f"an image needs 2 or 3 dimensions, got shape {tuple(arr.shape)}")
    # channels-first unless the last axis is the only one that can hold channels
    if arr.shape[0] in (1, 3, 4) and not (arr.shape[-1] in (1, 3, 4) and arr.shape[0] > 4):
        arr = arr.transpose(1, 2, 0)
    if arr.dtype != np.uint8:
        arr = (np.clip(arr.astype(np.float32), 0.0, 1.0) * 255).round().astype(np.uint8)
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    return arr[..., :3]


class RunLog:
    """Appends one JSON line per step (flushed at once) and mirrors scalars and images to
    TensorBoard and, with `tracker="wandb"`, to a Weights & Biases run kept in the run directory."""

    def __init__(self, run_dir: Path, *, tensorboard: bool = True, resume_step: int | None = None,
                 tracker: str = "none", config: dict[str, Any] | None = None):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        require_tracker(tracker)
        if resume_step is not None:  # forget steps after the checkpoint: they will be redone
            kept = [m for m in read_metrics(self.path) if m.get("step", -1) <= resume_step]
            self.path.write_text("".join(json.dumps(m) + "\n" for m in kept))
        self._file = open(self.path, "a")
        self.writer = None
        self.wandb_run = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.run_dir / "tensorboard"))
        if tracker == "wandb":
            self.wandb_run = self._start_wandb(config)

    def _start_wandb(self, config: dict[str, Any] | None):
        wandb = _import_wandb()
        id_file = self.run_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else None
        run = wandb.init(project=WANDB_PROJECT, name=self.run_dir.name, id=run_id, resume="allow",
                         dir=str(self.run_dir), config=config)
        if run_id is None:
            id_file.write_text(run.id + "\n")
        # the x axis is the training step as logged, not wandb's own counter: after a resume the
        # steps since the checkpoint are redone, and wandb drops rows whose step went backwards
        run.define_metric("step")
        run.define_metric("*", step_metric="step")
        return run

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Record `metrics` of `step` (None values are left out)."""
        clean = {k: v for k, v in metrics.items() if v is not None}
        record = {"step": step, **clean}
        # strict JSON (readers other than Python refuse bare NaN): a non-finite number is logged as null
        self._file.write(json.dumps(strict_json(record), allow_nan=False, default=_json_default) + "\n")
        self._file.flush()
        scalars = {k: v for k, v in flatten(clean).items() if math.isfinite(v)}
        if self.writer is not None:
            for k, v in scalars.items():
                self.writer.add_scalar(k, v, step)
        if self.wandb_run is not None:
            self.wandb_run.log({**scalars, "step": step})

    def log_images(self, step: int, images: dict[str, Any]) -> None:
        """Record images of `step` by tag (see `image_hwc` for the forms an image may take)."""
        arrays = {tag: image_hwc(img) for tag, img in images.items()}
        if self.writer is not None:
            for tag, arr in arrays.items():
                self.writer.add_image(tag, arr, step, dataformats="HWC")
            self.writer.flush()
        if self.wandb_run is not None:
            wandb = _import_wandb()
            self.wandb_run.log({**{tag: wandb.Image(arr) for tag, arr in arrays.items()}, "step": step})

    def close(self) -> None:
        self._file.close()
        if self.writer is not None:
            self.writer.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


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


def sample_label(task: str, prompt: str) -> str:
    """A sample grid's row label: the task, then the prompt (a text row cannot be judged without it)."""
    return f'{task}\n"{prompt}"' if prompt else f"{task}\n(no prompt)"


def save_sample_grid(path: Path, sources: Tensor, masks: Tensor, columns: dict[str, Tensor], *,
                     headers: Sequence[str] | bool = True, row_labels: Sequence[str] | None = None,
                     cell_size: int = 128) -> Tensor:
    """One row per condition: source | mask | each named column (e.g. base, current); returns the grid.

    `headers=True` names the columns "source", "mask" and the keys of `columns`; `row_labels` (one
    per row, e.g. from `sample_label`) go left of the rows; cells are upscaled to about `cell_size`."""
    rows = [[sources[i], masks[i]] + [col[i] for col in columns.values()] for i in range(sources.shape[0])]
    if headers is True:
        headers = ["source", "mask", *columns]
    grid = labeled_grid(rows, headers=list(headers) if headers else None,
                        row_labels=None if row_labels is None else list(row_labels), cell_size=cell_size)
    save_image(grid, path)
    return grid
