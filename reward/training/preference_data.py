"""Pairwise preference data for training a judge (OneReward section 4.3), one JSON object per line.

A record says: for this edit (source image, mask, prompt, task), the `winner` image is better than
the `loser` image on each of the listed dimensions.

    {"source": "img/0001.png", "mask": "img/0001_mask.png", "prompt": "a red circle",
     "task": "fill", "dimensions": ["text_alignment", "structure"],
     "winner": "img/0001_b.png", "loser": "img/0001_c.png", "split": "train"}

- `source`, `mask`, `winner`, `loser`: image paths, relative to the JSONL file's folder (or
  absolute). The mask is white (1) where the editor generated; all four share one size.
- `task`: one of core.tasks.TASKS; `dimensions`: a non-empty list of that task's dimensions
  (a single `"dimension": "..."` string is accepted instead).
- `prompt`: the instruction ("" when there is none); shown to the judge only for text dimensions.
- `split` (optional): "train" or "heldout". When no record has one, the trainer splits at random.
- `id` (optional): any string, for your bookkeeping.

OneReward's annotators picked the best and the worst of four candidates per dimension, so one
pair can carry several dimensions (the same image may win one and lose another in other pairs).
Any other key is an error, as is a missing file.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from torch import Tensor

from core.io.image_io import load_image, load_mask
from core.tasks import TASK_DIMENSIONS, TASKS

SPLITS = ("train", "heldout")
_REQUIRED = ("source", "mask", "prompt", "task", "winner", "loser")
_OPTIONAL = ("dimensions", "dimension", "split", "id")
_IMAGES = ("source", "mask", "winner", "loser")


@dataclasses.dataclass(frozen=True)
class PreferenceRecord:
    """One validated line: paths are resolved, dimensions checked against the task."""

    source: Path
    mask: Path
    prompt: str
    task: str
    dimensions: tuple[str, ...]
    winner: Path
    loser: Path
    split: str | None = None
    id: str | None = None
    where: str = ""          # "file:line", for error messages

    def to_json(self, root: Path) -> dict[str, Any]:
        def rel(p: Path) -> str:
            try:
                return p.relative_to(root).as_posix()
            except ValueError:
                return str(p)

        out: dict[str, Any] = {"source": rel(self.source), "mask": rel(self.mask), "prompt": self.prompt,
                               "task": self.task, "dimensions": list(self.dimensions),
                               "winner": rel(self.winner), "loser": rel(self.loser)}
        if self.split is not None:
            out["split"] = self.split
        if self.id is not None:
            out["id"] = self.id
        return out


@dataclasses.dataclass
class PreferencePair:
    """A record with its images loaded: [3, H, W] images in [0, 1] and the [1, H, W] mask."""

    record: PreferenceRecord
    source: Tensor
    mask: Tensor
    winner: Tensor
    loser: Tensor


def parse_record(obj: Any, root: Path, where: str) -> PreferenceRecord:
    """Validate one decoded JSON object; paths are resolved against `root`."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: a preference record must be a JSON object, got {type(obj).__name__}")
    missing = [k for k in _REQUIRED if k not in obj]
    unknown = sorted(set(obj) - set(_REQUIRED) - set(_OPTIONAL))
    if missing or unknown:
        raise ValueError(f"{where}: missing key(s) {missing}, unknown key(s) {unknown}; a record has "
                         f"{list(_REQUIRED)} plus 'dimensions' (list) and optionally 'split', 'id'")
    task = obj["task"]
    if task not in TASK_DIMENSIONS:
        raise ValueError(f"{where}: unknown task {task!r}; expected one of {list(TASKS)}")
    if ("dimensions" in obj) == ("dimension" in obj):
        raise ValueError(f"{where}: give exactly one of 'dimensions' (a list) or 'dimension' (a string)")
    dims = obj["dimensions"] if "dimensions" in obj else [obj["dimension"]]
    if isinstance(dims, str) or not isinstance(dims, list) or not dims:
        raise ValueError(f"{where}: 'dimensions' must be a non-empty list of dimension names")
    bad = [d for d in dims if d not in TASK_DIMENSIONS[task]]
    if bad or len(set(dims)) != len(dims):
        raise ValueError(f"{where}: dimension(s) {bad or dims} are not (distinct) dimensions of task {task!r}; "
                         f"it has {list(TASK_DIMENSIONS[task])}")
    if not isinstance(obj["prompt"], str):
        raise ValueError(f"{where}: 'prompt' must be a string (use \"\" for none)")
    split = obj.get("split")
    if split is not None and split not in SPLITS:
        raise ValueError(f"{where}: split must be one of {list(SPLITS)}, got {split!r}")
    paths = {}
    for key in _IMAGES:
        if not isinstance(obj[key], str) or not obj[key]:
            raise ValueError(f"{where}: {key!r} must be an image path")
        p = Path(obj[key])
        p = p if p.is_absolute() else root / p
        if not p.is_file():
            raise ValueError(f"{where}: {key} image not found: {p}")
        paths[key] = p
    if paths["winner"] == paths["loser"]:
        raise ValueError(f"{where}: winner and loser are the same file {paths['winner']}")
    return PreferenceRecord(paths["source"], paths["mask"], obj["prompt"], task, tuple(dims), paths["winner"],
                            paths["loser"], split, None if obj.get("id") is None else str(obj["id"]), where)


def read_preferences(path: str | os.PathLike) -> list[PreferenceRecord]:
    """Read and validate a preference JSONL file (blank lines are skipped)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"preference data file not found: {path}")
    records = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not valid JSON ({err})") from err
            records.append(parse_record(obj, path.parent, where))
    if not records:
        raise ValueError(f"{path} holds no preference records")
    return records


def write_preferences(path: str | os.PathLike, records: list[PreferenceRecord]) -> Path:
    """Write records as JSONL, with image paths relative to the file's folder where possible."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    root = path.parent.resolve()
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            resolved = dataclasses.replace(r, **{k: getattr(r, k).resolve() for k in _IMAGES})
            f.write(json.dumps(resolved.to_json(root)) + "\n")
    return path


def load_pair(record: PreferenceRecord) -> PreferencePair:
    """Load a record's images; all four must share one size."""
    source = load_image(record.source)
    winner, loser = load_image(record.winner), load_image(record.loser)
    for name, img in (("winner", winner), ("loser", loser)):
        if img.shape != source.shape:
            raise ValueError(f"{record.where}: {name} image is {tuple(img.shape[1:])} but the source is "
                             f"{tuple(source.shape[1:])}; all images of a record must share one size")
    try:
        mask = load_mask(record.mask, source)
    except ValueError as err:
        raise ValueError(f"{record.where}: {err}") from err
    return PreferencePair(record, source, mask, winner, loser)
