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

from core.masks import validate_mask


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


def _font():
    from PIL import ImageFont

    return ImageFont.load_default()


def _line_height(font) -> int:
    box = font.getbbox("Ahgy|")
    return box[3] - box[1] + 3


def _fit(text: str, font, width: float) -> str:
    """`text` cut (with "...") to at most `width` pixels."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "...") > width:
        text = text[:-1]
    return text + "..."


def wrap_text(text: str, font, width: float, max_lines: int | None = None) -> list[str]:
    """Greedy word wrap of `text` to lines of at most `width` pixels; newlines start new lines, a
    word too long for a line is broken, and past `max_lines` the last kept line ends with "..."."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split():
            candidate = f"{line} {word}" if line else word
            if font.getlength(candidate) <= width:
                line = candidate
                continue
            if line:
                lines.append(line)
            while font.getlength(word) > width and len(word) > 1:
                cut = len(word) - 1
                while cut > 1 and font.getlength(word[:cut]) > width:
                    cut -= 1
                lines.append(word[:cut])
                word = word[cut:]
            line = word
        lines.append(line)
    if max_lines is not None and len(lines) > max_lines:
        lines = lines[:max(max_lines, 1)]
        lines[-1] = _fit(lines[-1] + "...", font, width)
    return lines


def labeled_grid(rows: list[list[Tensor]], *, headers: list[str] | None = None,
                 row_labels: list[str] | None = None, cell_size: int = 128, label_width: int = 180,
                 pad: int = 2) -> Tensor:
    """`image_grid` made readable: cells upscaled (nearest, by a whole factor, never shrunk) to about
    `cell_size` pixels, `headers` above the columns and a wrapped text label left of each row
    (`row_labels`, a "\\n" in a label starts a new line). Returns [3, H, W] in [0, 1]."""
    from PIL import Image, ImageDraw

    if not rows or not rows[0]:
        raise ValueError("labeled_grid needs at least one image")
    if row_labels is not None and len(row_labels) != len(rows):
        raise ValueError(f"{len(row_labels)} row labels for {len(rows)} rows")
    h, w = rows[0][0].shape[-2:]
    # a whole factor keeps every source pixel a crisp square: the images are judged pixel by pixel
    scale = max(1, round(cell_size / max(h, w)))
    if scale > 1:
        rows = [[F.interpolate(img.detach().float().cpu()[None], scale_factor=scale, mode="nearest")[0]
                 for img in row] for row in rows]
    grid = to_pil(image_grid(rows, pad=pad))
    ch, cw = h * scale, w * scale
    font = _font()
    line = _line_height(font)
    top = line + 6 if headers else 0
    left = label_width if row_labels is not None else 0
    canvas = Image.new("RGB", (grid.width + left, grid.height + top), "white")
    canvas.paste(grid, (left, top))
    draw = ImageDraw.Draw(canvas)
    for j, name in enumerate(headers or []):
        text = _fit(name, font, cw)
        x = left + pad + j * (cw + pad) + (cw - font.getlength(text)) / 2
        draw.text((x, 3), text, fill="black", font=font)
    for i, label in enumerate(row_labels or []):
        y = top + pad + i * (ch + pad)
        for k, text in enumerate(wrap_text(label, font, label_width - 8, max_lines=max(1, ch // line))):
            draw.text((4, y + k * line), text, fill="black", font=font)
    return to_tensor(canvas)
