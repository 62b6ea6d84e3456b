"""Instruction edits with ground truth: Edit-R1's setting (an instruction, no mask) in the synthetic world.

The mask-guided world (core.synthetic.world.SyntheticWorld) hands the editor a mask and a prompt. Edit-R1 /
UniWorld-V2 post-train *instruction* editors: the user says what to do ("make the red circle
blue") and the editor must find where. The same scenes (backgrounds, coloured shapes, digits in
the world's font) give five such tasks with exact answers:

- recolour      "make the red circle blue": one object takes another colour, nothing else moves;
- remove_named  "remove the green triangle": the target is the scene without it, the background
                behind it restored exactly as the world renders it (the scene has 2-3 objects, so
                the name matters);
- add           "add a yellow square at the top left": a new object whose centre lies in the named
                cell of a 3 x 3 grid (POSITIONS: top left, top, top right, left, centre, ...);
- retext        'replace the text "42" with "17"': the same place, size and ink, other digits
                (every character changes, so leaving the text as it was reads as 0% right);
- restyle       "change the background to stripes": the same objects on a background of another
                kind (gradient, stripes, texture: the kinds core.synthetic.world renders), new colours drawn
                by the world's own background generator.

Objects of a scene have distinct (colour, shape) names, so every instruction names exactly one.
Each sample is a pure function of (world seed, split, task, index), like the mask-guided ones,
with the same disjoint "train" / "heldout" splits; InstructionWorld also makes the mask-guided
tasks, bit-identical to SyntheticWorld's (it is one, with five more tasks).

EditSample fields for an instruction task:

- `source`, `prompt` (the instruction), `target`: what the editor gets, and the exact answer;
- `mask`: the region that should change (recolour, remove_named: the object's footprint; add: the
  added object's; retext: the text's box; restyle: the background, every pixel off the objects).
  It is ground truth for metrics and judges, NOT an input of the editor: an instruction editor is
  given source and prompt only. (core.synthetic.world.collate still stacks it into EditBatch.masks; a
  mask-guided policy fed these batches would be told where to edit, which is why no trainer takes
  instruction tasks yet: rl.plumbing refuses them.)
- `truth`: the scene (background, bg_kind, objects: each with its own mask, shape, colour, centre
  and radius), target_objects (the objects as the target shows them), keep (the pixels that must
  stay as in the source: 1 - mask, except for add, where the whole named cell, grown by an
  object's reach, may change, and restyle, where only the objects are kept), and the edit's
  specifics (per task, see the generators: object, new_colour, cell, text, new_text, new_kind, ...).

The instructions need words the mask-guided prompts never use ("make", "remove", "add", "top",
...): INSTRUCTION_WORDS lists them in one place, and INSTRUCTION_VOCABULARY is the world's
VOCABULARY plus them. The toy FLUX's tokenizers (core/toy_flux/tokenizers.py) are built over
core.synthetic.world.VOCABULARY only, and FluxFillPolicy.prompt_problem refuses prompts with words outside
it; a tokenizer (and toy) built for instruction editing should be built over
INSTRUCTION_VOCABULARY (world_words(INSTRUCTION_VOCABULARY)). VOCABULARY itself is unchanged, so
the shipped toy and its tokenizers stay as they are.
"""
from __future__ import annotations

import random
import re
from typing import Any

import torch
from torch import Tensor

from core import masks as M
from core.synthetic.backgrounds import MIN_CONTRAST, contrast
from core.synthetic.glyphs import GLYPHS, render_text
from core.synthetic.world import (
    BACKGROUNDS,
    COLOURS,
    SHAPES,
    VOCABULARY,
    EditSample,
    SyntheticWorld,
    shape_mask,
)
from core.tasks import INSTRUCTION_TASKS, TASKS

#: grid positions of the add task: (row, column) of a 3 x 3 grid -> the words of the instruction
POSITIONS: dict[tuple[int, int], str] = {
    (0, 0): "at the top left", (0, 1): "at the top", (0, 2): "at the top right",
    (1, 0): "on the left", (1, 1): "in the centre", (1, 2): "on the right",
    (2, 0): "at the bottom left", (2, 1): "at the bottom", (2, 2): "at the bottom right",
}
GRID = 3
#: the background kinds (core.synthetic.world.BACKGROUNDS' keys) as the restyle instruction names them
STYLES: dict[str, str] = {"gradient": "a gradient", "stripes": "stripes", "texture": "a texture"}
#: an object's reach beyond its centre in units of r (the diamond's 1.1), for add's allowed area
_REACH = 1.1
#: the world's largest object radius (core.synthetic.world.SyntheticWorld._objects draws r in [5, 8])
_R_MAX = 8.0


