"""Judge conversations on the wire: OpenAI chat-completions messages with base64 PNG images.

The API judge renders a `Conversation` to messages; `python -m reward.serve` parses them back. PNG
stores 8 bits per channel, so an image crosses the wire rounded to k/255 (images that are already
on that grid, like anything loaded from a PNG, cross it exactly).
"""
from __future__ import annotations

import base64
import binascii
import io
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from core.io.image_io import to_pil
from reward.vlm.prompts import ChatMessage, Conversation

_ROLES = ("system", "user", "assistant")


def image_data_url(image: Tensor) -> str:
    """[3, H, W] in [0, 1] -> "data:image/png;base64,..." (8 bits per channel)."""
    buf = io.BytesIO()
    to_pil(image).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class ImageTooLarge(ValueError):
    """An image, or a request's images together, decode to more pixels than allowed (HTTP 413)."""


def open_image_data_url(url: str) -> Image.Image:
    """A base64 data URL -> a PIL image whose header is read but whose pixels are not decoded yet.

    The size is known from the header alone, so callers can refuse a decompression bomb (a small
    file declaring a huge canvas) before paying for its pixels. ValueError on anything unreadable;
    ImageTooLarge when PIL itself refuses the size (`Image.MAX_IMAGE_PIXELS`).
    """
    if not isinstance(url, str) or not url.startswith("data:"):
        raise ValueError("image_url must be a base64 data URL (data:image/png;base64,...); this server never "
                         "fetches remote URLs")
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise ValueError("image_url data URL must be base64-encoded (data:image/png;base64,...)")
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as err:
        raise ValueError(f"image_url is not valid base64: {err}") from err
    try:
        return Image.open(io.BytesIO(raw))
    except Image.DecompressionBombError as err:
        raise ImageTooLarge(f"image_url declares too many pixels: {err}") from err
    except Exception as err:  # image plugins raise many types on crafted headers; all mean "unreadable"
        raise ValueError(f"image_url does not hold a readable image: {type(err).__name__}: {err}") from err


def check_image_pixels(img: Image.Image, max_pixels: int | None) -> int:
    """The image's pixel count (from its header); ImageTooLarge above `max_pixels` (None: no cap)."""
    width, height = img.size
    pixels = width * height
    if max_pixels is not None and pixels > max_pixels:
        raise ImageTooLarge(f"an image of {width}x{height} = {pixels} pixels is over the cap of {max_pixels} "
                            "pixels per image (send smaller images, or start the server with a larger "
                            "--max-image-pixels)")
    return pixels


def pil_to_tensor(img: Image.Image) -> Tensor:
    """Decode an opened PIL image -> [3, H, W] float32 in [0, 1]; ValueError if its data is corrupt."""
    try:
        img.load()
        arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    except Image.DecompressionBombError as err:
        raise ImageTooLarge(f"image_url declares too many pixels: {err}") from err
    except Exception as err:  # truncated or corrupt data surfaces only when decoding
        raise ValueError(f"image_url does not hold a readable image: {type(err).__name__}: {err}") from err
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def decode_image_data_url(url: str, *, max_pixels: int | None = None) -> Tensor:
    """A base64 data URL (PNG, JPEG, ...) -> [3, H, W] float32 in [0, 1]. ValueError on anything else;
    ImageTooLarge (a ValueError) when the header declares more than `max_pixels`, before decoding."""
    img = open_image_data_url(url)
    check_image_pixels(img, max_pixels)
    return pil_to_tensor(img)


def to_openai_messages(conversation: Conversation) -> list[dict[str, Any]]:
    """Chat-completions messages: text-only messages as strings, others as text / image_url parts."""
    messages = []
    for msg in conversation:
        if all(isinstance(p, str) for p in msg.parts):
            messages.append({"role": msg.role, "content": "".join(msg.parts)})
            continue
        content = [{"type": "text", "text": p} if isinstance(p, str)
                   else {"type": "image_url", "image_url": {"url": image_data_url(p)}} for p in msg.parts]
        messages.append({"role": msg.role, "content": content})
    return messages


def from_openai_messages(messages: Any, *, max_images: int, max_image_pixels: int | None = None,
                         max_request_pixels: int | None = None) -> Conversation:
    """Parse chat-completions messages back into a `Conversation`; ValueError naming what is wrong.

    Every image's header is read and the pixel caps checked (per image, and all images together)
    before any pixels are decoded, so a request over the caps costs almost nothing to refuse
    (ImageTooLarge, a ValueError).
    """
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list of {role, content} objects")
    pending: list[tuple[str, list[str | Image.Image]]] = []
    n_images = total_pixels = 0
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or msg.get("role") not in _ROLES:
            raise ValueError(f"messages[{i}] must be an object with a role in {list(_ROLES)}")
        content = msg.get("content")
        if isinstance(content, str):
            pending.append((msg["role"], [content]))
            continue
        if not isinstance(content, list):
            raise ValueError(f"messages[{i}].content must be a string or a list of parts")
        parts: list[str | Image.Image] = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            elif kind == "image_url" and isinstance(part.get("image_url"), dict):
                n_images += 1
                if n_images > max_images:
                    raise ValueError(f"at most {max_images} images per request (start the server with a larger "
                                     "--max-images)")
                img = open_image_data_url(part["image_url"].get("url"))
                total_pixels += check_image_pixels(img, max_image_pixels)
                if max_request_pixels is not None and total_pixels > max_request_pixels:
                    raise ImageTooLarge(f"the request's images hold more than {max_request_pixels} pixels together "
                                        "(send smaller images, or start the server with a larger "
                                        "--max-request-pixels)")
                parts.append(img)
            else:
                raise ValueError(f"messages[{i}].content[{j}] must be {{'type': 'text', 'text': ...}} or "
                                 "{'type': 'image_url', 'image_url': {'url': 'data:...'}}")
        pending.append((msg["role"], parts))
    return [ChatMessage(role, [p if isinstance(p, str) else pil_to_tensor(p) for p in parts])
            for role, parts in pending]
