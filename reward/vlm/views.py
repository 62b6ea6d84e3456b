"""Which images the judge sees: the full images and, optionally, a close-up around the mask.

A judge looking at the whole image is easily dominated by the unchanged background (OneReward
section 4.3), so a view can add a square crop around the mask's bounding box (with a margin),
resized to a fixed side. The crop is slicing plus interpolation, so it stays differentiable.
"""
from __future__ import annotations

import dataclasses

import torch.nn.functional as F
from torch import Tensor


@dataclasses.dataclass(frozen=True)
class JudgeView:
    """show_source: pairwise queries also show the input image (score/yes-no always do).
    crop: add a close-up of the edited region of every judged image; crop_margin is the margin
    around the mask's bounding box as a fraction of its longer side; crop_size the crop's side."""

    show_source: bool = True
    crop: bool = False
    crop_margin: float = 0.25
    crop_size: int = 224

    def __post_init__(self) -> None:
        if not self.crop_margin >= 0:
            raise ValueError(f"JudgeView.crop_margin must be >= 0, got {self.crop_margin}")
        if self.crop_size < 1:
            raise ValueError(f"JudgeView.crop_size must be a positive number of pixels, got {self.crop_size}")


def crop_box(mask: Tensor, margin: float) -> tuple[int, int, int]:
    """(top, left, side) of a square around the mask's bounding box, grown by `margin`, inside the image."""
    m = mask.reshape(mask.shape[-2], mask.shape[-1]) > 0.5
    rows, cols = m.any(1).nonzero().flatten(), m.any(0).nonzero().flatten()
    if rows.numel() == 0:
        raise ValueError("cannot crop around an empty mask: the mask has no pixel set to 1")
    h, w = m.shape
    top, bottom, left, right = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    side = round(max(bottom - top, right - left) * (1 + 2 * margin))
    side = max(1, min(side, h, w))
    cy, cx = (top + bottom) / 2, (left + right) / 2
    y0 = min(max(0, round(cy - side / 2)), h - side)
    x0 = min(max(0, round(cx - side / 2)), w - side)
    return y0, x0, side


def mask_crop(image: Tensor, mask: Tensor, *, margin: float = 0.25, size: int = 224) -> Tensor:
    """The square close-up of `image` [3, H, W] around `mask` [1, H, W], resized to size x size."""
    y0, x0, side = crop_box(mask, margin)
    patch = image[:, y0:y0 + side, x0:x0 + side]
    if side == size:
        return patch
    return F.interpolate(patch[None], size=(size, size), mode="bilinear", align_corners=False,
                         antialias=side > size)[0]