#: the instruction of each task, filled in by the generators
INSTRUCTIONS: dict[str, str] = {
    "recolour": "make the {colour} {shape} {new_colour}",
    "remove_named": "remove the {colour} {shape}",
    "add": "add a {colour} {shape} {position}",
    "retext": 'replace the text "{text}" with "{new_text}"',
    "restyle": "change the background to {style}",
}


def _instruction_words() -> list[str]:
    fixed = " ".join([*INSTRUCTIONS.values(), *POSITIONS.values(), *STYLES.values()])
    words = set(re.findall(r"[a-z]+", re.sub(r"\{[a-z_]+\}", " ", fixed)))
    return sorted(words - set(VOCABULARY))


#: the words instruction prompts use that mask-guided prompts (core.synthetic.world.VOCABULARY) do not;
#: a tokenizer built for instruction editing must include them (see the module docstring)
INSTRUCTION_WORDS: list[str] = _instruction_words()
#: every token an instruction prompt (or a mask-guided prompt) of this world can contain
INSTRUCTION_VOCABULARY: list[str] = VOCABULARY + INSTRUCTION_WORDS


def cell_box(size: int, row: int, col: int) -> Tensor:
    """[1, size, size] mask of one cell of the GRID x GRID grid."""
    top, bottom = round(row * size / GRID), round((row + 1) * size / GRID)
    left, right = round(col * size / GRID), round((col + 1) * size / GRID)
    return M.box_mask(size, size, top, left, bottom - top, right - left)


def cell_of(size: int, y: float, x: float) -> tuple[int, int]:
    """The (row, column) of the grid cell that holds the point (y, x) (pixel coordinates)."""
    clamp = lambda v: min(max(int(v * GRID / size), 0), GRID - 1)
    return clamp(y), clamp(x)


