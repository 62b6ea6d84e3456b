"""FLUX.1 Fill [dev] (diffusers' FluxFillPipeline components) as a Policy.

What the pipeline does, and what `encode` / `_velocity` / `decode` reproduce (tested against it):
- prompts: CLIP's pooled output + T5's sequence (`FluxFillPipeline.encode_prompt`);
- the image goes to [-1, 1]; the masked image `image * (1 - mask)` is VAE-encoded, shifted and
  scaled ((z - shift_factor) * scaling_factor) and packed 2x2 (64 channels per token for FLUX's 16
  latent channels); the binary mask is folded 8x8 and packed (256 channels). Transformer input per
  token: noisy latents | masked-image latents | mask = 64 | 64 | 256 channels;
- the transformer gets t in [0, 1] (the pipeline passes scheduler timesteps / 1000) and the
  distilled guidance value (30 for Fill [dev]) and predicts v = eps - x0 in the packed layout.
Differences, on purpose: the pipeline samples the VAE posterior, we take its mode (a condition
should not be random); the pipeline runs under no_grad, our velocity and decode keep gradients.

For the mask-guided blend, `x0_known` holds the packed latents of the whole source and
`blend_mask` marks every latent whose 8x8 pixel block touches the mask (a VAE latent is not
pixel-exact), expanded to all channels: [B, L, 64].

LoRA (core/policies/lora.py): only adapter tensors are trainable (kept in float32 when the model runs in
bf16/fp16); `base()` evaluates the frozen base model; `save_lora_weights` writes diffusers' LoRA
format (FluxFillPipeline.load_lora_weights reads it) and `save_pretrained` a loadable pipeline
directory with the adapter merged into the transformer.
"""
from __future__ import annotations

import torch
from diffusers import FluxFillPipeline
from torch import Tensor

from core.masks import validate_mask
from core.policies import packing
from core.policies.flux_base import (  # noqa: F401  (re-exported: the library's older import sites)
    ADAPTER,
    CPU_ATTENTION_BACKENDS,
    FRAME_COMPONENTS,
    FluxPolicyBase,
    check_attention_backend,
    quiet_weights_io,
    resolve_model_path,
)
from core.policies.policy import Condition, check_edit_batch

DEFAULT_GUIDANCE = 30.0   # FluxFillPipeline's default guidance_scale for Fill [dev]


class FluxFillPolicy(FluxPolicyBase):
    """FLUX.1 Fill as a mask-guided flow-matching editor (see the module docstring; loading, the
    schedule, prompts, decoding, LoRA and saving are core.policies.flux_base.FluxPolicyBase's)."""

    PIPELINE_CLASS = FluxFillPipeline
    MODEL_NAME = "FLUX Fill"
    HUB_EXAMPLE = "black-forest-labs/FLUX.1-Fill-dev"
    DEFAULT_GUIDANCE = DEFAULT_GUIDANCE

    def _check_transformer(self) -> None:
        f = self.pipe.vae_scale_factor
        c = self.pipe.vae.config.latent_channels
        cfg = self.model.config
        if cfg.in_channels != 8 * c + 4 * f * f or (cfg.out_channels or cfg.in_channels) != 4 * c:
            raise ValueError(
                f"transformer in/out channels {cfg.in_channels}/{cfg.out_channels} are not FLUX Fill's "
                f"{8 * c + 4 * f * f}/{4 * c} for this VAE (is this FLUX.1 Fill, not FLUX.1 [dev]?)")

    def _check_inputs(self, images: Tensor, masks: Tensor, prompts: list[str]) -> None:
        self._check_images(images)
        check_edit_batch(images, masks, prompts)

    @torch.no_grad()
    def encode(self, images: Tensor, masks: Tensor, prompts: list[str]) -> Condition:
        """Source images [B,3,H,W] in [0,1], binary masks [B,1,H,W] (1 = generate), prompts ->
        Condition (float32 latents; no gradients: every encoder is frozen)."""
        self._check_inputs(images, masks, prompts)
        device, f = self.device, self.vae_scale_factor
        images = images.to(device=device, dtype=torch.float32)
        masks = validate_mask(masks.to(device=device, dtype=torch.float32), images, name="masks")
        seq, pooled = self.encode_prompts(prompts)
        pixels = images * 2 - 1
        source = self._vae_latents(pixels)
        masked = self._vae_latents(pixels * (1 - masks))
        h, w = source.shape[-2:]
        folded = packing.fold_mask(masks, f)
        blend = packing.latent_mask(masks, f).expand(-1, source.shape[1], -1, -1)
        return Condition(
            prompt_embeds=seq, pooled=pooled,
            cond_latents=torch.cat([packing.pack(masked), packing.pack(folded)], dim=-1),
            x0_known=packing.pack(source), blend_mask=packing.pack(blend.contiguous()),
            img_ids=packing.image_ids(h, w, device=device, dtype=seq.dtype), text_ids=self._text_ids(seq),
            latent_hw=(h, w), image_hw=tuple(images.shape[2:]), guidance=self._guidance(images.shape[0]))

    def _velocity(self, x_t: Tensor, t: Tensor, cond: Condition) -> Tensor:
        if x_t.shape != cond.x0_known.shape:
            raise ValueError(f"x_t {tuple(x_t.shape)} does not match the condition's latents {tuple(cond.x0_known.shape)}")
        dtype = self.dtype
        out = self.call_model(
            hidden_states=torch.cat([x_t.to(dtype), cond.cond_latents.to(dtype)], dim=-1),
            timestep=t.to(dtype), guidance=cond.guidance, pooled_projections=cond.pooled.to(dtype),
            encoder_hidden_states=cond.prompt_embeds.to(dtype), txt_ids=cond.text_ids, img_ids=cond.img_ids,
            return_dict=False)[0]
        return out.to(x_t.dtype)


__all__ = ["DEFAULT_GUIDANCE", "FluxFillPolicy", "check_attention_backend", "quiet_weights_io", "resolve_model_path"]
