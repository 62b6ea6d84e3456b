"""A tiny 3x5 bitmap font for the digits, used by the synthetic world's text-rendering task."""
from __future__ import annotations

import torch
from torch import Tensor

# Rows top to bottom, '#' = ink. Our own drawing of seven-segment-like digits.
_FONT: dict[str, tuple[str, ...]] = {
    "0": ("###", "#.#", "#.#", "#.#", "###"),
    "1": (".#.", "##.", ".#.", ".#.", "###"),
    "2": ("###", "..#", "###", "#..", "###"),
    "3": ("###", "..#", ".##", "..#", "###"),
    "4": ("#.#", "#.#", "###", "..#", "..#"),
    "5": ("###", "#..", "###", "..#", "###"),
    "6": ("###", "#..", "###", "#.#", "###"),
    "7": ("###", "..#", "..#", ".#.", ".#."),
    "8": ("###", "#.#", "###", "#.#", "###"),
    "9": ("###", "#.#", "###", "..#", "###"),
}
GLYPHS: tuple[str, ...] = tuple(_FONT)
GLYPH_H, GLYPH_W = 5, 3


def glyph(ch: str, scale: int = 2) -> Tensor:
    """Binary ink map [5*scale, 3*scale] of one character."""
    if ch not in _FONT:
        raise ValueError(f"no glyph for {ch!r}; the font has {''.join(GLYPHS)}")
    rows = torch.tensor([[c == "#" for c in row] for row in _FONT[ch]], dtype=torch.float32)
    return rows.repeat_interleave(scale, 0).repeat_interleave(scale, 1)


def text_size(text: str, scale: int = 2, spacing: int = 2) -> tuple[int, int]:
    """(height, width) in pixels of `text` set in the font."""
    n = len(text)
    return GLYPH_H * scale, n * GLYPH_W * scale + max(n - 1, 0) * spacing


def render_text(text: str, h: int, w: int, top: int, left: int, scale: int = 2,
                spacing: int = 2) -> tuple[Tensor, list[tuple[int, int]]]:
    """Ink map [1, h, w] of `text` with its top-left corner at (top, left), and each glyph's cell corner."""
    ink = torch.zeros(1, h, w)
    cells = []
    x = left
    for ch in text:
        g = glyph(ch, scale)
        ink[0, top:top + g.shape[0], x:x + g.shape[1]] = g
        cells.append((top, x))
        x += g.shape[1] + spacing
    return ink, cells