def _unique(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The objects without repeated (colour, shape) names (the first of each kept), so that an
    instruction naming one is never ambiguous."""
    seen, out = set(), []
    for o in objs:
        if (o["colour"], o["shape"]) not in seen:
            seen.add((o["colour"], o["shape"]))
            out.append(o)
    return out


def _union(objs: list[dict[str, Any]], like: Tensor) -> Tensor:
    out = torch.zeros_like(like)
    for o in objs:
        out = torch.maximum(out, o["mask"])
    return out


class InstructionWorld(SyntheticWorld):
    """The synthetic world with the instruction tasks (core.tasks.INSTRUCTION_TASKS) added.

    `sample(task, index, split)` makes any task of core.tasks.ALL_TASKS; the mask-guided ones are
    SyntheticWorld's, bit for bit. See the module docstring for what the fields mean; in short,
    `mask` is the region that should change, ground truth for metrics and judges, never an input of
    the editor.
    """

    TASKS = TASKS + INSTRUCTION_TASKS

    def _named_scene(self, rng: random.Random, gen: torch.Generator, lo: int, hi: int):
        """A scene of lo..hi objects with distinct names, redrawn (deterministically: the streams
        are the condition's) while it has fewer than lo; a small world that cannot hold lo of
        them keeps one."""
        for _ in range(20):
            bg, kind, objs, _ = self._scene(rng, gen, rng.randint(lo, hi))
            objs = _unique(objs)
            if len(objs) >= lo:
                break
        if lo and not objs:  # one object always fits an empty scene
            objs, _ = self._objects(rng, 1)
        occupied = _union(objs, torch.zeros(1, self.size, self.size))
        return bg, kind, objs, occupied

    # -- the five instruction tasks ----------------------------------------------------------
    def _recolour(self, rng: random.Random, gen: torch.Generator) -> EditSample:
        bg, kind, objs, _ = self._named_scene(rng, gen, 1, 3)
        o = objs[rng.randrange(len(objs))]
        new_colour = rng.choice([c for c in COLOURS if c != o["colour"]])
        changed = [{**x, "colour": new_colour} if x is o else x for x in objs]
        source, target = self._paint(bg, objs), self._paint(bg, changed)
        truth = {"background": bg, "bg_kind": kind, "objects": objs, "target_objects": changed,
                 "object": o, "new_colour": new_colour, "keep": 1 - o["mask"]}
        prompt = INSTRUCTIONS["recolour"].format(colour=o["colour"], shape=o["shape"], new_colour=new_colour)
        return EditSample("", "recolour", source, o["mask"].clone(), prompt, target, truth)

    def _remove_named(self, rng: random.Random, gen: torch.Generator) -> EditSample:
        bg, kind, objs, _ = self._named_scene(rng, gen, 2, 3)
        o = objs[rng.randrange(len(objs))]
        kept = [x for x in objs if x is not o]
        source, target = self._paint(bg, objs), self._paint(bg, kept)
        truth = {"background": bg, "bg_kind": kind, "objects": objs, "target_objects": kept,
                 "object": o, "keep": 1 - o["mask"]}
        prompt = INSTRUCTIONS["remove_named"].format(colour=o["colour"], shape=o["shape"])
        return EditSample("", "remove_named", source, o["mask"].clone(), prompt, target, truth)

    def _add_spot(self, rng: random.Random, occupied: Tensor) -> tuple[tuple[int, int], float, float, float] | None:
        """A cell and an object's centre and radius in it, off `occupied` by the world's margin.
        Centres lie in the middle half of the cell where they fit (the place is then unambiguous),
        else (small worlds) anywhere in it at least a pixel from its edges."""
        S, margin = self.size, 6
        cells = list(POSITIONS)
        rng.shuffle(cells)
        for row, col in cells:
            for _ in range(12):
                r = rng.uniform(5.0, _R_MAX)
                spans = []
                for k in (row, col):
                    lo, hi = k * S / GRID, (k + 1) * S / GRID
                    inner = (max(lo + S / (4 * GRID), r + 2), min(hi - S / (4 * GRID), S - r - 2))
                    spans.append(inner if inner[0] <= inner[1] else (max(lo + 1, r + 2), min(hi - 1, S - r - 2)))
                if any(a > b for a, b in spans):
                    continue
                cy, cx = rng.uniform(*spans[0]), rng.uniform(*spans[1])
                if not bool((occupied * M.ellipse_mask(S, S, cy, cx, r + margin, r + margin)).any()):
                    return (row, col), cy, cx, r
        return None

    def _add(self, rng: random.Random, gen: torch.Generator) -> EditSample:
        S = self.size
        bg, kind, objs, occupied = self._named_scene(rng, gen, 0, 2)
        spot = self._add_spot(rng, occupied)
        if spot is None:  # crowded scene: drop the others so the request is always satisfiable
            objs, occupied = [], torch.zeros(1, S, S)
            spot = self._add_spot(rng, occupied)
        (row, col), cy, cx, r = spot
        shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
        o = {"shape": shape, "colour": colour, "cy": cy, "cx": cx, "r": r, "mask": shape_mask(shape, S, S, cy, cx, r)}
        cell = cell_box(S, row, col)
        allowed = M.dilate(cell, int(_REACH * _R_MAX) + 1)
        source, target = self._paint(bg, objs), self._paint(bg, objs + [o])
        truth = {"background": bg, "bg_kind": kind, "objects": objs, "target_objects": objs + [o],
                 "object": o, "cell": (row, col), "position": POSITIONS[row, col], "cell_mask": cell,
                 "allowed": allowed, "keep": torch.maximum(1 - allowed, _union(objs, cell))}
        prompt = INSTRUCTIONS["add"].format(colour=colour, shape=shape, position=POSITIONS[row, col])
        return EditSample("", "add", source, o["mask"].clone(), prompt, target, truth)

    def _retext(self, rng: random.Random, gen: torch.Generator) -> EditSample:
        S = self.size
        bg, kind, objs, occupied = self._named_scene(rng, gen, 0, 2)
        text = "".join(rng.choice(GLYPHS) for _ in range(rng.randint(1, 2)))
        new_text = "".join(rng.choice([g for g in GLYPHS if g != ch]) for ch in text)
        objs, top, left, box = self._text_box(rng, objs, occupied, text)
        ink, cells = render_text(text, S, S, top + self.TEXT_PAD, left + self.TEXT_PAD)
        new_ink, _ = render_text(new_text, S, S, top + self.TEXT_PAD, left + self.TEXT_PAD)
        clean = self._paint(bg, objs)
        ink_value = self._ink_value(clean, box)
        source = clean * (1 - ink) + ink_value * ink
        target = clean * (1 - new_ink) + ink_value * new_ink
        truth = {"background": bg, "bg_kind": kind, "objects": objs, "target_objects": objs, "clean": clean,
                 "text": text, "new_text": new_text, "cells": cells, "ink": ink, "new_ink": new_ink,
                 "ink_value": ink_value, "keep": 1 - box}
        prompt = INSTRUCTIONS["retext"].format(text=text, new_text=new_text)
        return EditSample("", "retext", source, box, prompt, target, truth)

    def _restyle(self, rng: random.Random, gen: torch.Generator) -> EditSample:
        bg, kind, objs, occupied = self._named_scene(rng, gen, 1, 3)
        new_kind = rng.choice([k for k in BACKGROUNDS if k != kind])
        for _ in range(50):  # a visible pattern: a near-flat gradient or texture shows no kind
            new_bg = self._render_background(new_kind, rng, gen)
            if contrast(new_bg) >= MIN_CONTRAST:
                break
        source, target = self._paint(bg, objs), self._paint(new_bg, objs)
        truth = {"background": bg, "bg_kind": kind, "objects": objs, "target_objects": objs,
                 "new_background": new_bg, "new_kind": new_kind, "keep": occupied}
        prompt = INSTRUCTIONS["restyle"].format(style=STYLES[new_kind])
        return EditSample("", "restyle", source, 1 - occupied, prompt, target, truth)
