"""A synthetic edit world: small scenes with known ground truth for all four tasks.

A scene is a background (gradient, stripes or texture) with a few flat shapes in named colours.
For every edit the world keeps the ground truth — the clean background, every object's mask and
attributes, the full canvas before cropping — so judges and metrics can measure real quality, and
tests and the CPU demo can tell true improvement from reward hacking.

Each sample is a pure function of (world seed, split, task, index); the "heldout" split draws from
a seed space disjoint from "train", so a fixed held-out set is simply indices 0..n-1.

The instruction tasks (recolour, remove_named, add, retext, restyle) are made by
core.synthetic.instruction_world.InstructionWorld, a subclass that reuses the scene parts here.
"""
from __future__ import annotations

import dataclasses
import hashlib
import random
from typing import Any

import torch
from torch import Tensor

from core import masks as M
from core.synthetic.glyphs import GLYPHS, render_text, text_size
from core.tasks import EXTEND_NO_PROMPT, REMOVAL_PROMPT, TASKS, check_task

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.87, 0.15, 0.15),
    "green": (0.15, 0.70, 0.25),
    "blue": (0.15, 0.30, 0.88),
    "yellow": (0.96, 0.86, 0.12),
    "purple": (0.60, 0.20, 0.75),
    "orange": (0.97, 0.55, 0.10),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
BACKGROUNDS: dict[str, str] = {"gradient": "gradient", "stripes": "striped", "texture": "textured"}
SPLITS: tuple[str, ...] = ("train", "heldout")


def _prompt_words() -> list[str]:
    fixed = f"a the text background with on {REMOVAL_PROMPT} {EXTEND_NO_PROMPT}".replace(",", " ")
    words = fixed.split() + list(COLOURS) + list(SHAPES) + list(BACKGROUNDS.values())
    return sorted(set(words))


#: every token a prompt of this world can contain (words, then digits and punctuation)
VOCABULARY: list[str] = _prompt_words() + list(GLYPHS) + ['"', ","]


@dataclasses.dataclass
class EditSample:
    key: str            # unique id of the condition: split/task/index
    task: str
    source: Tensor      # [3, H, W] in [0, 1]: what the user gives (extend: the canvas, new area grey)
    mask: Tensor        # [1, H, W], 1 = generate
    prompt: str
    target: Tensor | None  # [3, H, W]: the ground-truth result (None for user data without one)
    truth: dict[str, Any]


@dataclasses.dataclass
class EditBatch:
    images: Tensor       # [B, 3, H, W]
    masks: Tensor        # [B, 1, H, W]
    prompts: list[str]
    targets: Tensor | None  # [B, 3, H, W]; None when any sample has no ground truth
    tasks: list[str]
    keys: list[str]
    truths: list[dict[str, Any]]

    def __len__(self) -> int:
        return len(self.keys)


def collate(samples: list[EditSample]) -> EditBatch:
    return EditBatch(
        images=torch.stack([s.source for s in samples]),
        masks=torch.stack([s.mask for s in samples]),
        prompts=[s.prompt for s in samples],
        targets=None if any(s.target is None for s in samples) else torch.stack([s.target for s in samples]),
        tasks=[s.task for s in samples],
        keys=[s.key for s in samples],
        truths=[s.truth for s in samples],
    )


def shape_mask(shape: str, h: int, w: int, cy: float, cx: float, r: float) -> Tensor:
    """Binary [1, h, w] mask of a shape centred at (cy, cx) with half-size r (pixel centres)."""
    ys = torch.arange(h, dtype=torch.float32)[:, None] + 0.5 - cy
    xs = torch.arange(w, dtype=torch.float32)[None, :] + 0.5 - cx
    if shape == "circle":
        m = ys**2 + xs**2 <= r * r
    elif shape == "square":
        m = (ys.abs() <= 0.85 * r) & (xs.abs() <= 0.85 * r)
    elif shape == "triangle":  # apex up, base at the bottom
        m = (ys >= -r) & (ys <= r) & (xs.abs() <= (ys + r) / 2)
    elif shape == "diamond":
        m = ys.abs() + xs.abs() <= 1.1 * r
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return m.float()[None]


