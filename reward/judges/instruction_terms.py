"""The rule judge's instruction-following terms for the instruction tasks (core/synthetic/instruction_world.py).

Each term reads what the edit did the way core.synthetic.metrics reads it, softly (differentiable in the
edited image), and pays for identity: the right colour on the right object, the right object
gone, the right shape in the right place, the right glyphs, the right kind of background. As
for the mask-guided terms (content_terms, text_terms), a wrong but well-formed edit keeps partial
credit `wrong_credit` (another colour on the right object, the right colour on another object,
another object removed, the right object in another cell, other digits, the third kind of
background) and the hacks earn about nothing: leaving the image as it was, a solid block of the
requested colour or ink, noise. RL then has a slope from junk to a well-formed edit to the
right one.

- recolour:     the object's footprint read as the requested colour (P over the world's colours,
                "none" and "unchanged"), times exp(-spill / spill_scale), spill being the share of
                a ring around the object that changed (weighted by its neighbours, so that noise
                is not spill): a block of the colour over the object pays nothing;
- remove_named: (1 - P(footprint still in the object's colour)) x fidelity of the blurred
                footprint to the background the world renders there (blurred, so grain is the
                aesthetics dimension's business; a flat patch of another colour is no removal);
- add:          colour x shape x place x alone of what the edit drew (pixels visibly changed and
                read as a named colour) anywhere off the existing objects, in a window around
                where the drawing is densest: the share of it in the requested colour, its soft
                shape reading (content_terms: a block filling the cell reads as "the whole cell"),
                its centre in the named cell, and the share of all drawing inside the window (a
                second drawing elsewhere is no part of the object);
- retext:       the glyph reading of text_terms, of the ink against the text-free scene: the new
                digit pays 1, another digit `wrong_credit`, the old digit (no edit), a solid block
                and a blank 0;
- restyle:      the background's kind read by core.synthetic.backgrounds: the requested kind pays 1, the
                third kind `wrong_credit`, the old kind and "none" (flat fills, noise) 0; times
                exp(-grain / grain_scale), grain being its noise level.

Each takes one edited image [3,H,W] (any float dtype; computed in at least float32) and its
EditSample, and returns a scalar in [0, 1].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from core.masks import dilate
from core.synthetic import backgrounds
from core.synthetic.glyphs import GLYPHS
from core.synthetic.world import BACKGROUNDS, COLOURS, SHAPES, EditSample
from reward.judges.content_terms import (
    _AREA,
    _CENTROID_DROP,
    neighbourhood_weighted,
    shape_probabilities,
)
from reward.judges.text_terms import INK_THRESHOLD, read_cells, soft_ink

_COLOUR_NAMES = list(COLOURS)
_TABLE = torch.tensor([COLOURS[c] for c in _COLOUR_NAMES])


def colour_distribution(pixels: Tensor, reference: Tensor | None = None, *, sigma: float = 0.12,
                        reject_distance: float = 0.3) -> Tensor:
    """[N, C+1 (+1)]: the soft nearest-colour reading of pixels [N,3] over the world's C named
    colours, "none" (at `reject_distance`) and, with a reference [N,3], "unchanged"
    (content_terms.colour_probability's classifier, every class at once)."""
    d = ((pixels[:, None, :] - _TABLE.to(pixels)[None]) ** 2).sum(-1)
    extra = [torch.full_like(d[:, :1], reject_distance**2)]
    if reference is not None:
        extra.append(((pixels - reference) ** 2).sum(1, keepdim=True))
    return torch.softmax(torch.cat([d, *extra], 1) / (-2 * sigma**2), 1)


def _at(image: Tensor, where: Tensor) -> Tensor:
    """[N,3]: the pixels of image [3,H,W] where the [1,H,W] map is > 0.5."""
    return image[:, where[0].to(image.device) > 0.5].T


def _change(edited: Tensor, source: Tensor, sharpness: float, threshold: float = INK_THRESHOLD) -> Tensor:
    """[1,H,W]: the soft "visibly changed" map: sigmoid((max_c |edited - source| - threshold) /
    sharpness), at core.synthetic.metrics' change threshold by default (text_terms' ink)."""
    return torch.sigmoid(((edited - source).abs().amax(0, keepdim=True) - threshold) / sharpness)


def _spill(edited: Tensor, source: Tensor, around: Tensor, sharpness: float) -> Tensor:
    """The share of the region `around` [1,H,W] that visibly changed, each changed pixel weighed by
    how many of its neighbours changed too (content_terms.neighbourhood_weighted): noise is no
    spill, a block over the object is."""
    changed = neighbourhood_weighted(_change(edited, source, sharpness))
    return (changed * around[0]).sum() / around.sum().clamp_min(1.0)


def _blur(x: Tensor, k: int) -> Tensor:
    return F.avg_pool2d(x[None], k, stride=1, padding=k // 2, count_include_pad=False)[0]


def recolour_term(edited: Tensor, sample: EditSample, *, wrong_credit: float = 0.25, ring: int = 3,
                  spill_scale: float = 0.1, spill_sharpness: float = 0.02, sigma: float = 0.12,
                  reject_distance: float = 0.3) -> Tensor:
    t, src = sample.truth, sample.source.to(edited)
    o, new = t["object"], _COLOUR_NAMES.index(t["new_colour"])
    old = _COLOUR_NAMES.index(o["colour"])

    def reading(x: dict) -> Tensor:
        return colour_distribution(_at(edited, x["mask"]), _at(src, x["mask"]), sigma=sigma,
                                   reject_distance=reject_distance)

    p = reading(o)
    right = p[:, new].mean()
    others = [i for i in range(len(_COLOUR_NAMES)) if i not in (new, old)]
    wrong = p[:, others].sum(1).mean()
    for x in t["objects"]:  # the requested colour on another object (one not already in it)
        if x is not o and x["colour"] != t["new_colour"]:
            wrong = torch.maximum(wrong, reading(x)[:, new].mean())
    identity = right + wrong_credit * wrong * (1 - right)
    mask = o["mask"].to(edited)
    around = dilate(mask, ring) - mask
    for x in t["objects"]:
        if x is not o:
            around = around * (1 - dilate(x["mask"].to(edited), 1))
    return identity * torch.exp(-_spill(edited, src, around, spill_sharpness) / spill_scale)


def remove_term(edited: Tensor, sample: EditSample, *, wrong_credit: float = 0.25, scale: float = 0.003,
                blur: int = 5, ring: int = 3, spill_scale: float = 0.1, spill_sharpness: float = 0.02,
                sigma: float = 0.12, reject_distance: float = 0.3) -> Tensor:
    t = sample.truth
    src, target, bg = sample.source.to(edited), sample.target.to(edited), t["background"].to(edited)
    blurred = _blur(edited, blur)

    def removed(x: dict) -> Tensor:  # x gone, the world's background back in its footprint, nothing around it touched
        m = x["mask"].to(edited)
        restored = target * (1 - m) + bg * m
        p = colour_distribution(_at(edited, m), _at(restored, m), sigma=sigma, reject_distance=reject_distance)
        still = p[:, _COLOUR_NAMES.index(x["colour"])].mean()
        area = dilate(m, 1).expand_as(edited)
        err = ((blurred - _blur(restored, blur)) ** 2 * area).sum() / area.sum()
        around = dilate(m, ring) - m
        for y in t["objects"]:
            if y is not x:
                around = around * (1 - dilate(y["mask"].to(edited), 1))
        spill = _spill(edited, src, around, spill_sharpness)
        return (1 - still) * torch.exp(-err / scale) * torch.exp(-spill / spill_scale)

    right = removed(t["object"])
    wrong = torch.zeros_like(right)
    for x in t["objects"]:
        if x is not t["object"]:
            wrong = torch.maximum(wrong, removed(x))
    return right + wrong_credit * wrong * (1 - right)


def add_term(edited: Tensor, sample: EditSample, *, wrong_credit: float = 0.25, edge: float = 1.0,
             window: int = 12, change_threshold: float = 0.15, change_sharpness: float = 0.03, sigma: float = 0.12,
             reject_distance: float = 0.3, shape_temperature: float = 0.015, reject_similarity: float = 0.86,
             mask_preference: float = 0.1) -> Tensor:
    t, src = sample.truth, sample.source.to(edited)
    o = t["object"]
    H, W = edited.shape[-2:]
    free = torch.ones(1, H, W, dtype=edited.dtype, device=edited.device)
    for x in t["objects"]:  # what already stood there is no part of the new object
        free = free * (1 - dilate(x["mask"].to(edited), 1))
    p = colour_distribution(edited.reshape(3, -1).T, src.reshape(3, -1).T, sigma=sigma,
                            reject_distance=reject_distance).T.reshape(-1, H, W)
    # a pixel drawn: visibly changed (over the whole image, the soft colour reading of untouched
    # background pixels, ~0.02 each, would outweigh the object) and read as a named colour
    new = _change(edited, src, change_sharpness, change_threshold)[0] * free[0]
    drawn = neighbourhood_weighted((p[:len(_COLOUR_NAMES)].sum(0) * new)[None])[0]
    right = neighbourhood_weighted((p[_COLOUR_NAMES.index(o["colour"])] * new)[None])[0]
    # the object: a window of +-`window` pixels (an object's reach and a margin) around where the
    # drawing is densest. Read over the whole image, the few pixels that noise pushes towards a
    # colour far away would drag the fitted centre and size; what lies outside the window is a
    # second drawing, not the object, and costs its share (drawing the object in every cell pays
    # ~1/9 of drawing it once)
    ys = torch.arange(H, dtype=edited.dtype, device=edited.device)[:, None] + 0.5
    xs = torch.arange(W, dtype=edited.dtype, device=edited.device)[None, :] + 0.5

    def around(cy: float, cx: float) -> Tensor:
        win = torch.zeros_like(drawn)
        y, x = int(cy), int(cx)
        win[max(y - window, 0):y + window + 1, max(x - window, 0):x + window + 1] = 1
        return win

    with torch.no_grad():  # the densest spot, then the centre of what lies around it (a block's
        # density is flat, and its first maximum a corner)
        density = F.avg_pool2d(drawn[None, None], 9, stride=1, padding=4)[0, 0]
        peak = int(density.flatten().argmax())
        first = drawn * around(peak // W, peak % W)
        m = first.sum().clamp_min(1e-6)
        win = around(float((first * ys).sum() / m), float((first * xs).sum() / m))
    obj = drawn * win
    alone = obj.sum() / drawn.sum().clamp_min(1e-6)
    share = (right * win).sum() / obj.sum().clamp_min(1e-6)
    colour = share + wrong_credit * (1 - share)
    cell = t["cell_mask"].to(edited)
    probs = shape_probabilities(obj[None], cell, temperature=shape_temperature,
                                reject_similarity=reject_similarity, mask_preference=mask_preference)[0]
    p_right = probs[SHAPES.index(o["shape"])]
    shape = p_right + wrong_credit * (probs[:len(SHAPES)].sum() - p_right)
    mass = obj.sum().clamp_min(1e-6)
    cy, cx = (obj * ys).sum() / mass, (obj * xs).sum() / mass
    if _CENTROID_DROP[o["shape"]]:  # the place is the shape's centre: a triangle's centroid lies r/3 below it
        support = mass**2 / (obj * obj).sum().clamp_min(1e-6)
        cy = cy - _CENTROID_DROP[o["shape"]] * (support / _AREA[o["shape"]]).sqrt()
    rows, cols = cell[0].amax(1).nonzero()[:, 0], cell[0].amax(0).nonzero()[:, 0]
    top, bottom, left, right_edge = float(rows[0]), float(rows[-1]) + 1, float(cols[0]), float(cols[-1]) + 1
    inside = (torch.sigmoid((cy - top) / edge) * torch.sigmoid((bottom - cy) / edge)
              * torch.sigmoid((cx - left) / edge) * torch.sigmoid((right_edge - cx) / edge))
    place = inside + wrong_credit * (1 - inside)
    return colour * shape * place * alone


def retext_term(edited: Tensor, sample: EditSample, *, wrong_credit: float = 0.25, temperature: float = 0.03,
                sharpness: float = 0.05, shift_penalty: float = 0.2, max_shift: int = 1) -> Tensor:
    t = sample.truth
    ink = soft_ink(edited[None], t["clean"].to(edited)[None], sample.mask.to(edited)[None], sharpness)
    n = len(t["cells"])
    prob, iou = read_cells(ink, torch.zeros(n, dtype=torch.long, device=edited.device),
                           torch.tensor(t["cells"], device=edited.device), temperature=temperature,
                           shift_penalty=shift_penalty, max_shift=max_shift)
    credit = torch.zeros(n, iou.shape[2], dtype=edited.dtype, device=edited.device)
    credit[:, :len(GLYPHS)] = wrong_credit
    for i, (old, new) in enumerate(zip(t["text"], t["new_text"])):
        credit[i, GLYPHS.index(old)] = 0.0   # the text left as it was
        credit[i, GLYPHS.index(new)] = 1.0
    return (prob * credit[:, None] * iou).sum((1, 2)).mean()


def restyle_term(edited: Tensor, sample: EditSample, *, wrong_credit: float = 0.25,
                 grain_scale: float = 0.1) -> Tensor:
    t = sample.truth
    f = backgrounds.features(edited, sample.mask.to(edited))
    p = backgrounds.probabilities_from(f)
    kinds = list(BACKGROUNDS)
    third = [k for k in kinds if k not in (t["new_kind"], t["bg_kind"])]
    q = p[kinds.index(t["new_kind"])] + wrong_credit * sum(p[kinds.index(k)] for k in third)
    return q * torch.exp(-f["grain"] / grain_scale)


TERMS = {"recolour": recolour_term, "remove_named": remove_term, "add": add_term, "retext": retext_term,
         "restyle": restyle_term}


def instruction_following_term(edited: Tensor, sample: EditSample) -> Tensor:
    """The instruction-following quality in [0, 1] of one edited image [3,H,W] for its sample."""
    if sample.task not in TERMS:
        raise ValueError(f"no instruction-following term for task {sample.task!r}; expected one of {list(TERMS)}")
    return TERMS[sample.task](edited.to(torch.promote_types(edited.dtype, torch.float32)), sample)
