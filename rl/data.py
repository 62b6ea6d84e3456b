"""Where training conditions come from: the synthetic world, or a user's JSONL of real edits.

Both give `core.world.EditSample`s. Conditions for step s are a pure function of (seed, step), so a
resumed run and a run split over several processes see exactly the same conditions.

JSONL records (one per line; paths relative to the file):
    {"image": "img/0.png", "mask": "masks/0.png", "task": "fill", "prompt": "a red car",
     "split": "train"}            # split optional: "train" (default) or "heldout"
Images and masks are resized to data.image_size squared. Removal records may omit the prompt (the fixed removal prompt is used); extend records without a
prompt are judged without text alignment.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from core.image_io import load_image, load_mask, resize_image, resize_mask
from core.tasks import EXTEND_NO_PROMPT, REMOVAL_PROMPT, TaskMixture, check_task
from core.world import EditSample, SyntheticWorld


def step_rng(seed: int, step: int, stream: str) -> random.Random:
    return random.Random(f"{seed}/{step}/{stream}")


class WorldData:
    """Conditions from the synthetic world (with ground truth, for the rule judge and metrics)."""

    has_truth = True

    def __init__(self, mixture: dict[str, float], world_seed: int = 0, image_size: int = 64):
        self.mixture = TaskMixture(mixture)
        self.world = SyntheticWorld(size=image_size, seed=world_seed)

    def conditions(self, seed: int, step: int, n: int) -> list[EditSample]:
        rng = step_rng(seed, step, "data")
        return self.world.batch(self.mixture.sample(rng, n), rng)

    def held_out(self, task: str, n: int) -> list[EditSample]:
        return self.world.held_out(task, n)

    @property
    def tasks(self) -> list[str]:
        return list(self.mixture.probabilities)


class JsonlData:
    """Conditions from a JSONL file of real images and masks (no ground truth)."""

    has_truth = False

    def __init__(self, path: str, mixture: dict[str, float], size: int = 512):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"data JSONL not found: {self.path}")
        if size % 16:
            raise ValueError(f"data.image_size must be a multiple of 16 for packed latents, got {size}")
        self.size = size
        self.records: dict[str, dict[str, list[dict]]] = {"train": {}, "heldout": {}}
        for i, line in enumerate(self.path.read_text().splitlines()):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{self.path}:{i + 1}: not valid JSON ({e})") from None
            missing = {"image", "mask", "task"} - set(rec)
            if missing:
                raise ValueError(f"{self.path}:{i + 1}: record lacks {sorted(missing)}")
            check_task(rec["task"])
            split = rec.get("split", "train")
            if split not in self.records:
                raise ValueError(f"{self.path}:{i + 1}: split must be 'train' or 'heldout', got {split!r}")
            rec["line"] = i + 1
            self.records[split].setdefault(rec["task"], []).append(rec)
        weights = {t: w for t, w in mixture.items() if w > 0 and t in self.records["train"]}
        if not weights:
            raise ValueError(f"{self.path}: no training records for the tasks of the mixture {mixture}")
        self.mixture = TaskMixture(weights)

    def _load(self, rec: dict, key: str) -> EditSample:
        base = self.path.parent
        # one square size for every record, so conditions batch together
        image = resize_image(load_image(base / rec["image"]), (self.size, self.size))
        mask = resize_mask(load_mask(base / rec["mask"]), (self.size, self.size))
        task = rec["task"]
        prompt = rec.get("prompt") or {"removal": REMOVAL_PROMPT, "extend": EXTEND_NO_PROMPT}.get(task)
        if prompt is None:
            raise ValueError(f"{self.path}:{rec['line']}: a {task} record needs a prompt")
        return EditSample(key, task, image, mask, prompt, None, {"has_prompt": bool(rec.get("prompt"))})

    def conditions(self, seed: int, step: int, n: int) -> list[EditSample]:
        rng = step_rng(seed, step, "data")
        out = []
        for task in self.mixture.sample(rng, n):
            recs = self.records["train"][task]
            j = rng.randrange(len(recs))
            out.append(self._load(recs[j], f"train/{task}/{j}"))
        return out

    def held_out(self, task: str, n: int) -> list[EditSample]:
        recs = self.records["heldout"].get(task) or []
        return [self._load(r, f"heldout/{task}/{j}") for j, r in enumerate(recs[:n])]

    @property
    def tasks(self) -> list[str]:
        return list(self.mixture.probabilities)
