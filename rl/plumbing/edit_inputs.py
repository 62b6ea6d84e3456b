"""What `rl.edit` is given, checked before any model loads: images, masks, prompts, tasks, and
JSONL records of edits. Every problem is an EditError naming it and the fix.

Two kinds of model. A mask-guided editor (FLUX.1 Fill) needs a mask per image and takes the tasks
of core.tasks.TASKS (the task only chooses a default prompt). An instruction editor (FLUX.1
Kontext, Qwen-Image-Edit: rl.plumbing.config.INSTRUCTION_KINDS) takes no mask (the whole image is
generated from the source and the instruction; internally the mask is all ones), needs a prompt,
and takes no task or one of core.tasks.INSTRUCTION_TASKS. `instruction=True` selects the second."""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from core.io.image_io import load_image, load_mask, resize_image, resize_mask, to_tensor
from core.masks import validate_mask
from core.tasks import EXTEND_NO_PROMPT, INSTRUCTION_TASKS, REMOVAL_PROMPT, TASKS

#: what an image or mask may be given as: a path, a PIL image or a float tensor ([3,H,W] / [1,H,W])
ImageLike = Union[str, os.PathLike, Image.Image, Tensor]

METHODS = ("euler", "dpm2")
#: the task of a mask-guided edit when none is given
DEFAULT_TASK = "fill"
#: the example instruction error messages show
EXAMPLE_INSTRUCTION = "make the red circle blue"
_INSTRUCTION_KINDS_TEXT = "model.kind tiny_kontext, flux_kontext or qwen_image_edit"
_DEFAULT_PROMPTS = {"removal": REMOVAL_PROMPT, "extend": EXTEND_NO_PROMPT}


class EditError(ValueError):
    """Bad input to an edit; the message names the problem and the fix."""


@dataclasses.dataclass
class PreparedEdit:
    """One checked edit: the source at its own size and at the model's, and both masks (all ones
    for an instruction editor, which generates the whole image)."""

    source: Tensor        # [3, H, W] as given
    mask_full: Tensor     # [1, H, W] binary, at the source's size
    image: Tensor         # [3, h, w] at the working resolution
    mask: Tensor          # [1, h, w] binary at the working resolution
    task: str | None      # None: an instruction edit given no task
    prompt: str


def _describe(obj: object) -> str:
    if isinstance(obj, (str, os.PathLike)):
        return str(obj)
    if isinstance(obj, Image.Image):
        return f"PIL image {obj.size[0]}x{obj.size[1]}"
    if isinstance(obj, Tensor):
        return f"tensor {tuple(obj.shape)}"
    return type(obj).__name__


def as_list(value, n: int | None, what: str) -> list:
    """A per-item list from one value (shared by all) or a sequence (one per item)."""
    if isinstance(value, (list, tuple)):
        if n is not None and len(value) != n:
            raise EditError(f"{len(value)} {what} for {n} images: give one per image (or one for all)")
        return list(value)
    return [value] * (1 if n is None else n)


def _image_tensor(obj: ImageLike, name: str) -> Tensor:
    if isinstance(obj, Tensor):
        img = obj[0] if obj.dim() == 4 and obj.shape[0] == 1 else obj
        if img.dim() != 3 or img.shape[0] != 3:
            raise EditError(f"{name} must be a [3, H, W] tensor in [0, 1], got {tuple(obj.shape)}")
        img = img.detach().float().cpu()
        lo, hi = float(img.min()), float(img.max())
        if not (lo >= 0 and hi <= 1):
            raise EditError(f"{name} values must lie in [0, 1], got [{lo:.3g}, {hi:.3g}]: divide 8-bit values by 255")
        return img
    if isinstance(obj, Image.Image):
        return to_tensor(obj)
    if isinstance(obj, (str, os.PathLike)):
        if not Path(obj).is_file():
            raise EditError(f"{name} file not found: {obj}; check the path")
        try:
            return load_image(obj)
        except Exception as e:  # any decoder failure is the file's problem
            raise EditError(f"{name} {obj} does not decode ({type(e).__name__}: {e}); "
                            "give a PNG or JPEG file") from None
    raise EditError(f"{name} must be a path, a PIL image or a tensor, got {type(obj).__name__}")


