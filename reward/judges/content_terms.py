"""Fill's content term of the rule judge, which pays for identity (which shape), not colour mass
(text's is reward/judges/text_terms.py, extend's reward/judges/extend_terms.py).

The soft-IoU content terms the rule judge (reward/judges/rule_judge.py) had before these paid a
filled box |truth| / |box|: RL learned to paint solid blocks of ink and blobs of the right colour,
and the judge's score rose while glyph and shape accuracy fell. The term here reads the edit the
way core/synthetic/metrics.py does — classify the drawn shape — but softly, so it stays differentiable in
the edited image:

- `fill_alignment_term`: the pixels that newly took the requested colour (colour), softly classified
  as one of the world's shapes, as "the whole mask" or as "no shape" (shape), times their soft IoU
  with the requested object's mask (placement). The right shape pays 1, another shape
  `wrong_shape_credit`, a mask-filling blob or a shapeless region 0.

A wrong but well-formed answer keeps partial credit on purpose: it must outscore the hacks (a solid
block, an empty region, noise), or RL has no slope from junk towards well-formed content.

It takes edited [3,H,W] (scalar result) or [B,3,H,W] (result [B]) and the world's EditSample, one
for all images (G rollouts of one condition) or a sequence of B.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from core.synthetic.world import COLOURS, SHAPES, EditSample

#: area of each world shape in units of r^2 (core.synthetic.world.shape_mask), to fit r from a region's area
_AREA = {"circle": math.pi, "square": 1.7**2, "triangle": 2.0, "diamond": 2 * 1.1**2}
#: how far a shape's centroid lies below its centre, in units of r (the triangle is apex up)
_CENTROID_DROP = {"circle": 0.0, "square": 0.0, "triangle": 1.0 / 3.0, "diamond": 0.0}
_COLOUR_TABLE = torch.tensor([COLOURS[c] for c in COLOURS])
_COLOUR_INDEX = {c: i for i, c in enumerate(COLOURS)}


def as_batch(edited: Tensor,
             sample: EditSample | Sequence[EditSample]) -> tuple[Tensor, list[EditSample], bool]:
    """edited as [B,3,H,W] (at least float32), one sample per image, and whether it was one image."""
    single = edited.dim() == 3
    e = edited[None] if single else edited
    if e.dim() != 4 or e.shape[1] != 3:
        raise ValueError(f"edited must be [3,H,W] or [B,3,H,W], got {tuple(edited.shape)}")
    samples = [sample] * e.shape[0] if isinstance(sample, EditSample) else list(sample)
    if len(samples) != e.shape[0]:
        raise ValueError(f"{e.shape[0]} edited images for {len(samples)} samples")
    return e.to(torch.promote_types(e.dtype, torch.float32)), samples, single


def stack_truth(samples: list[EditSample], get: Callable[[EditSample], Tensor], like: Tensor) -> Tensor:
    """[B, ...]: get(sample) of every sample, on like's dtype and device."""
    # G rollouts of one condition share its tensors: one expand instead of B copies
    if all(s is samples[0] for s in samples):
        return get(samples[0]).to(like)[None].expand(len(samples), *get(samples[0]).shape)
    return torch.stack([get(s) for s in samples]).to(like)


# -- fill ---------------------------------------------------------------------------------------

def colour_probability(pixels: Tensor, colour: Sequence[str] | str | Tensor, reference: Tensor | None = None, *,
                       sigma: float = 0.12, reject_distance: float = 0.3) -> Tensor:
    """[N]: P(pixel is the named colour) for pixels [N,3] (one colour name, one per pixel, or their
    indices in core.synthetic.world.COLOURS as a long tensor [N]) under a soft nearest-colour classifier.

    Classes: the world's named colours, "none" at RGB distance `reject_distance` and, with a
    `reference` [N,3], "unchanged" (distance to the reference pixel). Named colours lie >= 0.31
    apart; at sigma 0.12 a pixel with noise 0.1 per channel (~0.17 away) still reads as its colour,
    while background greys and noise, far from every named colour, read as none or unchanged.
    """
    if isinstance(colour, Tensor):
        idx = colour.to(pixels.device)
    elif isinstance(colour, str):
        idx = torch.full((pixels.shape[0],), _COLOUR_INDEX[colour], device=pixels.device)
    else:
        idx = torch.tensor([_COLOUR_INDEX[n] for n in colour], device=pixels.device)
    return _colour_probability(pixels, idx, reference, sigma, reject_distance)


