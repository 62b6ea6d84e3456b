"""Mask generators (box, ellipse, brush strokes, dilated object, outpainting canvas) and validation.

Masks are float tensors [1, H, W] (or [B, 1, H, W]) with 1 = the region the model generates.
Generators take a `torch.Generator` so data is deterministic from a seed.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def _grid(h: int, w: int) -> tuple[Tensor, Tensor]:
    ys = torch.arange(h, dtype=torch.float32)[:, None].expand(h, w)
    xs = torch.arange(w, dtype=torch.float32)[None, :].expand(h, w)
    return ys, xs


def box_mask(h: int, w: int, top: int, left: int, height: int, width: int) -> Tensor:
    m = torch.zeros(1, h, w)
    m[:, max(top, 0):max(top + height, 0), max(left, 0):max(left + width, 0)] = 1.0
    return m


def ellipse_mask(h: int, w: int, cy: float, cx: float, ry: float, rx: float) -> Tensor:
    ys, xs = _grid(h, w)
    inside = ((ys + 0.5 - cy) / ry) ** 2 + ((xs + 0.5 - cx) / rx) ** 2 <= 1.0
    return inside.float()[None]


def dilate(mask: Tensor, radius: int) -> Tensor:
    """Binary dilation by a (2r+1)^2 square: an object's mask grown so its edge is inside the edit."""
    if radius <= 0:
        return mask.clone()
    squeeze = mask.dim() == 3
    m = mask[None] if squeeze else mask
    out = F.max_pool2d(m, 2 * radius + 1, stride=1, padding=radius)
    return out[0] if squeeze else out


def erode(mask: Tensor, radius: int) -> Tensor:
    return 1.0 - dilate(1.0 - mask, radius)


def brush_mask(h: int, w: int, generator: torch.Generator, *, strokes: int = 3, width: tuple[int, int] = (4, 9),
               length: tuple[int, int] = (3, 7)) -> Tensor:
    """Free-form strokes: random walks of thick round segments (as inpainting datasets draw them)."""
    ys, xs = _grid(h, w)
    m = torch.zeros(h, w, dtype=torch.bool)

    def rand(lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=generator))

    for _ in range(strokes):
        y, x = rand(0.2 * h, 0.8 * h), rand(0.2 * w, 0.8 * w)
        radius = rand(*width) / 2
        for _ in range(int(rand(*length))):
            angle = rand(0, 2 * math.pi)
            step = rand(0.1 * h, 0.25 * h)
            ny = min(max(y + step * math.sin(angle), 0.0), h - 1.0)
            nx = min(max(x + step * math.cos(angle), 0.0), w - 1.0)
            # distance from every pixel to the segment (y,x)-(ny,nx)
            dy, dx = ny - y, nx - x
            seg2 = max(dy * dy + dx * dx, 1e-6)
            u = (((ys - y) * dy + (xs - x) * dx) / seg2).clamp(0, 1)
            d2 = (ys - (y + u * dy)) ** 2 + (xs - (x + u * dx)) ** 2
            m |= d2 <= radius * radius
            y, x = ny, nx
    return m.float()[None]


def outpaint_mask(h: int, w: int, *, top: float = 0.0, bottom: float = 0.0, left: float = 0.0,
                  right: float = 0.0) -> Tensor:
    """Mask for extending an image: the given fraction of each side is new (1), the centre is kept."""
    for name, r in (("top", top), ("bottom", bottom), ("left", left), ("right", right)):
        if not 0.0 <= r < 1.0:
            raise ValueError(f"outpaint ratio {name}={r} must be in [0, 1)")
    if top + bottom >= 1.0 or left + right >= 1.0:
        raise ValueError("outpaint ratios leave no original image: top + bottom and left + right must be < 1")
    m = torch.ones(1, h, w)
    t, b = round(top * h), h - round(bottom * h)
    l, r = round(left * w), w - round(right * w)
    m[:, t:b, l:r] = 0.0
    return m


def pad_for_outpaint(image: Tensor, *, top: float = 0.0, bottom: float = 0.0, left: float = 0.0,
                     right: float = 0.0, fill: float = 0.5) -> tuple[Tensor, Tensor]:
    """Place `image` [3,h,w] on a larger canvas grown by the given ratios of its own size.

    Returns (canvas [3,H,W] with `fill` in the new area, mask [1,H,W] with 1 on the new area).
    """
    _, h, w = image.shape
    pt, pb, pl, pr = (round(top * h), round(bottom * h), round(left * w), round(right * w))
    canvas = torch.full((3, h + pt + pb, w + pl + pr), fill, dtype=image.dtype)
    canvas[:, pt:pt + h, pl:pl + w] = image
    mask = torch.ones(1, h + pt + pb, w + pl + pr)
    mask[:, pt:pt + h, pl:pl + w] = 0.0
    return canvas, mask


def validate_mask(mask: Tensor, image: Tensor | None = None, *, threshold: float = 0.5,
                  binary_tolerance: float = 0.02, name: str = "mask") -> Tensor:
    """Check a user mask and return it as a binary float tensor of the same layout.

    Accepts [1, H, W] (one mask) or [B, 1, H, W]; `image` is [3, H, W] or [B, 3, H, W].
    Errors, each naming the fix: more than one channel; a size different from the image's;
    values that are not binary after thresholding (more than `binary_tolerance` of the pixels
    strictly between 0.02 and 0.98, i.e. a soft or photographic mask); nothing to edit.
    """
    if mask.dim() not in (3, 4) or mask.shape[-3] != 1:
        raise ValueError(
            f"{name} must be single-channel, shaped [1, H, W] or [B, 1, H, W]; got {tuple(mask.shape)}. "
            "Convert an RGB mask with mask.mean(0, keepdim=True) or load it with core.io.image_io.load_mask."
        )
    if image is not None and mask.shape[-2:] != image.shape[-2:]:
        raise ValueError(
            f"{name} is {tuple(mask.shape[-2:])} but the image is {tuple(image.shape[-2:])}: "
            "resize the mask to the image (core.io.image_io.resize_mask) before editing."
        )
    if not torch.isfinite(mask).all():
        raise ValueError(f"{name} has non-finite values")
    m = mask.float()
    if float(m.min()) < 0 or float(m.max()) > 1:
        raise ValueError(f"{name} values must lie in [0, 1] (1 = generate); got [{float(m.min())}, {float(m.max())}]")
    soft = ((m > 0.02) & (m < 0.98)).float().mean().item()
    if soft > binary_tolerance:
        raise ValueError(
            f"{name} is not binary: {soft:.1%} of its pixels are neither 0 nor 1. Threshold it "
            f"(mask > {threshold}) or use a hard mask; 1 marks the region to generate."
        )
    hard = (m > threshold).float()
    per_item = hard.flatten(1).sum(1) if hard.dim() == 4 else hard.sum()[None]
    if bool((per_item == 0).any()):
        raise ValueError(f"{name} has nothing to edit (all zeros): mark the region to generate with 1")
    return hard


def bbox(mask: Tensor) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) of the nonzero region of a [1,H,W] or [H,W] mask; bottom/right exclusive."""
    m = mask.reshape(mask.shape[-2], mask.shape[-1]) > 0.5
    rows = torch.nonzero(m.any(1)).flatten()
    cols = torch.nonzero(m.any(0)).flatten()
    if rows.numel() == 0:
        raise ValueError("mask is empty: no bounding box")
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1
