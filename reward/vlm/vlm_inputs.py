"""Conversations -> model inputs for Qwen2-VL-family judges, in torch, so scores are differentiable.

The image path reproduces the Qwen2-VL image processor (`Qwen2VLImageProcessorPil`) on tensors:
`smart_resize` to multiples of patch * merge inside [min_pixels, max_pixels], PIL's bicubic
resampling (without its 8-bit rounding, so within one grey level of it), normalisation, then the
patch layout the vision tower expects: the grid walked in merge x merge blocks, each patch
flattened as (channel, temporal, row, column) with the single frame repeated
`temporal_patch_size` times. Text goes through the tokenizer's chat template; each image
placeholder is expanded to grid_h * grid_w / merge^2 tokens, as the processor does. Batches are
padded on the left so the last position is every row's answer slot.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from reward.vlm.prompts import Conversation, conversation_images


@dataclasses.dataclass(frozen=True)
class VisionSpec:
    """What the tensor preprocessing needs from an image processor."""

    patch_size: int
    merge_size: int
    temporal_patch_size: int
    min_pixels: int
    max_pixels: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @classmethod
    def from_image_processor(cls, processor: Any, *, max_pixels: int | None = None,
                             min_pixels: int | None = None) -> VisionSpec:
        """Read a Qwen2-VL-family image processor; `max_pixels`/`min_pixels` override its bounds."""
        missing = [a for a in ("patch_size", "merge_size", "temporal_patch_size", "image_mean", "image_std")
                   if getattr(processor, a, None) is None]
        if missing:
            raise ValueError(
                f"{type(processor).__name__} lacks {missing}: the tensor preprocessing supports "
                "Qwen2-VL-family image processors (Qwen2-VL, Qwen2.5-VL, Qwen3-VL)")
        size = dict(getattr(processor, "size", None) or {})
        lo = min_pixels or size.get("shortest_edge") or getattr(processor, "min_pixels", None)
        hi = max_pixels or size.get("longest_edge") or getattr(processor, "max_pixels", None)
        if lo is None or hi is None:
            raise ValueError(f"{type(processor).__name__} has no pixel bounds (size shortest_edge/longest_edge)")
        spec = cls(int(processor.patch_size), int(processor.merge_size), int(processor.temporal_patch_size),
                   int(lo), int(hi), tuple(map(float, processor.image_mean)), tuple(map(float, processor.image_std)))
        if spec.min_pixels > spec.max_pixels:
            raise ValueError(f"min_pixels {spec.min_pixels} exceeds max_pixels {spec.max_pixels}")
        return spec


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The Qwen2-VL target size: multiples of `factor`, area within bounds, aspect ratio kept."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"image aspect ratio {max(height, width) / min(height, width):.0f} exceeds 200")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def _resample(x: Tensor, h: int, w: int) -> Tensor:
    # an 8-bit image saturates after every pass: clamp like PIL does
    return F.interpolate(x[None], size=(h, w), mode="bicubic", align_corners=False, antialias=True)[0].clamp(0, 1)


def resize_like_pil(image: Tensor, height: int, width: int) -> Tensor:
    """PIL's bicubic resize of [C, H, W] in [0, 1], differentiably: two separable antialiased passes,
    clamped after each; Pillow (13, checked) runs the vertical pass first when the height shrinks by more
    than twice as many pixels as the width does, else the horizontal pass first."""
    h0, w0 = image.shape[-2:]
    if (h0, w0) == (height, width):
        return image
    if h0 - height > 0 and h0 - height > 2 * (w0 - width):
        x = image if h0 == height else _resample(image, height, w0)
        return x if w0 == width else _resample(x, height, width)
    x = image if w0 == width else _resample(image, h0, width)
    return x if h0 == height else _resample(x, height, width)


def image_patches(image: Tensor, spec: VisionSpec) -> tuple[Tensor, tuple[int, int, int]]:
    """[3, H, W] in [0, 1] -> (patches [grid_h * grid_w, 3 * T * p * p], grid (1, grid_h, grid_w))."""
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"judge images must be [3, H, W] in [0, 1], got {tuple(image.shape)}")
    x = image if image.is_floating_point() else image.float()
    h, w = smart_resize(x.shape[1], x.shape[2], spec.factor, spec.min_pixels, spec.max_pixels)
    x = resize_like_pil(x, h, w)
    mean = torch.tensor(spec.mean, dtype=x.dtype, device=x.device)[:, None, None]
    std = torch.tensor(spec.std, dtype=x.dtype, device=x.device)[:, None, None]
    x = (x - mean) / std
    p, m, t = spec.patch_size, spec.merge_size, spec.temporal_patch_size
    gh, gw = h // p, w // p
    x = x.reshape(3, gh // m, m, p, gw // m, m, p).permute(1, 4, 2, 5, 0, 3, 6)  # (bh, bw, mh, mw, C, p, p)
    x = x[:, :, :, :, :, None].expand(*x.shape[:5], t, p, p)
    return x.reshape(gh * gw, 3 * t * p * p), (1, gh, gw)


def _render(conversation: Conversation) -> list[dict[str, Any]]:
    messages = []
    for msg in conversation:
        if all(isinstance(p, str) for p in msg.parts):
            messages.append({"role": msg.role, "content": "".join(msg.parts)})  # text-only templates too
        else:
            messages.append({"role": msg.role, "content": [
                {"type": "text", "text": p} if isinstance(p, str) else {"type": "image"} for p in msg.parts]})
    return messages


def encode_conversations(conversations: list[Conversation], tokenizer: Any, spec: VisionSpec,
                         image_token_id: int, *, device: torch.device | str | None = None,
                         dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """Left-padded model inputs whose last position is where the answer token is generated."""
    image_token = tokenizer.convert_ids_to_tokens(image_token_id)
    texts, pixel_rows, grids = [], [], []
    for conv in conversations:
        text = tokenizer.apply_chat_template(_render(conv), tokenize=False, add_generation_prompt=True)
        images = conversation_images(conv)
        pieces = text.split(image_token)
        if len(pieces) - 1 != len(images):
            raise ValueError(f"the chat template wrote {len(pieces) - 1} image placeholder(s) {image_token!r} "
                             f"for {len(images)} image(s): the tokenizer's chat template does not render "
                             "{'type': 'image'} parts as this model expects")
        out = [pieces[0]]
        for img, rest in zip(images, pieces[1:], strict=True):
            patches, grid = image_patches(img, spec)
            pixel_rows.append(patches)
            grids.append(grid)
            out += [image_token * (grid[1] * grid[2] // spec.merge_size**2), rest]
        texts.append("".join(out))
    enc = tokenizer(texts, padding=True, padding_side="left", return_tensors="pt", add_special_tokens=False)
    inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    inputs["mm_token_type_ids"] = (inputs["input_ids"] == image_token_id).int()
    n_tokens = int(inputs["mm_token_type_ids"].sum())
    expected = sum(g[1] * g[2] for g in grids) // spec.merge_size**2
    if n_tokens != expected:
        raise ValueError(f"tokenized text has {n_tokens} image tokens, expected {expected}: the image "
                         f"token {image_token!r} must be a single special token of the tokenizer")
    if pixel_rows:
        pixels = torch.cat(pixel_rows)
        inputs["pixel_values"] = pixels if dtype is None else pixels.to(dtype)
        inputs["image_grid_thw"] = torch.tensor(grids, dtype=torch.long)
    if device is not None:
        inputs = {k: v.to(device) for k, v in inputs.items()}
    return inputs
