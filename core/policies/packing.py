"""FLUX's packed token layout, the Fill mask folding, and position ids.

Layout facts (diffusers' FluxFillPipeline; our functions reproduce them and are tested against it):
- pack:   latents [B, C, h, w] -> [B, (h/2)(w/2), 4C]; a token holds a 2x2 patch, channel-major
          (token channel index = c * 4 + dy * 2 + dx).
- fold:   a pixel mask [B, 1, H, W] with H = f h (f = the codec's scale factor) becomes
          [B, f*f, h, w], each f x f pixel block spread over f*f channels, then packed -> 4 f^2.
- ids:    image token (i, j) of the packed grid has position id (0, i, j); text tokens all zeros.
"""
from __future__ import annotations

import torch
from torch import Tensor


def pack(latents: Tensor) -> Tensor:
    """[B, C, h, w] -> [B, (h/2)(w/2), 4C]; h and w must be even."""
    B, C, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"latent height and width must be even to pack 2x2 patches, got {h}x{w}")
    x = latents.view(B, C, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(B, (h // 2) * (w // 2), C * 4)


def unpack(tokens: Tensor, h: int, w: int) -> Tensor:
    """[B, (h/2)(w/2), 4C] -> [B, C, h, w]; the inverse of `pack`."""
    B, L, C4 = tokens.shape
    if L != (h // 2) * (w // 2) or C4 % 4:
        raise ValueError(f"cannot unpack {tuple(tokens.shape)} into a {h}x{w} latent grid")
    x = tokens.view(B, h // 2, w // 2, C4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(B, C4 // 4, h, w)


def fold_mask(mask: Tensor, factor: int) -> Tensor:
    """Pixel mask [B, 1, H, W] -> [B, factor^2, H/factor, W/factor] (FLUX Fill's 8x8 folding)."""
    B, one, H, W = mask.shape
    if one != 1 or H % factor or W % factor:
        raise ValueError(f"mask {tuple(mask.shape)} must be [B, 1, H, W] with H, W divisible by {factor}")
    h, w = H // factor, W // factor
    m = mask[:, 0].reshape(B, h, factor, w, factor).permute(0, 2, 4, 1, 3)
    return m.reshape(B, factor * factor, h, w)


def latent_mask(mask: Tensor, factor: int) -> Tensor:
    """Pixel mask -> one value per latent pixel [B, 1, h, w]: 1 where any pixel of the block is
    edited, so the blend never pins a latent whose receptive block touches the edit region."""
    return torch.nn.functional.max_pool2d(mask, factor) if factor > 1 else mask


def image_ids(h: int, w: int, device=None, dtype=torch.float32) -> Tensor:
    """Position ids [(h/2)(w/2), 3] for the packed grid of an h x w latent."""
    ids = torch.zeros(h // 2, w // 2, 3, device=device, dtype=dtype)
    ids[..., 1] += torch.arange(h // 2, device=device, dtype=dtype)[:, None]
    ids[..., 2] += torch.arange(w // 2, device=device, dtype=dtype)[None, :]
    return ids.reshape(-1, 3)


def text_ids(length: int, device=None, dtype=torch.float32) -> Tensor:
    return torch.zeros(length, 3, device=device, dtype=dtype)
