"""Ground-truth metrics for edits of the synthetic world (they need the world's truth, not a judge).

Per task:
- fill:    colour_acc (the drawn object's colour is the requested one), shape_acc (its outline fits
           the requested shape best), object_iou (drawn region vs the true object's mask);
- removal: psnr_mask (inside the mask, against the scene without the object), residue (share of
           the removed object's pixels still in its colour);
- extend:  psnr_mask (inside the new area, against the full canvas);
- text:    glyph_acc (share of characters recognised by template matching), text_exact, ink_iou.
Shared: psnr_mask for every task, so one number compares across tasks.

Instruction tasks (core/synthetic/instruction_world.py; their mask is the region that should change) add
psnr_keep, PSNR over what must stay as in the source (truth["keep"]: consistency), and per task
what instruction following means there:
- recolour:     colour_acc (the object's footprint reads as the requested colour);
- remove_named: residue (share of its footprint still in its colour) and psnr_mask (the
                background restored in its footprint);
- add:          colour_acc, shape_acc (as fill's, of the region the edit drew anywhere in the
                image), position_acc (that region's centre lies in the named cell);
- retext:       glyph_acc, text_exact (the ink against the text-free scene, read at the cells as
                the new text);
- restyle:      style_acc (the background reads as the requested kind: core.synthetic.backgrounds).
"""
from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch import Tensor

from core.masks import bbox
from core.synthetic.backgrounds import read_kind
from core.synthetic.glyphs import GLYPHS, glyph
from core.synthetic.instruction_world import cell_of
from core.synthetic.world import COLOURS, SHAPES, EditSample, shape_mask
from core.tasks import INSTRUCTION_TASKS

#: the metrics that say whether a task's edits got better, per task: the first is the task's main
#: metric (what it asks for); instruction tasks add psnr_keep (consistency: what must stay did)
MAIN_METRICS: dict[str, tuple[str, ...]] = {
    "fill": ("shape_acc", "object_iou"),
    "extend": ("psnr_mask",),
    "removal": ("psnr_mask",),
    "text": ("glyph_acc",),
    "recolour": ("colour_acc", "psnr_keep"),
    "remove_named": ("psnr_mask", "psnr_keep"),
    "add": ("shape_acc", "position_acc", "psnr_keep"),
    "retext": ("glyph_acc", "psnr_keep"),
    "restyle": ("style_acc", "psnr_keep"),
}
#: a pixel counts as "changed" when some channel moved more than this from the source
CHANGE_THRESHOLD = 0.25
_SHAPE_EXTENT = {"circle": 1.0, "square": 0.85, "triangle": 1.0, "diamond": 1.1}


def psnr_in_mask(edited: Tensor, target: Tensor, mask: Tensor) -> float:
    m = mask.expand_as(edited)
    mse = float(((edited - target) ** 2 * m).sum() / m.sum().clamp_min(1))
    return 10 * math.log10(1.0 / max(mse, 1e-10))


def iou(a: Tensor, b: Tensor) -> float:
    inter = float((a * b).sum())
    union = float(torch.maximum(a, b).sum())
    return inter / union if union > 0 else 0.0


def changed_region(edited: Tensor, source: Tensor, mask: Tensor) -> Tensor:
    """[1,H,W] binary map of pixels inside the mask that the edit visibly changed."""
    changed = ((edited - source).abs().amax(0, keepdim=True) > CHANGE_THRESHOLD).float() * (mask > 0.5).float()
    # drop isolated noisy pixels: keep a pixel when at least 3 of its 8 neighbours changed too
    # (an opening would also shave the thin apex of a triangle)
    neighbours = torch.nn.functional.conv2d(changed[None], torch.ones(1, 1, 3, 3), padding=1)[0] - changed
    return changed * (neighbours >= 3).float()


def nearest_colour(rgb: Tensor) -> str:
    names = list(COLOURS)
    table = torch.tensor([COLOURS[n] for n in names])
    return names[int(((table - rgb[None]) ** 2).sum(1).argmin())]


def classify_shape(region: Tensor) -> str | None:
    """The shape whose outline, fitted to the region's bounding box, overlaps it best."""
    if float(region.sum()) < 12:
        return None
    t, l, b, r = bbox(region)
    cy, cx = (t + b) / 2, (l + r) / 2
    half = max(b - t, r - l) / 2
    H, W = region.shape[-2:]
    # a small search over radius and sub-pixel centre absorbs the rasterisation of small shapes
    fits = [(cy + dy, cx + dx, half * k) for dy in (-0.5, 0, 0.5) for dx in (-0.5, 0, 0.5) for k in (0.9, 1.0, 1.1)]
    scores = {s: max(iou(region, shape_mask(s, H, W, y, x, h / _SHAPE_EXTENT[s])) for y, x, h in fits)
              for s in SHAPES}
    return max(scores, key=scores.get)


