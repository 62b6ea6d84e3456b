"""The built-in tiny Fill model: FLUX.1 Fill's architecture at toy size, the default policy.

A diffusers `FluxTransformer2DModel` with Fill's channel-concatenation conditioning (per token:
noisy latents | masked-image latents | folded mask), a pixel-space codec (`core.codec`, factor 2)
instead of a VAE, and a tiny CLIP text encoder over the synthetic world's vocabulary
(`core.tiny_text`). For 64x64 RGB images: latents [B, 12, 32, 32] packed 2x2 -> 256 tokens of 48
channels; the mask folded by 2 and packed -> 16 channels; in_channels = 48 + 48 + 16 = 112.

A saved model is a directory that each library loads with its own `from_pretrained`:
transformer/ (diffusers), text_encoder/ (transformers CLIPTextModel), tokenizer/ (transformers),
and tiny_fill.json (codec factor, image size, default sampler steps and shift).
RL fine-tunes the transformer only; the text encoder is frozen and its encodings cached.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
from pathlib import Path

import torch
from diffusers import FluxTransformer2DModel
from torch import Tensor
from transformers import AutoTokenizer, CLIPTextModel

from . import packing
from .codec import PixelCodec
from .masks import validate_mask
from .policy import Condition, Policy, check_edit_batch
from .tiny_text import PromptEncoder, build_tokenizer, text_encoder_config

#: where the shipped weights live (installed with the package: package-data core/assets/**)
SHIPPED_DIR = Path(__file__).resolve().parent / "assets" / "tiny_fill"
SETTINGS_FILE = "tiny_fill.json"
FORMAT_VERSION = 1

# Sized by measurement on a 2-core CPU (uncontended): ~0.12 s per no-grad forward of 48 images,
# ~0.23 s per AdamW step on 32. At equal cost, width beat depth: 1 double + 1 single block of
# 3 heads x 32 (inner 96) reached a lower pretraining loss than 1 + 2 blocks of 4 x 16 (inner 64),
# whose 64-wide residual stream must carry the 48 noisy channels of each token through.
DEFAULT_TRANSFORMER = dict(num_layers=1, num_single_layers=1, num_attention_heads=3, attention_head_dim=32,
                           axes_dims_rope=(4, 14, 14))
DEFAULT_TEXT = dict(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128)


@contextlib.contextmanager
def _no_weight_progress_bars():
    """Without transformers' "Loading weights" progress bar, which a model of a few dozen tensors
    prints on every load (and a bar on every save); its previous setting is restored afterwards."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def rope_axes(head_dim: int) -> tuple[int, int, int]:
    """Rope dimensions per position axis, summing to `head_dim`: FLUX's first axis is always 0 for
    images and text alike, so it gets the fewest (4, or more to make the rest even); rows and
    columns share the remainder equally."""
    if head_dim < 8 or head_dim % 2:
        raise ValueError(f"attention head dim must be even and >= 8 for rope over three axes, got {head_dim}")
    side = (head_dim - 4) // 2 // 2 * 2
    return head_dim - 2 * side, side, side