def _colour_probability(pixels: Tensor, idx: Tensor, reference: Tensor | None, sigma: float,
                        reject_distance: float) -> Tensor:
    table = _COLOUR_TABLE.to(pixels)
    # explicit squares, not cdist: cdist's backward divides by the distance, 0 on a perfect pixel
    d = ((pixels[:, None, :] - table[None]) ** 2).sum(-1)  # [N, C]
    extra = [torch.full_like(d[:, :1], reject_distance**2)]
    if reference is not None:
        extra.append(((pixels - reference) ** 2).sum(1, keepdim=True))
    logits = torch.cat([d] + extra, 1) / (-2 * sigma**2)
    return torch.softmax(logits, 1).gather(1, idx[:, None])[:, 0]


def soft_iou(p: Tensor, m: Tensor) -> Tensor:
    """Soft IoU over the last two dimensions."""
    inter = (p * m).sum((-2, -1))
    return inter / (p + m - p * m).sum((-2, -1)).clamp_min(1e-6)


def shape_masks(h: int, w: int, cy: Tensor, cx: Tensor, r: Tensor) -> Tensor:
    """[B, len(SHAPES), h, w] binary masks of every world shape, shape i at (cy, cx, r)[:, i] ([B, S]).

    The same geometry as core.synthetic.world.shape_mask, batched.
    """
    ys = torch.arange(h, dtype=cy.dtype, device=cy.device)[:, None] + 0.5 - cy[..., None, None]
    xs = torch.arange(w, dtype=cy.dtype, device=cy.device)[None, :] + 0.5 - cx[..., None, None]
    r = r[..., None, None]
    out = []
    for i, s in enumerate(SHAPES):
        y, x, rr = ys[:, i], xs[:, i], r[:, i]
        if s == "circle":
            m = y**2 + x**2 <= rr * rr
        elif s == "square":
            m = (y.abs() <= 0.85 * rr) & (x.abs() <= 0.85 * rr)
        elif s == "triangle":
            m = (y >= -rr) & (y <= rr) & (x.abs() <= (y + rr) / 2)
        elif s == "diamond":
            m = y.abs() + x.abs() <= 1.1 * rr
        else:  # a shape added to the world without a rule here must not be silently misread
            raise ValueError(f"no rule for shape {s!r}")
        out.append(m)
    return torch.stack(out, 1).to(cy.dtype)


def cosine(p: Tensor, m: Tensor) -> Tensor:
    """Cosine similarity of two maps over the last two dimensions: unlike IoU it does not fall when
    a region is drawn faintly or noisily everywhere (a uniformly scaled region keeps its shape)."""
    norms = ((p * p).sum((-2, -1)) * (m * m).sum((-2, -1))).clamp_min(1e-12)  # before the sqrt: finite grads
    return (p * m).sum((-2, -1)) / norms.sqrt()


def _box3(x: Tensor) -> Tensor:
    """3x3 mean over the last two dimensions (any leading shape)."""
    flat = x.reshape(-1, 1, *x.shape[-2:])
    return F.avg_pool2d(flat, 3, stride=1, padding=1, count_include_pad=False).reshape(x.shape)


def neighbourhood_weighted(region: Tensor) -> Tensor:
    """A soft region [B,H,W] with each pixel weighed by how much of its 3x3 neighbourhood is region
    too, saturating at half: a stroke's or a shape's edge keeps its weight, isolated pixels that
    noise pushed towards the colour lose most of theirs."""
    return region * (2 * _box3(region)).clamp(max=1.0)


