"""Image and mask I/O (PIL, PNG), resizing to a model's multiple, and sample grids.

Images in memory are float tensors [3, H, W] in [0, 1]; masks [1, H, W] with 1 = generate.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from .masks import validate_mask


def _open(path: str | os.PathLike, what: str) -> Image.Image:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} file not found: {p}")
    return Image.open(p)


def to_tensor(img: Image.Image) -> Tensor:
    arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def to_pil(img: Tensor) -> Image.Image:
    """[3,H,W] or [1,H,W] float in [0,1] -> PIL image (RGB or L)."""
    arr = (img.detach().float().clamp(0, 1).cpu() * 255).round().byte()
    if arr.shape[0] == 1:
        return Image.fromarray(arr[0].numpy(), mode="L")
    return Image.fromarray(arr.permute(1, 2, 0).numpy(), mode="RGB")


def load_image(path: str | os.PathLike) -> Tensor:
    return to_tensor(_open(path, "image"))


def load_mask(path: str | os.PathLike, image: Tensor | None = None, threshold: float = 0.5) -> Tensor:
    """Load a mask (white = generate). RGB/RGBA masks are reduced to luminance; then validated."""
    img = _open(path, "mask")
    if img.mode in ("RGBA", "LA"):  # alpha-only masks: use the alpha channel
        img = img.getchannel("A")
    arr = np.asarray(img.convert("L"), dtype=np.float32) / 255.0
    mask = torch.from_numpy(arr)[None]
    return validate_mask(mask, image, threshold=threshold, name=f"mask {Path(path).name}")


def save_image(img: Tensor, path: str | os.PathLike) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    to_pil(img).save(path)


def resize_to_multiple(img: Tensor, multiple: int, *, max_side: int | None = None,
                       mode: str = "bilinear") -> Tensor:
    """Resize [C,H,W] so both sides are multiples of `multiple` (rounded to nearest), optionally
    scaling down first so the longer side is at most `max_side`."""
    _, h, w = img.shape
    scale = 1.0 if max_side is None else min(1.0, max_side / max(h, w))
    nh = max(multiple, round(h * scale / multiple) * multiple)
    nw = max(multiple, round(w * scale / multiple) * multiple)
    if (nh, nw) == (h, w):
        return img
    kw = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    return F.interpolate(img[None].float(), size=(nh, nw), mode=mode, **kw)[0].clamp(0, 1)


def resize_image(img: Tensor, size: tuple[int, int]) -> Tensor:
    """Resize [3,H,W] to `size` (bilinear, antialiased when shrinking)."""
    if tuple(img.shape[-2:]) == tuple(size):
        return img
    return F.interpolate(img[None].float(), size=size, mode="bilinear", align_corners=False,
                         antialias=True)[0].clamp(0, 1)


def resize_mask(mask: Tensor, size: tuple[int, int]) -> Tensor:
    """Resize a [1,H,W] mask with nearest neighbour so it stays binary."""
    return F.interpolate(mask[None].float(), size=size, mode="nearest")[0]


def image_grid(rows: list[list[Tensor]], pad: int = 2, pad_value: float = 1.0) -> Tensor:
    """A grid [3, H, W] from rows of images ([3,h,w] or [1,h,w], all the same size)."""
    if not rows or not rows[0]:
        raise ValueError("image_grid needs at least one image")
    h, w = rows[0][0].shape[-2:]
    n_cols = max(len(r) for r in rows)
    grid = torch.full((3, len(rows) * (h + pad) + pad, n_cols * (w + pad) + pad), pad_value)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            img = img.detach().float().cpu().clamp(0, 1)
            if img.shape[0] == 1:
                img = img.expand(3, -1, -1)
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            grid[:, y:y + h, x:x + w] = img
    return grid
