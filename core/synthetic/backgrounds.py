"""Reading a background's kind (gradient, stripes, texture: core.synthetic.world.BACKGROUNDS) from pixels.

The restyle task ("change the background to stripes") names a kind, not one picture: any striped
background is an answer, whatever its period or colours. core.synthetic.metrics (style accuracy) and the
rule judge (reward/judges/instruction_terms.py) both read the kind with this module, the judge
softly: every step is differentiable in the image.

The kinds differ in which simple model explains the background region (the pixels off the objects):

- gradient: a plane (colour linear in y and x) explains it: `planar`, the share of the variance a
  plane leaves, is ~0 (<= 0.05 under noise 0.1 on the world's backgrounds; stripes >= 0.96,
  textures >= 0.70);
- stripes: rows (or columns) are constant: `axial`, the share of the variance left by row (column)
  means, is ~0 (<= 0.02; textures >= 0.53), and the change between neighbours is sharp along one
  axis only: `edges` >= 0.55 (gradients and textures <= 0.16);
- texture: neither.

Noise would blur every share, so each is measured above a noise floor: the mean squared
difference of neighbours along the quieter axis (stripes change along one axis only, smooth
backgrounds slowly along both) estimates twice the per-pixel noise variance, `grain`, which is
taken off every variance. A background with little variance above that floor (`contrast`), or
whose variance is mostly grain (`pattern`, the share of the variance above the floor: noise and
flat fills, not kinds at all), reads as "none". The thresholds hold for backgrounds of contrast
>= MIN_CONTRAST, which the restyle task's targets have (see core/synthetic/instruction_world.py).
"""
from __future__ import annotations

import torch
from torch import Tensor

from core.synthetic.world import BACKGROUNDS

#: the kinds, then "none" (the order of `kind_probabilities`' columns)
KINDS: tuple[str, ...] = (*BACKGROUNDS, "none")
#: the least variance (summed over channels, over the image) a restyle target's background has
MIN_CONTRAST = 0.01


def _batched(image: Tensor, region: Tensor) -> tuple[Tensor, Tensor, bool]:
    single = image.dim() == 3
    e = image[None] if single else image
    r = region[None] if region.dim() == 3 else region
    if e.dim() != 4 or e.shape[1] != 3 or r.shape[-2:] != e.shape[-2:]:
        raise ValueError(f"image must be [3,H,W] or [B,3,H,W] with a region [1,H,W] or [B,1,H,W] of its size, "
                         f"got {tuple(image.shape)} and {tuple(region.shape)}")
    e = e.to(torch.promote_types(e.dtype, torch.float32))
    return e, (r > 0.5).to(e).expand(e.shape[0], 1, *e.shape[-2:]), single


def contrast(image: Tensor) -> float:
    """The variance of an image [3,H,W] around its mean colour, summed over channels."""
    return float(((image - image.mean((1, 2), keepdim=True)) ** 2).sum(0).mean())


