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

from core.image_io import to_pil

from .prompts import ChatMessage, Conversation

_ROLES = ("system", "user", "assistant")


def image_data_url(image: Tensor) -> str:
    """[3, H, W] in [0, 1] -> "data:image/png;base64,..." (8 bits per channel)."""
    buf = io.BytesIO()
    to_pil(image).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def decode_image_data_url(url: str) -> Tensor:
    """A base64 data URL (PNG, JPEG, ...) -> [3, H, W] float32 in [0, 1]. ValueError on anything else."""
    if not isinstance(url, str) or not url.startswith("data:"):
        raise ValueError("image_url must be a base64 data URL (data:image/png;base64,...); this server never "
                         "fetches remote URLs")
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise ValueError("image_url data URL must be base64-encoded (data:image/png;base64,...)")
    try:
        raw = base64.b64decode(payload, validate=True)
        img = Image.open(io.BytesIO(raw))
        img.load()
    except (binascii.Error, OSError, Image.DecompressionBombError) as err:
        raise ValueError(f"image_url does not hold a readable image: {err}") from err
    arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


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


def from_openai_messages(messages: Any, *, max_images: int) -> Conversation:
    """Parse chat-completions messages back into a `Conversation`; ValueError naming what is wrong."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list of {role, content} objects")
    conversation: Conversation = []
    n_images = 0
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or msg.get("role") not in _ROLES:
            raise ValueError(f"messages[{i}] must be an object with a role in {list(_ROLES)}")
        content = msg.get("content")
        if isinstance(content, str):
            conversation.append(ChatMessage(msg["role"], [content]))
            continue
        if not isinstance(content, list):
            raise ValueError(f"messages[{i}].content must be a string or a list of parts")
        parts: list[str | Tensor] = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            elif kind == "image_url" and isinstance(part.get("image_url"), dict):
                n_images += 1
                if n_images > max_images:
                    raise ValueError(f"at most {max_images} images per request (start the server with a larger "
                                     "--max-images)")
                parts.append(decode_image_data_url(part["image_url"].get("url")))
            else:
                raise ValueError(f"messages[{i}].content[{j}] must be {{'type': 'text', 'text': ...}} or "
                                 "{'type': 'image_url', 'image_url': {'url': 'data:...'}}")
        conversation.append(ChatMessage(msg["role"], parts))
    return conversation