class SyntheticWorld:
    """Deterministic generator of edit conditions with ground truth for fill/extend/removal/text."""

    def __init__(self, size: int = 64, seed: int = 0):
        if size < 32 or size % 16:
            raise ValueError(f"world size must be a multiple of 16 and >= 32, got {size}")
        self.size = size
        self.seed = seed

    # -- public API ---------------------------------------------------------------------------
    #: the tasks this world makes (core.synthetic.instruction_world.InstructionWorld adds the instruction tasks)
    TASKS: tuple[str, ...] = TASKS

    def sample(self, task: str, index: int, split: str = "train") -> EditSample:
        check_task(task)
        if task not in self.TASKS:
            raise ValueError(f"{type(self).__name__} makes the tasks {list(self.TASKS)}, not {task!r}: "
                             "instruction tasks come from core.synthetic.instruction_world.InstructionWorld")
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        rng, gen = self._streams(split, task, index)
        sample = getattr(self, f"_{task}")(rng, gen)
        sample.key = f"{split}/{task}/{index}"
        return sample

    def _streams(self, split: str, task: str, index: int) -> tuple[random.Random, torch.Generator]:
        """The random streams of one condition: a pure function of (world seed, split, task, index)."""
        digest = hashlib.blake2b(f"{self.seed}/{split}/{task}/{index}".encode(), digest_size=8).digest()
        seed = int.from_bytes(digest, "little") & (2**62 - 1)
        return random.Random(seed), torch.Generator().manual_seed(seed)

    def batch(self, tasks: list[str], rng: random.Random, split: str = "train") -> list[EditSample]:
        return [self.sample(t, rng.randrange(2**31), split) for t in tasks]

    def held_out(self, task: str, n: int) -> list[EditSample]:
        """The fixed held-out set of a task: its first n samples."""
        return [self.sample(task, i, "heldout") for i in range(n)]

    # -- scene parts -------------------------------------------------------------------------
    def _background(self, rng: random.Random, gen: torch.Generator) -> tuple[Tensor, str]:
        kind = rng.choice(list(BACKGROUNDS))
        return self._render_background(kind, rng, gen), kind

    def _render_background(self, kind: str, rng: random.Random, gen: torch.Generator) -> Tensor:
        """A background of the given kind (a key of BACKGROUNDS) with random colours and layout."""
        S = self.size

        def muted() -> Tensor:  # low-saturation colours, so objects stand out
            grey = rng.uniform(0.3, 0.8)
            return torch.tensor([grey + rng.uniform(-0.1, 0.1) for _ in range(3)]).clamp(0, 1)

        a, b = muted(), muted()
        ys = torch.linspace(0, 1, S)[:, None].expand(S, S)
        xs = torch.linspace(0, 1, S)[None, :].expand(S, S)
        if kind == "gradient":
            angle = rng.uniform(0, 6.2832)
            u = (torch.cos(torch.tensor(angle)) * xs + torch.sin(torch.tensor(angle)) * ys)
            u = (u - u.min()) / (u.max() - u.min() + 1e-8)
        elif kind == "stripes":
            period = rng.uniform(6, 14)
            coord = ys if rng.random() < 0.5 else xs
            u = (torch.sin(coord * S * 6.2832 / period) > 0).float()
            b = (a + rng.choice([-1, 1]) * torch.tensor(rng.uniform(0.12, 0.22))).clamp(0, 1)
        elif kind == "texture":  # smooth random texture: low-resolution noise upsampled
            coarse = torch.rand(1, 1, 6, 6, generator=gen)
            u = torch.nn.functional.interpolate(coarse, size=(S, S), mode="bicubic", align_corners=False)[0, 0]
            u = (u - u.min()) / (u.max() - u.min() + 1e-8)
        else:
            raise ValueError(f"unknown background kind {kind!r}; expected one of {list(BACKGROUNDS)}")
        img = a[:, None, None] * (1 - u) + b[:, None, None] * u
        return img.clamp(0, 1)

    def _place(self, rng: random.Random, occupied: Tensor, r: float, margin: int) -> tuple[float, float] | None:
        """A centre whose (r + margin)-disc lies inside the image and off `occupied`."""
        S = self.size
        for _ in range(60):
            cy, cx = rng.uniform(r + 2, S - r - 2), rng.uniform(r + 2, S - r - 2)
            if not bool((occupied * M.ellipse_mask(S, S, cy, cx, r + margin, r + margin)).any()):
                return cy, cx
        return None

    def _objects(self, rng: random.Random, n: int, occupied: Tensor | None = None,
                 margin: int = 6) -> tuple[list[dict[str, Any]], Tensor]:
        S = self.size
        occupied = torch.zeros(1, S, S) if occupied is None else occupied.clone()
        objs = []
        for _ in range(n):
            r = rng.uniform(5.0, 8.0)
            at = self._place(rng, occupied, r, margin)
            if at is None:
                break
            shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
            m = shape_mask(shape, S, S, at[0], at[1], r)
            objs.append({"shape": shape, "colour": colour, "cy": at[0], "cx": at[1], "r": r, "mask": m})
            occupied = torch.maximum(occupied, m)
        return objs, occupied

    @staticmethod
    def _paint(img: Tensor, objs: list[dict[str, Any]]) -> Tensor:
        out = img.clone()
        for o in objs:
            c = torch.tensor(COLOURS[o["colour"]])[:, None, None]
            out = out * (1 - o["mask"]) + c * o["mask"]
        return out

    def _scene(self, rng, gen, n_objects: int):
        bg, kind = self._background(rng, gen)
        objs, occupied = self._objects(rng, n_objects)
        return bg, kind, objs, occupied

    #: the margin of a text's box around its glyphs
    TEXT_PAD = 3

    def _text_box(self, rng: random.Random, objs: list[dict[str, Any]], occupied: Tensor,
                  text: str) -> tuple[list[dict[str, Any]], int, int, Tensor]:
        """A free spot for `text`'s box (glyphs plus TEXT_PAD), off the objects: (the objects that
        stay, top, left, box mask); a crowded scene is cleared."""
        S = self.size
        th, tw = text_size(text)
        bh, bw = th + 2 * self.TEXT_PAD, tw + 2 * self.TEXT_PAD
        for _ in range(60):
            top, left = rng.randint(1, S - bh - 1), rng.randint(1, S - bw - 1)
            box = M.box_mask(S, S, top, left, bh, bw)
            if not bool((box * M.dilate(occupied, 1)).any()):
                break
        else:  # no free spot: clear the scene
            objs = []
            top, left = rng.randint(1, S - bh - 1), rng.randint(1, S - bw - 1)
            box = M.box_mask(S, S, top, left, bh, bw)
        return objs, top, left, box

    @staticmethod
    def _ink_value(image: Tensor, box: Tensor) -> float:
        """Dark ink on a light box, light ink on a dark one."""
        lum = float((image.mean(0, keepdim=True) * box).sum() / box.sum())
        return 0.05 if lum > 0.5 else 0.95

    # -- the four tasks ----------------------------------------------------------------------
    def _fill(self, rng: random.Random, gen: torch.Generator) -> EditSample:
        S = self.size
        bg, kind, objs, occupied = self._scene(rng, gen, rng.randint(0, 2))
        new, _ = self._objects(rng, 1, occupied, margin=8)
        if not new:  # crowded scene: drop the others so the request is always satisfiable
            objs, occupied = [], torch.zeros(1, S, S)
            new, _ = self._objects(rng, 1, occupied, margin=8)
        o = new[0]
        pad = rng.uniform(2.5, 5.0)
        if rng.random() < 0.5:
            mask = M.box_mask(S, S, int(o["cy"] - o["r"] - pad), int(o["cx"] - o["r"] - pad),
                              int(2 * (o["r"] + pad)) + 1, int(2 * (o["r"] + pad)) + 1)
        else:
            mask = M.ellipse_mask(S, S, o["cy"], o["cx"], 1.42 * o["r"] + pad, 1.42 * o["r"] + pad)
        mask = torch.maximum(mask, M.dilate(o["mask"], 1))
        source = self._paint(bg, objs)
        target = self._paint(bg, objs + [o])
        truth = {"background": bg, "bg_kind": kind, "objects": objs, "object": o}
        return EditSample("", "fill", source, mask, f"a {o['colour']} {o['shape']}", target, truth)

    def _removal(self, rng: random.Random, gen: torch.Generator) -> EditSample:
        bg, kind, objs, _ = self._scene(rng, gen, rng.randint(1, 3))
        if not objs:
            bg, kind, objs, _ = self._scene(rng, gen, 1)
        idx = rng.randrange(len(objs))
        o = objs[idx]
        if rng.random() < 0.7:
            mask = M.dilate(o["mask"], rng.randint(2, 4))
        else:
            t, l, b, r = M.bbox(o["mask"])
            p = rng.randint(2, 4)
            mask = M.box_mask(self.size, self.size, t - p, l - p, b - t + 2 * p, r - l + 2 * p)
        keep = [x for i, x in enumerate(objs) if i != idx]
        source = self._paint(bg, objs)
        target = self._paint(bg, keep)
        truth = {"background": bg, "bg_kind": kind, "objects": keep, "object": o}
        return EditSample("", "removal", source, mask, REMOVAL_PROMPT, target, truth)

    def _extend(self, rng: random.Random, gen: torch.Generator) -> EditSample:
        S = self.size
        bg, kind, objs, _ = self._scene(rng, gen, rng.randint(1, 3))
        sides = rng.sample(["top", "bottom", "left", "right"], rng.randint(1, 2))
        ratios = {s: rng.uniform(0.15, 0.35) for s in sides}
        mask = M.outpaint_mask(S, S, **ratios)
        target = self._paint(bg, objs)
        source = target * (1 - mask) + 0.5 * mask
        # Describe an object that the model must (re)create in the new area, if there is one.
        outside = [o for o in objs if float((o["mask"] * mask).sum()) >= 0.3 * float(o["mask"].sum())]
        described = outside[0] if outside else None
        if rng.random() < 0.3:
            prompt = EXTEND_NO_PROMPT
        elif described is not None:
            prompt = f"a {BACKGROUNDS[kind]} background with a {described['colour']} {described['shape']}"
        else:
            prompt = f"a {BACKGROUNDS[kind]} background"
        truth = {"background": bg, "bg_kind": kind, "objects": objs, "described": described,
                 "has_prompt": prompt != EXTEND_NO_PROMPT, "canvas": target}
        return EditSample("", "extend", source, mask, prompt, target, truth)

    def _text(self, rng: random.Random, gen: torch.Generator) -> EditSample:
        S = self.size
        bg, kind, objs, occupied = self._scene(rng, gen, rng.randint(0, 2))
        text = "".join(rng.choice(GLYPHS) for _ in range(rng.randint(1, 2)))
        objs, top, left, box = self._text_box(rng, objs, occupied, text)
        ink, cells = render_text(text, S, S, top + self.TEXT_PAD, left + self.TEXT_PAD)
        source = self._paint(bg, objs)
        ink_value = self._ink_value(source, box)
        target = source * (1 - ink) + ink_value * ink
        truth = {"background": bg, "bg_kind": kind, "objects": objs, "text": text, "ink": ink,
                 "ink_value": ink_value, "cells": cells}
        return EditSample("", "text", source, box, f'the text "{text}"', target, truth)