class TinyFillPolicy(Policy):
    """Mask-guided flow-matching editor of `image_size` x `image_size` RGB images (see module doc)."""

    def __init__(self, transformer: FluxTransformer2DModel, prompt_encoder: PromptEncoder, *,
                 image_size: int = 64, codec_factor: int = 2, default_steps: int = 8,
                 default_shift: float = 1.0):
        self.codec = PixelCodec(codec_factor)
        if image_size % (2 * codec_factor):
            raise ValueError(f"image_size {image_size} must be a multiple of {2 * codec_factor} "
                             f"(codec factor {codec_factor} times the 2x2 packing)")
        c = self.codec.latent_channels * 4
        expected_in = 2 * c + 4 * codec_factor**2
        cfg = transformer.config
        if cfg.in_channels != expected_in or cfg.out_channels != c:
            raise ValueError(f"transformer has in/out channels {cfg.in_channels}/{cfg.out_channels}; a codec "
                             f"factor of {codec_factor} needs {expected_in}/{c}")
        if cfg.joint_attention_dim != prompt_encoder.text_model.config.hidden_size:
            raise ValueError(f"transformer joint_attention_dim {cfg.joint_attention_dim} != text hidden size "
                             f"{prompt_encoder.text_model.config.hidden_size}")
        self.model = transformer
        self.prompt_encoder = prompt_encoder
        self.image_size = image_size
        self.default_steps = default_steps
        self.default_shift = default_shift
        prompt_encoder.text_model.requires_grad_(False).eval()
        transformer.eval()
        self._ids_cache: dict[tuple, tuple[Tensor, Tensor]] = {}

    # -- construction and persistence -----------------------------------------------------------
    @classmethod
    def create(cls, *, seed: int = 0, image_size: int = 64, codec_factor: int = 2, default_steps: int = 8,
               default_shift: float = 1.0, transformer: dict | None = None, text: dict | None = None
               ) -> "TinyFillPolicy":
        """A freshly initialised model (deterministic from `seed`); sizes default to the shipped ones."""
        tokenizer = build_tokenizer()
        tsize = {**DEFAULT_TEXT, **(text or {})}
        fsize = {**DEFAULT_TRANSFORMER, **(transformer or {})}
        codec = PixelCodec(codec_factor)
        c = codec.latent_channels * 4
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            text_model = CLIPTextModel(text_encoder_config(tokenizer, **tsize))
            flux = FluxTransformer2DModel(
                patch_size=1, in_channels=2 * c + 4 * codec_factor**2, out_channels=c,
                joint_attention_dim=tsize["hidden_size"], pooled_projection_dim=tsize["hidden_size"],
                guidance_embeds=False, **{**fsize, "axes_dims_rope": tuple(fsize["axes_dims_rope"])})
        return cls(flux, PromptEncoder(tokenizer, text_model), image_size=image_size,
                   codec_factor=codec_factor, default_steps=default_steps, default_shift=default_shift)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike | None = None, *, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None) -> "TinyFillPolicy":
        """Load a saved model; `path=None` loads the shipped weights (core/assets/tiny_fill)."""
        root = SHIPPED_DIR if path is None else Path(path)
        settings_file = root / SETTINGS_FILE
        if not settings_file.is_file():
            hint = ("the package was installed without its assets: reinstall it, or run "
                    "`python -m rl.pretrain` to rebuild them") if path is None else \
                "give a directory written by TinyFillPolicy.save_pretrained or `python -m rl.pretrain --out`"
            raise FileNotFoundError(f"no tiny Fill model at {root} (missing {SETTINGS_FILE}): {hint}")
        settings = json.loads(settings_file.read_text())
        if settings.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{settings_file} has format_version {settings.get('format_version')}; "
                             f"this library reads version {FORMAT_VERSION}")
        # loaded in `dtype` rather than cast afterwards, which diffusers answers with a warning
        transformer = FluxTransformer2DModel.from_pretrained(root / "transformer", torch_dtype=dtype)
        with _no_weight_progress_bars():
            text_model = CLIPTextModel.from_pretrained(root / "text_encoder", dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
        policy = cls(transformer, PromptEncoder(tokenizer, text_model), image_size=settings["image_size"],
                     codec_factor=settings["codec_factor"], default_steps=settings["default_steps"],
                     default_shift=settings["default_shift"])
        return policy.to(device, dtype)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write transformer/, text_encoder/, tokenizer/ and tiny_fill.json into `directory`.

        With a LoRA adapter, the saved transformer has the adapter merged into its weights (the
        policy itself keeps the adapter), so the directory is a plain model again.
        """
        root = Path(directory)
        root.mkdir(parents=True, exist_ok=True)
        if self.has_lora:
            merged = copy.deepcopy(self.model)
            merged.fuse_lora()
            merged.unload_lora()
            merged.save_pretrained(root / "transformer")
        else:
            self.model.save_pretrained(root / "transformer")
        with _no_weight_progress_bars():  # and its "Writing model shards" bar, for a single shard
            self.prompt_encoder.text_model.save_pretrained(root / "text_encoder")
        self.prompt_encoder.tokenizer.save_pretrained(root / "tokenizer")
        settings = {"format_version": FORMAT_VERSION, "image_size": self.image_size,
                    "codec_factor": self.codec.factor, "default_steps": self.default_steps,
                    "default_shift": self.default_shift}
        (root / SETTINGS_FILE).write_text(json.dumps(settings, indent=2) + "\n")

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "TinyFillPolicy":
        """Move (and optionally cast) both networks; returns self."""
        if device is None and dtype is None:
            return self
        if getattr(self.model, "_keep_in_fp32_modules", None):
            self.model.to(device=device, dtype=dtype)
        else:
            # diffusers' to() warns that modules "should be kept in float32" even when the list of
            # them is empty, as it is for FLUX: nothing is lost by casting with torch's own to()
            torch.nn.Module.to(self.model, device=device, dtype=dtype)
        self.prompt_encoder.to(device=device, dtype=dtype)
        if self.has_lora:
            self._lora_to_float32()
        self._ids_cache.clear()
        return self

    def schedule(self, steps: int | None = None) -> Tensor:
        """The sampler's step times (steps + 1 values from 1 to 0) with this model's default shift."""
        from .schedules import flux_sigmas

        return flux_sigmas(self.default_steps if steps is None else steps, shift=self.default_shift)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # -- the Policy interface -------------------------------------------------------------------
    @property
    def latent_channels(self) -> int:
        return self.codec.latent_channels * 4

    @property
    def vae_scale_factor(self) -> int:
        return self.codec.factor

    @property
    def latent_hw(self) -> tuple[int, int]:
        side = self.image_size // self.codec.factor
        return side, side

    def encode_prompts(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """Prompts -> (sequence embeddings [B, L, D], pooled [B, D]); cached while the encoder is frozen."""
        return self.prompt_encoder(prompts)

    def _check_inputs(self, images: Tensor, masks: Tensor, prompts: list[str]) -> None:
        S = self.image_size
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W] in [0, 1], got {tuple(images.shape)}")
        if tuple(images.shape[2:]) != (S, S):
            raise ValueError(
                f"the tiny Fill model edits {S}x{S} images, got {tuple(images.shape[2:])}: resize them "
                f"(core.image_io.resize_image, or resize_to_multiple for other models) to {S}x{S}")
        check_edit_batch(images, masks, prompts)
        lo, hi = float(images.min()), float(images.max())
        if not (lo >= -1e-3 and hi <= 1 + 1e-3):
            raise ValueError(f"images must be floats in [0, 1], got values in [{lo:.3g}, {hi:.3g}]")

    def _ids(self, text_len: int, device: torch.device) -> tuple[Tensor, Tensor]:
        key = (text_len, str(device))
        if key not in self._ids_cache:
            h, w = self.latent_hw
            self._ids_cache[key] = (packing.image_ids(h, w, device=device), packing.text_ids(text_len, device=device))
        return self._ids_cache[key]

    def encode(self, images: Tensor, masks: Tensor, prompts: list[str]) -> Condition:
        """Source images [B,3,H,W] in [0,1], masks [B,1,H,W] (1 = generate), prompts -> Condition.

        Latent tensors of the Condition are float32 on the model's device; the blend mask is exact
        per latent element (one element = one pixel of one colour channel).
        """
        self._check_inputs(images, masks, prompts)
        device = self.device
        images = images.to(device=device, dtype=torch.float32)
        masks = validate_mask(masks.to(device=device, dtype=torch.float32), images, name="masks")
        f = self.codec.factor
        seq, pooled = self.encode_prompts(list(prompts))
        x0_known = packing.pack(self.codec.encode(images))
        masked = packing.pack(self.codec.masked_image(images, masks))
        folded = packing.pack(packing.fold_mask(masks, f))
        img_ids, txt_ids = self._ids(seq.shape[1], device)
        return Condition(
            prompt_embeds=seq, pooled=pooled, cond_latents=torch.cat([masked, folded], dim=-1),
            x0_known=x0_known, blend_mask=packing.pack(self.codec.element_mask(masks)),
            img_ids=img_ids, text_ids=txt_ids, latent_hw=self.latent_hw, image_hw=(self.image_size,) * 2)

    def _velocity(self, x_t: Tensor, t: Tensor, cond: Condition) -> Tensor:
        if x_t.shape != cond.x0_known.shape:
            raise ValueError(f"x_t {tuple(x_t.shape)} does not match the condition's latents "
                             f"{tuple(cond.x0_known.shape)}")
        dtype = self.dtype
        hidden = torch.cat([x_t.to(dtype), cond.cond_latents.to(dtype)], dim=-1)
        out = self.call_model(
            hidden_states=hidden, timestep=t.to(dtype), pooled_projections=cond.pooled.to(dtype),
            encoder_hidden_states=cond.prompt_embeds.to(dtype), txt_ids=cond.text_ids,
            img_ids=cond.img_ids, return_dict=False)[0]
        return out.to(x_t.dtype)

    def decode(self, x0: Tensor, cond: Condition) -> Tensor:
        """Packed clean latents [B, L, C] -> images [B, 3, H, W] in [0, 1] (differentiable)."""
        return self.codec.decode(packing.unpack(x0, *cond.latent_hw))
