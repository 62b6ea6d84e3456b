"""The built-in tiny model's codec: pixel space, no VAE.

encode: [0, 1] -> [-1, 1], then space-to-depth by `factor` (each f x f pixel block of each colour
channel becomes f^2 channels), so a [B, 3, H, W] image becomes latents [B, 3 f^2, H/f, W/f]; the
codec's "VAE scale factor" is f. decode is the exact inverse followed by a clamp to [0, 1].

Because every latent element is exactly one pixel of one colour channel, a pixel mask maps to the
latent grid element by element (`element_mask`): the mask-aware blend can keep the known region
pixel-exactly, which a VAE codec cannot.

Channel order is torch's pixel_unshuffle order (c * f^2 + dy * f + dx), the same order in which
`core.packing.fold_mask` spreads a mask block over channels.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


class PixelCodec:
    """Space-to-depth pixel codec with scale factor `factor` (2 for the tiny model)."""

    def __init__(self, factor: int = 2, image_channels: int = 3):
        if factor < 1:
            raise ValueError(f"codec factor must be >= 1, got {factor}")
        self.factor = factor
        self.image_channels = image_channels

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent pixel along each side (diffusers' name for it)."""
        return self.factor

    @property
    def latent_channels(self) -> int:
        """Channels of the unpacked latents: image channels x factor^2."""
        return self.image_channels * self.factor**2

    def _check(self, x: Tensor, channels: int, what: str) -> None:
        if x.dim() != 4 or x.shape[1] != channels:
            raise ValueError(f"{what} must be [B, {channels}, H, W], got {tuple(x.shape)}")
        if x.shape[2] % self.factor or x.shape[3] % self.factor:
            raise ValueError(
                f"{what} size {tuple(x.shape[2:])} is not divisible by the codec factor {self.factor}: "
                "resize it with core.image_io.resize_to_multiple"
            )

    def encode(self, images: Tensor) -> Tensor:
        """Images [B, C, H, W] in [0, 1] -> latents [B, C f^2, H/f, W/f] in [-1, 1]."""
        self._check(images, self.image_channels, "images")
        return F.pixel_unshuffle(images * 2 - 1, self.factor)

    def decode(self, latents: Tensor) -> Tensor:
        """Latents [B, C f^2, h, w] -> images [B, C, f h, f w] in [0, 1] (clamped; differentiable)."""
        if latents.dim() != 4 or latents.shape[1] != self.latent_channels:
            raise ValueError(f"latents must be [B, {self.latent_channels}, h, w], got {tuple(latents.shape)}")
        return ((F.pixel_shuffle(latents, self.factor) + 1) / 2).clamp(0, 1)

    def element_mask(self, masks: Tensor) -> Tensor:
        """Pixel masks [B, 1, H, W] -> the same mask per latent element [B, C f^2, H/f, W/f]."""
        self._check(masks, 1, "masks")
        return F.pixel_unshuffle(masks.expand(-1, self.image_channels, -1, -1), self.factor)

    def masked_image(self, images: Tensor, masks: Tensor) -> Tensor:
        """FLUX Fill's conditioning image in latent space: the source with the edit region zeroed
        in [-1, 1] space (mid-grey), i.e. encode(images) * (1 - mask) element by element."""
        return self.encode(images) * (1 - self.element_mask(masks))
