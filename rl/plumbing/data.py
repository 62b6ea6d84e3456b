"""Where training conditions come from: the synthetic world, or a user's JSONL of real edits.

Both give `core.synthetic.world.EditSample`s. Conditions for step s are a pure function of (seed, step), so a
resumed run and a run split over several processes see exactly the same conditions.

JSONL records (one per line; paths relative to the file):
    {"image": "img/0.png", "mask": "masks/0.png", "task": "fill", "prompt": "a red car",
     "split": "train"}            # split optional: "train" (default) or "heldout"
    {"image": "img/1.png", "task": "recolour", "prompt": "make the car blue"}   # an instruction edit
Images and masks are resized to data.image_size squared. Removal records may omit the prompt (the
fixed removal prompt is used); extend records without a prompt are judged without text alignment.
Instruction records (core.tasks.INSTRUCTION_TASKS, for instruction editors such as FLUX.1 Kontext
or Qwen-Image-Edit) give an image and the instruction as prompt, and no mask.
Every record is checked when the data is built; JsonlData's docstring lists the rules.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import torch
from torch import Tensor

from core.io.image_io import load_image, load_mask, resize_image, resize_mask
from core.synthetic.instruction_world import InstructionWorld
from core.synthetic.world import EditSample
from core.tasks import (
    ALL_TASKS,
    EXTEND_NO_PROMPT,
    INSTRUCTION_TASKS,
    REMOVAL_PROMPT,
    TaskMixture,
    check_task,
)

# tasks that may come without a prompt, and the prompt they then get
_DEFAULT_PROMPTS = {"removal": REMOVAL_PROMPT, "extend": EXTEND_NO_PROMPT}
_MAX_REPORTED = 20  # bad records listed in full; the rest are counted


def step_rng(seed: int, step: int, stream: str) -> random.Random:
    return random.Random(f"{seed}/{step}/{stream}")


class WorldData:
    """Conditions from the synthetic world (with ground truth, for the rule judge and metrics): its
    mask-guided tasks and its instruction tasks (core.synthetic.instruction_world.InstructionWorld, whose
    mask-guided samples are core.synthetic.world.SyntheticWorld's bit for bit)."""

    has_truth = True

    def __init__(self, mixture: dict[str, float], world_seed: int = 0, image_size: int = 64, *,
                 balanced: bool = False):
        self.mixture, self.balanced = TaskMixture(mixture), balanced
        self.world = InstructionWorld(size=image_size, seed=world_seed)

    def conditions(self, seed: int, step: int, n: int) -> list[EditSample]:
        rng = step_rng(seed, step, "data")
        return self.world.batch(self.mixture.sample(rng, n, balanced=self.balanced), rng)

    def held_out(self, task: str, n: int) -> list[EditSample]:
        return self.world.held_out(task, n)

    @property
    def tasks(self) -> list[str]:
        return list(self.mixture.probabilities)


class JsonlData:
    """Conditions from a JSONL file of real images and masks, or images and instructions (no ground truth).

    Every record is checked when the data is built, so a bad file fails before training starts,
    not at the step that first draws the bad record. All problems are collected and raised as one
    ValueError listing each bad record as `file:line: problem` (the first 20, then a count).
    A record is refused when:

    - it is not a JSON object, lacks "image" or "task", has an unknown task or a split other than
      "train" / "heldout";
    - a mask-guided record (core.tasks.TASKS) lacks "mask"; an instruction record
      (core.tasks.INSTRUCTION_TASKS) has one: instruction editors take no mask;
    - a fill, text or instruction record has no prompt (removal uses the fixed removal prompt,
      extend without a prompt is judged without text alignment; an instruction record's prompt is
      its instruction); a prompt of only whitespace counts as none;
    - its image or mask path leaves the folder of the JSONL file ("../x.png", or an absolute path
      elsewhere), unless `allow_outside=True`. The check is on the path as written, made absolute
      against the folder; symbolic links inside the folder are followed, since whoever owns the
      folder put them there;
    - the image or mask file is missing or does not decode;
    - image and mask differ in aspect ratio. A mask should have the image's size; an exactly
      scaled one (a 256x192 mask for a 1024x768 image) is accepted, anything else, even one pixel
      off, is refused rather than stretched onto the image;
    - the mask is not binary: a pixel > 0.5 (grey 128 of 255) marks the region to generate, and
      the mask is refused when more than 2% of its pixels are strictly between 0.02 and 0.98
      (a soft or photographic mask; anti-aliased edges pass). This is `core.masks.validate_mask`
      as `core.io.image_io.load_mask` calls it. RGBA and LA masks are read from their alpha channel;
    - the mask is empty, at its own size or after the nearest-neighbour resize to the training
      size (a thin stroke can vanish). A mask of all ones is legal: "generate everything".

    Image and mask are then resized together to `size` x `size`: a non-square pair is squashed to
    a square (both the same way, so they stay aligned). Crop to square beforehand to keep the
    aspect ratio. An instruction record's image is resized the same way, and its sample's mask is
    all ones at that size: the whole image may change (the instruction editors ignore masks, and
    with no ground truth no metric or judge reads it as the region that should change).

    Every image and mask is decoded once, here, and kept resized: images as uint8 [3, size, size]
    (what 8-bit files hold; a resized image is rounded to the nearest grey level, within 1/510 of
    the float resize, and an image already at `size` is exact), masks as bool [1, size, size]
    (one shared all-ones mask for every instruction record).
    That is 1 MiB per record at 512 px, so a few thousand records fit in memory; per process, as
    every data-parallel rank builds its own copy. A much larger dataset would need lazy loading
    with the checks run once ahead, which this class does not do. Train records of tasks whose
    mixture weight is zero are checked, but their pixels are not kept.
    """

    has_truth = False

    def __init__(self, path: str, mixture: dict[str, float], size: int = 512, *, allow_outside: bool = False,
                 balanced: bool = False):
        self.path, self.balanced = Path(path), balanced
        if not self.path.is_file():
            raise FileNotFoundError(f"data JSONL not found: {self.path}")
        if size % 16:
            raise ValueError(f"data.image_size must be a multiple of 16 for packed latents, got {size}")
        self.size = size
        self.allow_outside = allow_outside
        self._whole = torch.ones(1, size, size, dtype=torch.bool)  # every instruction record's mask
        self.records: dict[str, dict[str, list[dict]]] = {"train": {}, "heldout": {}}
        # line number -> (image uint8 [3,S,S], mask bool [1,S,S])
        self._pixels: dict[int, tuple[Tensor, Tensor]] = {}
        problems: dict[int, list[str]] = {}
        # split on "\n" only: str.splitlines also breaks at U+2028 and other separators that
        # json.dumps(ensure_ascii=False) leaves inside strings, which would shift line numbers
        for i, line in enumerate(self.path.read_text(encoding="utf-8").split("\n")):
            if not line.strip():
                continue
            rec, errs = self._check(line, i + 1)
            if errs:
                problems[i + 1] = errs
            else:
                self.records[rec["split"]].setdefault(rec["task"], []).append(rec)
        if problems:
            raise ValueError(self._report(problems))
        weights = {t: w for t, w in mixture.items() if w > 0 and t in self.records["train"]}
        if not weights:
            raise ValueError(f"{self.path}: no training records for the tasks of the mixture {mixture}")
        self.mixture = TaskMixture(weights)
        for task, recs in self.records["train"].items():
            if task not in weights:
                for rec in recs:
                    del self._pixels[rec["line"]]

    def _check(self, line: str, n: int) -> tuple[dict, list[str]]:
        """Parse, check and decode one record; returns it (with line, split, prompt) and its problems."""
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            return {}, [f"not valid JSON ({e})"]
        if not isinstance(rec, dict):
            return {}, [f"a record must be a JSON object, got {type(rec).__name__}"]
        errs: list[str] = []
        task = rec.get("task")
        if "task" in rec:
            try:
                check_task(task)
            except (ValueError, TypeError):  # TypeError: a list or object is no dict key
                errs.append(f"unknown task {task!r}; expected one of {list(ALL_TASKS)}")
                task = None
        instruction = task in INSTRUCTION_TASKS
        missing = ({"image", "task"} if instruction else {"image", "mask", "task"}) - set(rec)
        if missing:
            errs.append(f"record lacks {sorted(missing)}")
        if instruction and "mask" in rec:
            errs.append(f"a {task} record is an instruction edit and takes no mask (instruction editors "
                        "generate the whole image); drop its \"mask\"")
        split = rec.get("split", "train")
        if split not in ("train", "heldout"):
            errs.append(f"split must be 'train' or 'heldout', got {split!r}")
        prompt = rec.get("prompt")
        if prompt is not None and not isinstance(prompt, str):
            errs.append(f"prompt must be a string, got {type(prompt).__name__}")
            prompt = None
        has_prompt = bool(prompt and prompt.strip())
        if task is not None and not has_prompt and task not in _DEFAULT_PROMPTS:
            errs.append(f"a {task} record needs a prompt" + " (its instruction)" * instruction)
        paths = {}
        for key in ("image",) if instruction else ("image", "mask"):
            if key in rec:
                p, err = self._resolve(rec[key], key)
                if err:
                    errs.append(err)
                else:
                    paths[key] = p
        image = mask = None
        if "image" in paths:
            try:
                image = load_image(paths["image"])
            except Exception as e:  # any decoder failure is this record's problem, listed with the rest
                errs.append(f"image {rec['image']!r}: {_reason(e)}")
        if "mask" in paths:
            try:
                mask = load_mask(paths["mask"])
            except Exception as e:
                errs.append(f"mask {rec['mask']!r}: {_reason(e)}")
        if image is not None and mask is not None:
            (h, w), (mh, mw) = image.shape[-2:], mask.shape[-2:]
            if h * mw != mh * w:
                errs.append(f"mask {rec['mask']!r} is {mw}x{mh} but image {rec['image']!r} is {w}x{h}: "
                            "give the mask the image's size (or exactly its aspect ratio)")
            else:
                mask = resize_mask(mask, (self.size, self.size))
                if not bool(mask.any()):
                    errs.append(f"mask {rec['mask']!r} is empty after resizing to {self.size}x{self.size} "
                                "(its region is thinner than one pixel at the training size)")
        if errs:
            return rec, errs
        # one square size for every record, so conditions batch together
        image = resize_image(image, (self.size, self.size))
        self._pixels[n] = ((image * 255).round().to(torch.uint8), self._whole if instruction else mask > 0.5)
        rec = dict(rec, line=n, split=split, has_prompt=has_prompt,
                   prompt=prompt if has_prompt else _DEFAULT_PROMPTS[task])
        return rec, []

    def _resolve(self, value, key: str) -> tuple[Path | None, str | None]:
        if not isinstance(value, str) or not value.strip():
            return None, f"{key} must be a non-empty path string, got {value!r}"
        base = self.path.parent.absolute()
        # normpath, not resolve(): ".." is judged as written, and symlinks in the folder stay allowed
        full = Path(os.path.normpath(base / value))
        if not self.allow_outside and not full.is_relative_to(os.path.normpath(base)):
            return None, (f"{key} path {value!r} leaves the data folder {base}; keep files under it "
                          "or allow paths outside it (data.allow_absolute_paths)")
        return full, None

    def _report(self, problems: dict[int, list[str]]) -> str:
        lines = [f"{self.path}:{n}: " + "; ".join(errs) for n, errs in list(problems.items())[:_MAX_REPORTED]]
        if len(problems) > _MAX_REPORTED:
            lines.append(f"... and {len(problems) - _MAX_REPORTED} more bad records")
        head = f"{self.path}: {len(problems)} bad record{'s' * (len(problems) != 1)}; fix or remove them:"
        return "\n".join([head, *lines])

    def _sample(self, rec: dict, key: str) -> EditSample:
        image, mask = self._pixels[rec["line"]]
        # fresh float tensors, so a caller that edits a sample in place cannot change the cache
        return EditSample(key, rec["task"], image.float() / 255, mask.float(), rec["prompt"], None,
                          {"has_prompt": rec["has_prompt"]})

    def conditions(self, seed: int, step: int, n: int) -> list[EditSample]:
        rng = step_rng(seed, step, "data")
        out = []
        for task in self.mixture.sample(rng, n, balanced=self.balanced):
            recs = self.records["train"][task]
            j = rng.randrange(len(recs))
            out.append(self._sample(recs[j], f"train/{task}/{j}"))
        return out

    def held_out(self, task: str, n: int) -> list[EditSample]:
        recs = self.records["heldout"].get(task) or []
        return [self._sample(r, f"heldout/{task}/{j}") for j, r in enumerate(recs[:n])]

    @property
    def tasks(self) -> list[str]:
        return list(self.mixture.probabilities)


def _reason(e: Exception) -> str:
    if isinstance(e, FileNotFoundError):
        return "file not found"
    if isinstance(e, ValueError):  # load_mask's own checks already name the fix
        return str(e)
    return f"does not decode ({type(e).__name__}: {e})"

