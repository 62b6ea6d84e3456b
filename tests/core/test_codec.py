import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from core import packing
from core.codec import PixelCodec


def _images(seed: int, b: int, h: int, w: int) -> torch.Tensor:
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


@given(seed=st.integers(0, 2**16), factor=st.sampled_from([1, 2, 4]), hb=st.integers(1, 4), wb=st.integers(1, 4))
def test_decode_inverts_encode(seed, factor, hb, wb):
    codec = PixelCodec(factor)
    img = _images(seed, 2, 4 * hb, 4 * wb)
    z = codec.encode(img)
    assert z.shape == (2, 3 * factor**2, 4 * hb // factor, 4 * wb // factor)
    assert float(z.min()) >= -1 and float(z.max()) <= 1
    torch.testing.assert_close(codec.decode(z), img, atol=1e-6, rtol=0)


def test_latent_layout_is_channel_major_blocks():
    """Latent channel c * f^2 + dy * f + dx at (i, j) is pixel (f i + dy, f j + dx) of colour c."""
    codec = PixelCodec(2)
    img = _images(0, 1, 8, 6)
    z = codec.encode(img)
    for c in range(3):
        for dy in range(2):
            for dx in range(2):
                expected = 2 * img[0, c, dy::2, dx::2] - 1
                torch.testing.assert_close(z[0, c * 4 + dy * 2 + dx], expected)
    assert codec.vae_scale_factor == 2 and codec.latent_channels == 12


def test_element_mask_covers_exactly_the_masked_pixels():
    codec = PixelCodec(2)
    mask = (torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(1)) > 0.5).float()
    em = codec.element_mask(mask)
    # back in pixel space, the per-element mask is the pixel mask on every colour channel
    torch.testing.assert_close(torch.nn.functional.pixel_shuffle(em, 2), mask.expand(-1, 3, -1, -1))
    # and FLUX Fill's folded mask describes the same pixels (same block order) on each colour
    folded = packing.fold_mask(mask, 2)
    for c in range(3):
        torch.testing.assert_close(em[:, 4 * c:4 * c + 4], folded)


def test_masked_image_is_mid_grey_inside_the_mask():
    codec = PixelCodec(2)
    img = _images(2, 1, 8, 8)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:6, 1:4] = 1
    shown = codec.decode(codec.masked_image(img, mask))
    torch.testing.assert_close(shown * (1 - mask), img * (1 - mask), atol=1e-6, rtol=0)
    torch.testing.assert_close(shown * mask, 0.5 * mask.expand_as(shown))


def test_decode_clamps_and_passes_gradients():
    codec = PixelCodec(2)
    z = torch.linspace(-1.5, 1.5, 12 * 4).reshape(1, 12, 2, 2).requires_grad_(True)
    img = codec.decode(z)
    assert float(img.detach().min()) == 0 and float(img.detach().max()) == 1
    img.sum().backward()
    inside = z.detach().abs() < 1
    assert torch.all(z.grad[inside] == 0.5) and torch.all(z.grad[~inside] == 0)


def test_bad_inputs_are_named():
    codec = PixelCodec(2)
    with pytest.raises(ValueError, match="resize_to_multiple"):
        codec.encode(torch.rand(1, 3, 7, 8))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        codec.encode(torch.rand(1, 4, 8, 8))
    with pytest.raises(ValueError, match=r"\[B, 1, H, W\]"):
        codec.element_mask(torch.ones(1, 3, 8, 8))
    with pytest.raises(ValueError, match="latents must be"):
        codec.decode(torch.rand(1, 3, 4, 4))
    with pytest.raises(ValueError, match="factor"):
        PixelCodec(0)