def _mask_tensor(obj: ImageLike, name: str) -> Tensor:
    """A binary [1, H, W] mask (1 = generate), read the way core.io.image_io.load_mask reads files."""
    if isinstance(obj, (str, os.PathLike)):
        if not Path(obj).is_file():
            raise EditError(f"{name} file not found: {obj}; check the path")
        try:
            return load_mask(obj)
        except ValueError as e:  # load_mask's checks already name the fix
            raise EditError(f"{name} {obj}: {e}") from None
        except Exception as e:
            raise EditError(f"{name} {obj} does not decode ({type(e).__name__}: {e}); give a PNG file") from None
    if isinstance(obj, Image.Image):
        img = obj.getchannel("A") if obj.mode in ("RGBA", "LA") else obj
        mask = torch.from_numpy(np.asarray(img.convert("L"), dtype=np.float32) / 255.0)[None]
    elif isinstance(obj, Tensor):
        mask = obj.detach().float().cpu()
        mask = mask[None] if mask.dim() == 2 else mask
        if mask.dim() == 4 and mask.shape[0] == 1:
            mask = mask[0]
    else:
        raise EditError(f"{name} must be a path, a PIL image or a tensor, got {type(obj).__name__}")
    try:
        return validate_mask(mask, name=name)
    except ValueError as e:
        raise EditError(str(e)) from None


def task_for(task: str | None, where: str = "", instruction: bool = False) -> str | None:
    """The task of an edit: `task` checked against the model's kind (None: DEFAULT_TASK for a
    mask-guided model, None for an instruction editor, which needs none)."""
    if task is None:
        return None if instruction else DEFAULT_TASK
    if instruction:
        if task in INSTRUCTION_TASKS:
            return task
        if task in TASKS:
            raise EditError(f"{where}task {task!r} is a mask-guided task, but this model is an instruction editor "
                            "(no mask: it edits from the prompt alone): drop --task, or give one of "
                            f"{', '.join(INSTRUCTION_TASKS)}")
        raise EditError(f"{where}unknown task {task!r}; an instruction editor needs none (drop --task) "
                        f"or takes one of {', '.join(INSTRUCTION_TASKS)}")
    if task in INSTRUCTION_TASKS:
        raise EditError(f"{where}task {task!r} is an instruction task, but this model is mask-guided (it edits "
                        f"inside a mask): give one of {', '.join(TASKS)}, or use an instruction editor "
                        f"({_INSTRUCTION_KINDS_TEXT})")
    if task not in TASKS:
        raise EditError(f"{where}unknown task {task!r}; expected one of {', '.join(TASKS)}")
    return task


def prompt_for(task: str | None, prompt: str | None, where: str, instruction: bool = False) -> str:
    """The prompt of an edit: `prompt`, else the task's default (removal, extend); EditError when
    the edit needs one (every instruction edit does)."""
    task = task_for(task, where, instruction)
    if prompt is not None and not isinstance(prompt, str):
        raise EditError(f"{where}the prompt must be a string, got {type(prompt).__name__}")
    if prompt and prompt.strip():
        return prompt
    if instruction:
        raise EditError(f"{where}an instruction editor needs a prompt saying what to change "
                        f"(--prompt \"{EXAMPLE_INSTRUCTION}\")")
    if task in _DEFAULT_PROMPTS:
        return _DEFAULT_PROMPTS[task]
    raise EditError(f"{where}a {task} edit needs a prompt saying what to "
                    f"{'write' if task == 'text' else 'generate'} (--prompt \"...\"); "
                    "only removal and extend have a default")


def check_sampler(steps: int | None = None, method: str | None = None, shift: float | None = None) -> None:
    """Raise EditError for a step count, sampler or shift the samplers would refuse."""
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise EditError(f"steps must be a positive integer, got {steps!r}")
    if method is not None and method not in METHODS:
        raise EditError(f"unknown sampler {method!r}; expected one of {', '.join(METHODS)}")
    if shift is not None and not (isinstance(shift, (int, float)) and 0 < shift < float("inf")):
        raise EditError(f"shift must be a positive number (1 = no shift), got {shift!r}")


def no_mask_error(where: str = "") -> EditError:
    return EditError(f"{where}instruction editors take no mask (the whole image is generated from the source and "
                     "the prompt): drop --mask (and the records' \"mask\")")


def missing_mask_error(where: str = "") -> EditError:
    return EditError(f"{where}this model is mask-guided and needs a mask (--mask MASK.png: white = generate, "
                     f"black = keep); only instruction editors ({_INSTRUCTION_KINDS_TEXT}) edit without one")