def features(image: Tensor, region: Tensor) -> dict[str, Tensor]:
    """The features of the module docstring for the pixels of `region` ([B] each, or scalars for
    one image): contrast, pattern, planar, axial, edges, grain."""
    e, w, single = _batched(image, region)
    B, _, H, W = e.shape
    n = w.sum((1, 2, 3)).clamp_min(1.0)

    def var(resid: Tensor) -> Tensor:  # mean over the region of the squared residual, summed over channels
        return (resid**2 * w).sum((1, 2, 3)) / n

    mean = (e * w).sum((2, 3), keepdim=True) / n[:, None, None, None]
    total = var(e - mean)
    # the plane: weighted least squares on (1, y, x), the design fixed (only the image carries gradients)
    ys = torch.linspace(-0.5, 0.5, H, dtype=e.dtype, device=e.device)[:, None].expand(H, W)
    xs = torch.linspace(-0.5, 0.5, W, dtype=e.dtype, device=e.device)[None, :].expand(H, W)
    basis = torch.stack([torch.ones_like(ys), ys, xs]).reshape(3, H * W)           # [3, HW]
    wf = w.reshape(B, 1, H * W)
    gram = torch.einsum("kp,blp,jp->bkj", basis, wf, basis) + 1e-6 * torch.eye(3, dtype=e.dtype, device=e.device)
    rhs = torch.einsum("kp,bp,bcp->bkc", basis, wf[:, 0], e.reshape(B, 3, H * W))    # [B, 3 basis, 3 channels]
    coef = torch.linalg.solve(gram, rhs)
    plane = torch.einsum("kp,bkc->bcp", basis, coef).reshape(B, 3, H, W)
    rows = (e * w).sum(3, keepdim=True) / w.sum(3, keepdim=True).clamp_min(1.0)
    cols = (e * w).sum(2, keepdim=True) / w.sum(2, keepdim=True).clamp_min(1.0)
    wy, wx = w[:, :, 1:] * w[:, :, :-1], w[:, :, :, 1:] * w[:, :, :, :-1]
    step_y = ((e[:, :, 1:] - e[:, :, :-1]) ** 2 * wy).sum((1, 2, 3)) / wy.sum((1, 2, 3)).clamp_min(1.0)
    step_x = ((e[:, :, :, 1:] - e[:, :, :, :-1]) ** 2 * wx).sum((1, 2, 3)) / wx.sum((1, 2, 3)).clamp_min(1.0)
    grain = torch.minimum(step_y, step_x) / 2
    signal = (total - grain).clamp_min(1e-6)
    out = {
        "contrast": signal,
        "pattern": signal / total.clamp_min(1e-6),
        "planar": (var(e - plane) - grain).clamp_min(0) / signal,
        "axial": (torch.minimum(var(e - rows), var(e - cols)) - grain).clamp_min(0) / signal,
        "edges": (torch.maximum(step_y, step_x) - torch.minimum(step_y, step_x)) / signal,
        "grain": grain,
    }
    return {k: v[0] for k, v in out.items()} if single else out


def kind_probabilities(image: Tensor, region: Tensor, *, temperature: float = 0.05, texture_level: float = 0.25,
                       stripe_edges: float = 0.4, min_contrast: float = 0.003, min_pattern: float = 0.12) -> Tensor:
    """[B, 4] (or [4] for one image): P(gradient), P(stripes), P(texture), P(none) of the background
    in `region`. Logits: gradient -planar, stripes -(axial + the edges missing below
    `stripe_edges`), texture a fixed -`texture_level` (less the edges above stripe_edges: sharp
    changes are no texture), over `temperature`; "none" is the share of the gate
    sigmoid(contrast above `min_contrast`) x sigmoid(pattern above `min_pattern`) that is closed."""
    return probabilities_from(features(image, region), temperature=temperature, texture_level=texture_level,
                              stripe_edges=stripe_edges, min_contrast=min_contrast, min_pattern=min_pattern)


def probabilities_from(f: dict[str, Tensor], *, temperature: float = 0.05, texture_level: float = 0.25,
                       stripe_edges: float = 0.4, min_contrast: float = 0.003, min_pattern: float = 0.12) -> Tensor:
    """`kind_probabilities` from already computed `features`."""
    planar, axial, edges = f["planar"], f["axial"], f["edges"]
    logits = torch.stack([
        -planar,
        -(axial + (stripe_edges - edges).clamp_min(0)),
        -(texture_level + (edges - stripe_edges).clamp_min(0)),
    ], -1) / temperature
    gate = torch.sigmoid((f["contrast"] - min_contrast) / (min_contrast / 6)) * \
        torch.sigmoid((f["pattern"] - min_pattern) / 0.03)
    return torch.cat([torch.softmax(logits, -1) * gate[..., None], (1 - gate)[..., None]], -1)


def read_kind(image: Tensor, region: Tensor) -> str:
    """The most probable of KINDS for one image [3,H,W] and its background region [1,H,W]."""
    with torch.no_grad():
        return KINDS[int(kind_probabilities(image, region).argmax())]