def shape_probabilities(region: Tensor, mask: Tensor, *, temperature: float = 0.015,
                        reject_similarity: float = 0.86, mask_preference: float = 0.05,
                        radius_scales: Sequence[float] = (0.92, 1.0, 1.08)) -> Tensor:
    """[B, len(SHAPES)+2]: soft reading of a soft region [B,H,W] as each world shape, "the whole
    mask" (mask [B,H,W]), or "no shape".

    Every shape is fitted to the region by its moments (support (sum p)^2 / sum p^2 -> r, centroid
    -> centre; the fit is detached: the gradient flows through the similarities, not the
    template's pose) and scored by cosine similarity, the best over `radius_scales` times the
    fitted r: a noisy region's support is a little off, and a small circle fitted a little too
    small reads as a square (one noisy circle of seed 7 read P(circle) = 0.1 without the search,
    >= 0.95 with it). Logits are similarity / temperature; a fitted wrong shape still reaches ~0.9
    against a right one's ~0.97, hence the small temperature.

    Before the comparison each pixel is weighed by how much of its 3x3 neighbourhood is region too
    (saturating at half): isolated pixels that noise pushed towards the colour are no shape's
    evidence, while a stroke's edge pixels keep their weight.

    "No shape" has the fixed similarity `reject_similarity`: a region no template fits (an
    irregular blob, two merged discs, scattered pixels: best similarity <= 0.84 on held-out
    worlds) reads as nothing, while well-formed shapes under noise 0.1 stay above it (>= 0.88,
    median 0.98). "The whole
    mask" catches a block that fills the edit region; a template of its size (a big square on a
    box mask, a big disc on a round one) fits it exactly too, so the mask reading gets
    `mask_preference` on top: a region that is the mask reads as "filled the mask".
    """
    H, W = region.shape[-2:]
    with torch.no_grad():
        mass = region.sum((-2, -1)).clamp_min(1e-6)
        support = (mass**2 / (region * region).sum((-2, -1)).clamp_min(1e-6)).clamp_min(1.0)
        ys = torch.arange(H, dtype=region.dtype, device=region.device)[:, None] + 0.5
        xs = torch.arange(W, dtype=region.dtype, device=region.device)[None, :] + 0.5
        my = (region * ys).sum((-2, -1)) / mass
        mx = (region * xs).sum((-2, -1)) / mass
        k = torch.tensor([_AREA[s] for s in SHAPES], dtype=region.dtype, device=region.device)
        drop = torch.tensor([_CENTROID_DROP[s] for s in SHAPES], dtype=region.dtype, device=region.device)
        r0 = (support[:, None] / k).sqrt()
        templates = torch.stack([
            shape_masks(H, W, my[:, None] - drop * r, mx[:, None].expand_as(r), r)
            for r in (r0 * f for f in radius_scales)], 2)  # [B, S, scales, H, W]
    return read_shape(region, templates, mask, temperature=temperature, reject_similarity=reject_similarity,
                      mask_preference=mask_preference)


def read_shape(region: Tensor, templates: Tensor, mask: Tensor | None, *, temperature: float = 0.015,
               reject_similarity: float = 0.86, mask_preference: float = 0.05) -> Tensor:
    """[B, S (+1) +1]: soft reading of a region [B,H,W] as each of S templates [B,S,n,H,W] (the best
    of its n poses), as "the whole mask" when a mask [B,H,W] is given, or as "no shape"; the
    neighbourhood weighting and logits of `shape_probabilities`."""
    region = neighbourhood_weighted(region)
    readings = [cosine(region[:, None, None], templates).amax(2)]  # [B, S]
    if mask is not None:
        readings.append(cosine(region, mask)[:, None] + mask_preference)
    readings.append(torch.full_like(readings[0][:, :1], reject_similarity))
    return torch.softmax(torch.cat(readings, 1) / temperature, 1)