def read_glyph(ink: Tensor, top: int, left: int, scale: int = 2) -> str:
    """Template-match the glyph cell at (top, left) of a binary ink map [1,H,W]."""
    h, w = 5 * scale, 3 * scale
    cell = ink[0, top:top + h, left:left + w]
    if float(cell.sum()) == 0:
        return "?"
    scores = {ch: iou(cell, glyph(ch, scale)) for ch in GLYPHS}
    return max(scores, key=scores.get)


def sample_metrics(sample: EditSample, edited: Tensor) -> dict[str, float]:
    """Ground-truth metrics of one edited image [3,H,W] in [0,1] for its sample."""
    edited = edited.detach().float().cpu().clamp(0, 1)
    out = {"psnr_mask": psnr_in_mask(edited, sample.target, sample.mask)}
    truth = sample.truth
    if sample.task == "fill":
        o = truth["object"]
        drawn = changed_region(edited, sample.source, sample.mask)
        if float(drawn.sum()) >= 12:
            colour = nearest_colour(edited[:, drawn[0] > 0].median(dim=1).values)
            shape = classify_shape(drawn)
        else:
            colour = shape = None
        out.update(colour_acc=float(colour == o["colour"]), shape_acc=float(shape == o["shape"]),
                   object_iou=iou(drawn, o["mask"]))
    elif sample.task == "removal":
        o = truth["object"]
        colour = torch.tensor(COLOURS[o["colour"]])[:, None, None]
        still = ((edited - colour).abs().amax(0, keepdim=True) < 0.1).float() * o["mask"]
        out["residue"] = float(still.sum() / o["mask"].sum())
    elif sample.task == "text":
        ink = (edited - sample.source).abs().amax(0, keepdim=True) > CHANGE_THRESHOLD
        ink = ink.float() * sample.mask
        read = "".join(read_glyph(ink, t, l) for t, l in truth["cells"])
        correct = sum(a == b for a, b in zip(read, truth["text"]))
        out.update(glyph_acc=correct / len(truth["text"]), text_exact=float(read == truth["text"]),
                   ink_iou=iou(ink, truth["ink"]))
    elif sample.task in INSTRUCTION_TASKS:
        out.update(instruction_metrics(sample, edited))
    return out


def _read_text(ink: Tensor, cells: list[tuple[int, int]]) -> str:
    return "".join(read_glyph(ink, t, l) for t, l in cells)


def instruction_metrics(sample: EditSample, edited: Tensor) -> dict[str, float]:
    """The metrics of an instruction task (see the module docstring) but psnr_mask."""
    truth, task = sample.truth, sample.task
    out = {"psnr_keep": psnr_in_mask(edited, sample.target, truth["keep"])}
    if task == "recolour":
        foot = truth["object"]["mask"][0] > 0
        out["colour_acc"] = float(nearest_colour(edited[:, foot].median(dim=1).values) == truth["new_colour"])
    elif task == "remove_named":
        o = truth["object"]
        colour = torch.tensor(COLOURS[o["colour"]])[:, None, None]
        still = ((edited - colour).abs().amax(0, keepdim=True) < 0.1).float() * o["mask"]
        out["residue"] = float(still.sum() / o["mask"].sum())
    elif task == "add":
        o = truth["object"]
        drawn = changed_region(edited, sample.source, torch.ones_like(sample.mask))
        colour = shape = cell = None
        if float(drawn.sum()) >= 12:
            colour = nearest_colour(edited[:, drawn[0] > 0].median(dim=1).values)
            shape = classify_shape(drawn)
            t, l, b, r = bbox(drawn)  # its centre: a triangle's centroid lies r/3 below it
            cell = cell_of(drawn.shape[-1], (t + b) / 2, (l + r) / 2)
        out.update(colour_acc=float(colour == o["colour"]), shape_acc=float(shape == o["shape"]),
                   position_acc=float(cell == tuple(truth["cell"])))
    elif task == "retext":
        ink = ((edited - truth["clean"]).abs().amax(0, keepdim=True) > CHANGE_THRESHOLD).float() * sample.mask
        read = _read_text(ink, truth["cells"])
        correct = sum(a == b for a, b in zip(read, truth["new_text"]))
        out.update(glyph_acc=correct / len(truth["new_text"]), text_exact=float(read == truth["new_text"]))
    elif task == "restyle":
        out["style_acc"] = float(read_kind(edited, sample.mask) == truth["new_kind"])
    return out


def ground_truth_metrics(samples: list[EditSample], edited: Tensor) -> dict[str, dict[str, list[float]]]:
    """Per task, per metric, the list of per-sample values (in the order of `samples`)."""
    if edited.shape[0] != len(samples):
        raise ValueError(f"{edited.shape[0]} edited images for {len(samples)} samples")
    out: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for s, img in zip(samples, edited):
        for k, v in sample_metrics(s, img).items():
            out[s.task][k].append(v)
    return {t: dict(m) for t, m in out.items()}


def summarize(metrics: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, float]]:
    """Means of `ground_truth_metrics` output."""
    return {t: {k: sum(v) / len(v) for k, v in m.items()} for t, m in metrics.items()}