def prepare(images: Sequence[ImageLike], masks: Sequence[ImageLike | None], prompts: Sequence[str | None],
            tasks: Sequence[str | None], size: tuple[int, int] | None, *,
            instruction: bool = False) -> list[PreparedEdit]:
    """Check and load every edit, resized to `size` (h, w); raises EditError on the first bad one.

    `size=None` checks without knowing the model: no resize, so a mask that only vanishes at the
    model's resolution passes here and is caught by the model's Editor. `instruction`: the model
    is an instruction editor: every mask must be None (the edit gets a mask of ones), every edit
    needs a prompt, and a task is optional (one of core.tasks.INSTRUCTION_TASKS)."""
    if not (len(images) == len(masks) == len(prompts) == len(tasks)):
        raise EditError(f"{len(images)} images, {len(masks)} masks, {len(prompts)} prompts and {len(tasks)} "
                        "tasks: give one mask, prompt and task per image (or one prompt and task for all)")
    if not images:
        raise EditError("no images to edit")
    out = []
    for i, (img, msk, prompt, task) in enumerate(zip(images, masks, prompts, tasks)):
        where = "" if len(images) == 1 else f"image {i}: "
        # the cheap checks first, so a typo in the task does not wait for decoding
        prompt = prompt_for(task, prompt, where, instruction)
        task = task_for(task, where, instruction)
        if instruction and msk is not None:
            raise no_mask_error(where)
        if not instruction and msk is None:
            raise missing_mask_error(where)
        try:
            source = _image_tensor(img, "image")
            if instruction:
                ones = torch.ones_like(source[:1])
                image = source if size is None else resize_image(source, size)
                out.append(PreparedEdit(source, ones, image, torch.ones_like(image[:1]), task, prompt))
                continue
            mask = _mask_tensor(msk, "mask")
        except EditError as e:
            raise EditError(f"{where}{e}") from None
        (h, w), (mh, mw) = source.shape[-2:], mask.shape[-2:]
        if h * mw != mh * w:
            raise EditError(f"{where}mask {_describe(msk)} is {mw}x{mh} but image {_describe(img)} is {w}x{h}: "
                            "give the mask the image's size (or exactly its aspect ratio)")
        mask_full = (resize_mask(mask, (h, w)) > 0.5).float()
        if size is None:
            out.append(PreparedEdit(source, mask_full, source, mask_full, task, prompt))
            continue
        small = (resize_mask(mask, size) > 0.5).float()
        if not bool(small.any()):
            raise EditError(f"{where}mask {_describe(msk)} is empty after resizing to the model's {size[1]}x{size[0]} "
                            "(its region is thinner than one pixel there): widen the masked region")
        out.append(PreparedEdit(source, mask_full, resize_image(source, size), small, task, prompt))
    return out


@dataclasses.dataclass
class EditRecord:
    line: int
    image: str
    mask: str | None          # None for an instruction editor
    task: str | None          # None: an instruction edit given no task
    prompt: str | None
    seed: int
    image_path: Path
    mask_path: Path | None


def read_records(path: str | os.PathLike, task: str | None, prompt: str | None, seed: int,
                 size: tuple[int, int] | None = None, *, instruction: bool = False) -> list[EditRecord]:
    """Parse an edit JSONL (records like the training data's: image, mask, task, prompt; optional
    seed; paths relative to the file) and check every record at working size `size` (None: not
    known yet); EditError lists each bad one. For an instruction editor (`instruction`) records
    have no mask and need a prompt; their task is optional (core.tasks.INSTRUCTION_TASKS)."""
    path = Path(path)
    if not path.is_file():
        raise EditError(f"JSONL file not found: {path}; check the path")
    records, problems = [], []
    for n, line in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{n}: "
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"{where}not valid JSON ({e})")
            continue
        if not isinstance(rec, dict):
            problems.append(f"{where}a record must be a JSON object, got {type(rec).__name__}")
            continue
        if instruction and rec.get("mask") is not None:
            problems.append(str(no_mask_error(where)))
            continue
        missing = [k for k in (("image",) if instruction else ("image", "mask"))
                   if not isinstance(rec.get(k), str) or not rec[k].strip()]
        if missing:
            problems.append(f"{where}record lacks {' and '.join(missing)} (a path relative to {path.parent})")
            continue
        mask = None if instruction else rec["mask"]
        r = EditRecord(n, rec["image"], mask, rec.get("task", task), rec.get("prompt", prompt),
                       rec.get("seed", seed), path.parent / rec["image"], None if mask is None else path.parent / mask)
        try:
            if isinstance(r.seed, bool) or not isinstance(r.seed, int):
                raise EditError(f"seed must be an integer, got {r.seed!r}")
            r.task = task_for(r.task, "", instruction)
            prepare([r.image_path], [r.mask_path], [r.prompt], [r.task], size, instruction=instruction)
        except EditError as e:
            problems.append(f"{where}{e}")
            continue
        records.append(r)
    if problems:
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        raise EditError(f"{path}: {len(problems)} bad record{'s' * (len(problems) != 1)}; fix or remove them:\n"
                        + "\n".join(shown))
    if not records:
        raise EditError(f"{path} holds no records")
    return records


