"""The rule judge's content term for an extend whose prompt describes an object in the new area.

"A striped background with a red circle": the new area must hold that object, in the place where
the kept part of the canvas says it continues, and the described background around it. A soft IoU
of red pixels with the object's part in the new area pays a red block |part| / |area|, as the
fill and text terms did before they read identity (reward/judges/content_terms.py); this term
reads identity too:

- colour:     the pixels of the new area that read as the described colour rather than as the
              true background under them or as no colour; the other objects' places do not count,
              so a second object of that colour in the truth is no noise;
- shape:      that region against every world shape at the object's true pose, clipped to the new
              area. The pose is the truth's, not fitted from the region's moments as for fill: the
              object is often cut by the border of the new area, and the kept part fixes where it
              must continue (each template still slides up to `max_shift` pixels to the region's
              centroid, so a right shape drawn a little off reads right and placement pays for the
              offset). The right shape pays 1, another `wrong_shape_credit`, no shape 0. "No shape"
              sits at similarity 0.9 with temperature 0.01, stricter than fill's 0.86 / 0.015: a
              cut object shows only a cap, which a blob or an oversized disc resembles more than a
              whole shape does (worlds 0 and 29: blob 0.16 -> 0.04, disc 1.25 r 0.22 -> 0.11, while
              the noisy truth stays at 0.78 and a wrong shape at 0.15);
- placement:  the region's soft IoU with the object's part in the new area;
- background: fidelity of the rest of the new area to the true continuation, blurred so that
              grain is the aesthetics dimension's business, not this one's; the prompt asks for
              the background too, and without it the object on a grey void would be a full answer.

The term is shape x placement x background. Same calling convention as content_terms.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from core.masks import dilate
from core.synthetic.world import COLOURS, SHAPES, EditSample
from reward.judges.content_terms import (
    as_batch,
    colour_probability,
    crop,
    neighbourhood_weighted,
    read_shape,
    shape_masks,
    soft_iou,
    stack_truth,
    support_windows,
)


def _described(s: EditSample) -> dict:
    d = s.truth.get("described")
    if d is None:
        raise ValueError(f"{s.key}: the extend prompt describes no object (judge it by fidelity instead)")
    return d


def _others(s: EditSample) -> Tensor:
    """[1,H,W]: where the other objects of the scene lie, grown by a pixel (objects sit >= 6 apart)."""
    d = _described(s)
    out = torch.zeros_like(s.mask)
    for o in s.truth["objects"]:
        if (o["cy"], o["cx"]) != (d["cy"], d["cx"]):
            out = torch.maximum(out, o["mask"])
    return dilate(out, 1)


def _blur(x: Tensor, k: int) -> Tensor:
    return F.avg_pool2d(x, k, stride=1, padding=k // 2, count_include_pad=False)


def _shape_reading(region: Tensor, area: Tensor, described: list[dict], radius_scales: Sequence[float],
                   max_shift: float, temperature: float, reject_similarity: float) -> Tensor:
    """`read_shape` of the region against every shape at the true pose and `radius_scales`,
    clipped to the new area, each moved so that its centroid meets the region's (by at most
    `max_shift` pixels: a right shape drawn a little off still reads right, placement pays for
    the offset). A search over offsets instead lets a shapeless blob find some pose a shape fits.
    Done on a window around the object: outside it no template reaches, and the leak of a noisy
    background far away would drag the centroid."""
    B = region.shape[0]
    r_max = max(d["r"] for d in described) * max(radius_scales)
    # the largest template reaches 1.1 r from the centre, the smallest object 0.85 r (a square)
    rows, cols = support_windows(torch.stack([d["mask"][0] > 0 for d in described]).to(region.device),
                                 margin=math.ceil(0.25 * r_max + max_shift) + 1)
    region, area = crop(region, rows, cols), crop(area, rows, cols)
    h, w = region.shape[-2:]
    pose = torch.tensor([[d["cy"], d["cx"], d["r"]] for d in described], dtype=region.dtype, device=region.device)
    cy, cx, r = (pose[:, 0] - rows[:, 0]), (pose[:, 1] - cols[:, 0]), pose[:, 2]
    S, scales = len(SHAPES), torch.tensor(radius_scales, dtype=region.dtype, device=region.device)

    def templates(dy: Tensor, dx: Tensor) -> Tensor:  # [B, S, scales, h, w], offsets [B, S, scales]
        return torch.stack([shape_masks(h, w, cy[:, None] + dy[..., i], cx[:, None] + dx[..., i],
                                        (r[:, None] * f).expand(B, S))
                            for i, f in enumerate(scales)], 2) * area[:, None, None]

    with torch.no_grad():
        ys = torch.arange(h, dtype=region.dtype, device=region.device)[:, None]
        xs = torch.arange(w, dtype=region.dtype, device=region.device)[None, :]

        def centroid(x: Tensor) -> tuple[Tensor, Tensor]:
            mass = x.sum((-2, -1)).clamp_min(1e-6)
            return (x * ys).sum((-2, -1)) / mass, (x * xs).sum((-2, -1)) / mass

        zero = torch.zeros(B, S, len(scales), dtype=region.dtype, device=region.device)
        at_pose = templates(zero, zero)
        weighted = neighbourhood_weighted(region)
        ry, rx = (c[:, None, None] for c in centroid(weighted))
        ty, tx = centroid(at_pose)
        drawn = (weighted.sum((-2, -1)) > 1.0)[:, None, None]  # an empty region stays at the pose
        dy = torch.where(drawn, (ry - ty).clamp(-max_shift, max_shift), zero)
        dx = torch.where(drawn, (rx - tx).clamp(-max_shift, max_shift), zero)
        moved = templates(dy, dx)
    return read_shape(region, moved, None, temperature=temperature, reject_similarity=reject_similarity)


def extend_alignment_term(edited: Tensor, sample: EditSample | Sequence[EditSample], *,
                          wrong_shape_credit: float = 0.25, shape_temperature: float = 0.01,
                          reject_similarity: float = 0.9, colour_sigma: float = 0.12,
                          colour_reject_distance: float = 0.3, radius_scales: Sequence[float] = (0.92, 1.0, 1.08),
                          max_shift: float = 2.0, background_scale: float = 0.02, blur: int = 5) -> Tensor:
    """Shape x placement x background of the described object in the new area, in [0, 1]."""
    e, samples, single = as_batch(edited, sample)
    described = [_described(s) for s in samples]
    target = stack_truth(samples, lambda s: s.target, e)
    area = stack_truth(samples, lambda s: s.mask, e)[:, 0]
    obj = stack_truth(samples, lambda s: _described(s)["mask"], e)[:, 0]
    free = area * (1 - stack_truth(samples, _others, e)[:, 0])
    # what the new area would hold without the object: a pixel counts as the colour only when it
    # is nearer to it than to that (a tinted background can lie ~0.35 from a named colour, and
    # over the whole new area the soft leak of its pixels would outweigh the object)
    bare = target * (1 - obj[:, None]) + stack_truth(samples, lambda s: s.truth["background"], e) * obj[:, None]
    b, y, x = (free > 0).nonzero(as_tuple=True)
    colours = torch.tensor([list(COLOURS).index(d["colour"]) for d in described], device=e.device)[b]
    p = colour_probability(e[b, :, y, x], colours, bare[b, :, y, x], sigma=colour_sigma,
                           reject_distance=colour_reject_distance)
    region = torch.zeros_like(free).index_put((b, y, x), p * free[b, y, x])
    probs = _shape_reading(region, area, described, radius_scales, max_shift, shape_temperature, reject_similarity)
    right = torch.tensor([SHAPES.index(d["shape"]) for d in described], device=e.device)
    p_right = probs.gather(1, right[:, None])[:, 0]
    shape = p_right + wrong_shape_credit * (probs[:, :len(SHAPES)].sum(1) - p_right)
    # weighted as the shape reading weighs it: over a new area many times the object's size, the
    # soft leak of noisy background pixels would otherwise dominate the union
    placement = soft_iou(neighbourhood_weighted(region), obj * area)
    rest = (area * (1 - dilate(obj[:, None], 3)[:, 0]))[:, None]
    err = ((_blur(e, blur) - _blur(target, blur)) ** 2 * rest).sum((1, 2, 3)) / (3 * rest.sum((1, 2, 3))).clamp_min(1e-6)
    out = shape * placement * torch.exp(-err / background_scale)
    return out[0] if single else out
