"""Images on the wire: the pixel caps are checked from the header, before any pixel is decoded."""
import base64
import io

import pytest
import torch
from PIL import Image, ImageFile

from reward.vlm.chat_wire import (
    ImageTooLarge,
    decode_image_data_url,
    from_openai_messages,
    image_data_url,
)


def _url(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _message(*urls):
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": u}} for u in urls]}]


def test_pixel_caps_refuse_before_decoding(monkeypatch):
    x = (torch.rand(3, 10, 12) * 255).round() / 255
    assert torch.equal(decode_image_data_url(image_data_url(x), max_pixels=120), x)
    decoded = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: (decoded.append(self.size), real_load(self))[1])
    with pytest.raises(ImageTooLarge, match="10x20 = 200 pixels.*cap of 199"):
        decode_image_data_url(_url(Image.new("RGB", (10, 20))), max_pixels=199)
    small = _url(Image.new("RGB", (10, 10)))
    with pytest.raises(ImageTooLarge, match="more than 250 pixels together"):
        from_openai_messages(_message(small, small, small), max_images=6, max_image_pixels=100,
                             max_request_pixels=250)
    assert decoded == []   # neither the big image nor any image of the big request was decoded
    conv = from_openai_messages(_message(small, small), max_images=6, max_image_pixels=100, max_request_pixels=250)
    assert [p.shape for p in conv[0].parts] == [(3, 10, 10)] * 2


def test_pil_decompression_bomb_is_image_too_large(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)
    with pytest.raises(ImageTooLarge, match="too many pixels"):
        decode_image_data_url(_url(Image.new("RGB", (10, 10))))
