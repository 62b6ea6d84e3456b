"""FLUX.1 Kontext [dev] (diffusers' FluxKontextPipeline components) as a Policy: instruction editing,
the base model of Edit-R1.

What the pipeline does, and what `encode` / `_velocity` / `decode` reproduce (tested against it):
- prompts: CLIP's pooled output + T5's sequence, as FLUX.1 [dev] (`encode_prompt`);
- the source image goes to [-1, 1], is VAE-encoded (the posterior's mode: the pipeline's
  `sample_mode="argmax"`), shifted and scaled and packed 2x2 (64 channels per token); these source
  tokens are APPENDED to the image sequence: the transformer (a plain FLUX.1 transformer,
  in_channels = 64 = the packed latent channels, no Fill channels) sees [x_t tokens | source tokens],
  with position ids (0, i, j) for the generated grid and (1, i, j) for the source grid (first id
  coordinate 1), and its output for the source tokens is dropped;
- the transformer gets t in [0, 1] and the distilled guidance value (FLUX dev's guidance embedding;
  2.5 by default here, the value of the model card and the pipeline's example; the pipeline's
  argument defaults to 3.5) and predicts v = eps - x0 for the generated tokens.
Differences, on purpose: the pipeline runs under no_grad, our velocity and decode keep gradients;
the pipeline resizes: `__call__` scales the output to `max_area` (1024^2) at the requested aspect
ratio and, with `_auto_resize` (its default), resizes the source to the nearest of
PREFERRED_KONTEXT_RESOLUTIONS (Kontext's training resolutions, about 1 MP). This policy resizes
nothing: the output has the source's size, whatever size `encode` is given (sides divisible by 16
for FLUX.1; `preferred_resolution` names the size the pipeline would pick, to prepare data with
core.io.image_io.resize_image). `pipe(image=x, height=H, width=W, max_area=H * W, _auto_resize=False)`
is the pipeline call this policy equals.

How the Condition carries an instruction edit (Kontext has no mask):
- `cond_latents` [B, L, 64]: the packed source latents (the appended tokens);
- `img_ids` [2L, 3]: the position ids of the transformer's whole image sequence, generated tokens
  first, then source tokens (the pipeline's `latent_ids`); the generated tokens are the first
  `x0_known.shape[1]` of them;
- `blend_mask` [B, L, 1] of ones: everything is generated. The library's samplers still run the
  mask-aware blend step (core.sampling.samplers, kernels.masked_blend_step); with m = 1 it is exactly the
  plain solver step (1 * x + 0 * kept = x), so blending on or off gives the same rollout, and the
  trainers' masked losses (NFT's mask_loss, GRPO/AWM's weights, ReFL's x0 blend) cover every token;
- `x0_known` [B, L, 64]: the packed source latents again (nothing is kept from it with a blend
  mask of ones; it gives the sampler state's shape and would be the kept region if a mask were
  ever used for blending).
`encode(images, masks, prompts)` keeps the Policy signature, because the trainers and evaluators
call every policy with the batch's masks (`policy.encode(images, masks, prompts)`): a mask is
accepted and checked for shape but does not reach the model, and `masks=None` is allowed.

Loading (a local directory, `resolve_model_path`), the schedule (FLUX's resolution-dependent shift
from the number of generated tokens, as the pipeline computes it), dtypes, attention backends,
gradient checkpointing, LoRA in diffusers' format (FluxKontextPipeline.load_lora_weights reads
`save_lora_weights`) and `save_pretrained` are core.policies.flux_base.FluxPolicyBase's, shared with FLUX.1 Fill.
"""
from __future__ import annotations

import torch
from diffusers import FluxKontextPipeline
from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS
from torch import Tensor

from core.policies.flux_base import FluxPolicyBase
from core.policies.policy import Condition, check_edit_batch

DEFAULT_GUIDANCE = 2.5   # FLUX.1 Kontext [dev]'s model card and FluxKontextPipeline's example


def preferred_resolution(height: int, width: int) -> tuple[int, int]:
    """(height, width) of the Kontext training resolution closest in aspect ratio to
    height x width: what FluxKontextPipeline's `_auto_resize` resizes a source image to."""
    aspect = width / height
    _, w, h = min((abs(aspect - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS)
    return h, w


class FluxKontextPolicy(FluxPolicyBase):
    """FLUX.1 Kontext as an instruction editor (see the module docstring)."""

    PIPELINE_CLASS = FluxKontextPipeline
    MODEL_NAME = "FLUX Kontext"
    HUB_EXAMPLE = "black-forest-labs/FLUX.1-Kontext-dev"
    DEFAULT_GUIDANCE = DEFAULT_GUIDANCE

    def _check_transformer(self) -> None:
        c = self.pipe.vae.config.latent_channels
        cfg = self.model.config
        if cfg.in_channels != 4 * c or (cfg.out_channels or cfg.in_channels) != 4 * c:
            raise ValueError(
                f"transformer in/out channels {cfg.in_channels}/{cfg.out_channels} are not FLUX Kontext's "
                f"{4 * c}/{4 * c} for this VAE (is this FLUX.1 Fill, not FLUX.1 Kontext?)")

    def _check_inputs(self, images: Tensor, masks: Tensor | None, prompts: list[str]) -> None:
        self._check_images(images)
        # the masks are not used, but a batch whose sizes disagree is a caller's bug all the same
        check_edit_batch(images, images[:, :1] if masks is None else masks, prompts)

    @torch.no_grad()
    def encode(self, images: Tensor, masks: Tensor | None, prompts: list[str]) -> Condition:
        """Source images [B,3,H,W] in [0,1] and instructions -> Condition (float32 latents; no
        gradients: every encoder is frozen). `masks` ([B,1,H,W] or None) is checked and ignored:
        the whole image is generated (blend mask of ones)."""
        self._check_inputs(images, masks, prompts)
        device = self.device
        images = images.to(device=device, dtype=torch.float32)
        seq, pooled = self.encode_prompts(prompts)
        return self._source_appended_condition(images, seq, pooled, ids_dtype=seq.dtype,
                                               guidance=self._guidance(images.shape[0]))

    def _velocity(self, x_t: Tensor, t: Tensor, cond: Condition) -> Tensor:
        if x_t.shape != cond.x0_known.shape:
            raise ValueError(f"x_t {tuple(x_t.shape)} does not match the condition's latents {tuple(cond.x0_known.shape)}")
        dtype, L = self.dtype, x_t.shape[1]
        out = self.call_model(
            hidden_states=torch.cat([x_t.to(dtype), cond.cond_latents.to(dtype)], dim=1),
            timestep=t.to(dtype), guidance=cond.guidance, pooled_projections=cond.pooled.to(dtype),
            encoder_hidden_states=cond.prompt_embeds.to(dtype), txt_ids=cond.text_ids, img_ids=cond.img_ids,
            return_dict=False)[0]
        return out[:, :L].to(x_t.dtype)


__all__ = ["DEFAULT_GUIDANCE", "FluxKontextPolicy", "preferred_resolution"]