def support_windows(support: Tensor, margin: int) -> tuple[Tensor, Tensor]:
    """Row [B,h] and column [B,w] indices of one window per image covering its support [B,H,W]
    plus `margin`; one size for the batch (the largest), kept inside the image."""

    def span(hit: Tensor) -> Tensor:  # hit: [B, n], does this row (column) hold support
        size_all = hit.shape[1]
        idx = torch.arange(size_all, device=hit.device)
        first = torch.where(hit, idx, size_all).amin(1) - margin
        last = torch.where(hit, idx, -1).amax(1) + margin
        first = torch.where(last < first, torch.zeros_like(first), first)  # an empty support
        size = min(int((last - first + 1).max()), size_all)
        start = first.clamp(min=0, max=size_all - size)
        return start[:, None] + torch.arange(size, device=hit.device)

    return span(support.any(2)), span(support.any(1))


def crop(x: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """The windows [B,h,w,...] of x [B,H,W,...] at `support_windows`' indices."""
    n = torch.arange(x.shape[0], device=x.device)[:, None, None]
    return x[n, rows[:, :, None], cols[:, None, :]]


def fill_alignment_term(edited: Tensor, sample: EditSample | Sequence[EditSample], *,
                        wrong_shape_credit: float = 0.25, shape_temperature: float = 0.015,
                        reject_similarity: float = 0.86, mask_preference: float = 0.05,
                        colour_sigma: float = 0.12, colour_reject_distance: float = 0.3) -> Tensor:
    """Colour x shape x placement of a fill, in [0, 1].

    colour:    the pixels in the mask that read as the requested colour and did not already (an
               object of that colour in the source, cut by the mask, is no credit to the edit);
    shape:     P(requested shape) + wrong_shape_credit * P(another shape) of that region;
    placement: its soft IoU with the requested object's mask.
    """
    e, samples, single = as_batch(edited, sample)
    source = stack_truth(samples, lambda s: s.source, e)
    mask = stack_truth(samples, lambda s: s.mask, e)[:, 0]
    target = stack_truth(samples, lambda s: s.truth["object"]["mask"], e)[:, 0]
    # nothing outside the mask can count, so every map is cut to a window around it (the shape
    # templates are most of the work: ~3x less of it on 64x64 worlds)
    rows, cols = support_windows(torch.maximum(mask, target) > 0, margin=1)
    mask, target = crop(mask, rows, cols), crop(target, rows, cols)
    e, source = (crop(t.permute(0, 2, 3, 1), rows, cols) for t in (e, source))  # [B,h,w,3]
    b, y, x = (mask > 0).nonzero(as_tuple=True)
    colours = torch.tensor([_COLOUR_INDEX[s.truth["object"]["colour"]] for s in samples], device=e.device)[b]
    pixels, before = e[b, y, x], source[b, y, x]
    with torch.no_grad():
        # objects already in the source are flat named colours: a tight kernel finds them and
        # leaves tinted backgrounds (~0.35 from the nearest named colour) alone
        already = _colour_probability(before, colours, None, 0.05, 0.15)
    p = _colour_probability(pixels, colours, before, colour_sigma, colour_reject_distance)
    p = p * mask[b, y, x] * (1 - already)
    region = torch.zeros_like(mask).index_put((b, y, x), p)
    probs = shape_probabilities(region, mask, temperature=shape_temperature,
                                reject_similarity=reject_similarity, mask_preference=mask_preference)
    right = torch.tensor([SHAPES.index(s.truth["object"]["shape"]) for s in samples], device=e.device)
    p_right = probs.gather(1, right[:, None])[:, 0]
    shape = p_right + wrong_shape_credit * (probs[:, :len(SHAPES)].sum(1) - p_right)
    out = shape * soft_iou(region, target)
    return out[0] if single else out
