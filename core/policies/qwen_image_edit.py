"""Qwen-Image-Edit (diffusers' QwenImageEditPipeline components) as a Policy: instruction editing.

What the pipeline does, and what `encode` / `_velocity` / `decode` reproduce (tested against it):
- prompts: Qwen2.5-VL sees the SOURCE IMAGE with the instruction (the pipeline's processor and
  prompt template, `encode_prompt(prompt, image=...)`), so the text condition depends on the image
  and is computed in `encode`; the last hidden state minus the template's first 64 tokens, padded
  to the batch's longest with a text attention mask (kept in `Condition.extra["prompt_mask"]`);
  there is no pooled embedding (`Condition.pooled` is None);
- the source image goes to [-1, 1], through the QwenImage VAE (5-D: [B, C, T=1, H, W], posterior
  mode), normalised per channel with the VAE's latents_mean / latents_std, packed 2x2 and APPENDED
  to the image sequence as Kontext does; positions come from `img_shapes` ((1, h/2, w/2) for the
  generated grid and for the source), not from position ids; the source tokens' outputs are dropped;
- the transformer gets t in [0, 1] (no guidance embedding) and predicts v = eps - x0;
- true CFG (`true_cfg_scale` > 1, with `negative_prompt`, default " ") as the pipeline does it,
  including its norm rescale (the guided velocity is scaled to the conditional one's norm per
  token); core.sampling.samplers.cfg_velocity has no rescale, so this policy's `velocity` applies it itself
  when `true_cfg_scale` > 1 (default 1: off, one transformer call).
Differences, on purpose: the pipeline runs under no_grad, our velocity and decode keep gradients;
the pipeline takes PIL images and resizes the source to about 1 MP (`calculate_dimensions`); this
policy resizes nothing (sides divisible by 16 for the real VAE). The VAE sees the given float
pixels; the text encoder's processor sees them as 8-bit PIL images, as a pipeline user's would be.

Condition layout: `cond_latents` = `x0_known` = the packed source latents [B, L, 4 z_dim];
`blend_mask` ones (no mask: `masks` is checked and ignored); `img_ids` / `text_ids` are FLUX-style ids
kept for the Condition's shape contract only (the model uses `img_shapes` from `latent_hw`).
`extra` holds batched tensors (they follow `Condition.index` / `repeat_interleave`): "prompt_mask"
[B, Lt] and, with true CFG, "negative_embeds" / "negative_mask".
Prompt lengths differ between batches (no fixed padding): conditions encoded in different batches
cannot be concatenated with `Condition.cat` unless their text lengths agree.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
from diffusers import QwenImageEditPipeline, QwenImageTransformer2DModel
from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_shift
from torch import Tensor

from core.policies import packing
from core.policies.flux_base import FluxPolicyBase
from core.policies.policy import Condition, check_edit_batch


class QwenImageEditPolicy(FluxPolicyBase):
    """Qwen-Image-Edit as an instruction editor (see the module docstring). Loading, dtypes,
    attention backends, gradient checkpointing, LoRA in diffusers' format (the pipeline's
    `load_lora_weights` reads `save_lora_weights`) and `save_pretrained` come from FluxPolicyBase."""

    PIPELINE_CLASS = QwenImageEditPipeline
    TRANSFORMER_CLASS = QwenImageTransformer2DModel
    FRAME_COMPONENTS = ("vae", "text_encoder", "tokenizer", "processor", "scheduler")
    MODEL_NAME = "Qwen-Image-Edit"
    HUB_EXAMPLE = "Qwen/Qwen-Image-Edit"

    def __init__(self, pipe, *, guidance: float | None = None, max_sequence_length: int | None = None,
                 image_size: int | tuple[int, int] | None = None, true_cfg_scale: float = 1.0,
                 negative_prompt: str = " "):
        self.pipe = pipe
        self.model: QwenImageTransformer2DModel = pipe.transformer
        self._check_transformer()
        if guidance is not None:
            raise ValueError(f"guidance={guidance} given, but Qwen-Image-Edit has no distilled guidance; "
                             "use true_cfg_scale (with negative_prompt)")
        self.guidance = None
        self.true_cfg_scale = float(true_cfg_scale)
        self.negative_prompt = negative_prompt
        self.max_sequence_length = 1024 if max_sequence_length is None else int(max_sequence_length)
        if image_size is None:  # the pipeline's default_sample_size (128) x the VAE factor: 1024 for the real model
            image_size = int(pipe.default_sample_size * pipe.vae_scale_factor)
        self.image_size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        for part in (pipe.vae, pipe.text_encoder):
            part.requires_grad_(False).eval()
        self.model.eval()
        self.known_words = None

    def _check_transformer(self) -> None:
        c = self.pipe.vae.config.z_dim
        cfg = self.model.config
        if cfg.in_channels != 4 * c or (cfg.out_channels or cfg.in_channels) * cfg.patch_size ** 2 != 4 * c:
            raise ValueError(f"transformer in/out channels {cfg.in_channels}/{cfg.out_channels} do not fit "
                             f"Qwen-Image-Edit's packed latents ({4 * c} per token) for this VAE")

    @property
    def latent_channels(self) -> int:
        return 4 * self.pipe.vae.config.z_dim

    def schedule(self, steps: int, shift: float | None = None, *, image_hw: tuple[int, int] | None = None) -> Tensor:
        """The pipeline's sigmas (steps + 1 values, 1 -> 0): linspace(1, 1/steps) through the
        scheduler's dynamic shift for the generated token count (its exponential time shift and
        shift_terminal included); a static `shift` gives FLUX's plain shifted schedule instead."""
        if shift is not None:
            from core.sampling.schedules import flux_sigmas

            return flux_sigmas(steps, shift=shift)
        h, w = self.image_size if image_hw is None else image_hw
        f = 2 * self.vae_scale_factor
        sc = self.pipe.scheduler.config
        mu = calculate_shift((h // f) * (w // f), sc.get("base_image_seq_len", 256), sc.get("max_image_seq_len", 4096),
                             sc.get("base_shift", 0.5), sc.get("max_shift", 1.15))
        scheduler = copy.deepcopy(self.pipe.scheduler)
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu, device="cpu")
        return scheduler.sigmas.float()

    @staticmethod
    def _pil(images: Tensor) -> list:
        from PIL import Image

        arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(a) for a in arr]

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], images: Tensor) -> tuple[Tensor, Tensor]:
        """Instructions with their source images -> (Qwen2.5-VL sequence [B, Lt, D], mask [B, Lt])."""
        seq, mask = self.pipe.encode_prompt(list(prompts), image=self._pil(images), device=self.device)
        if mask is None:  # the pipeline drops an all-ones mask
            mask = torch.ones(seq.shape[:2], dtype=torch.long, device=seq.device)
        return seq.float(), mask

    def prompt_problem(self, prompt: str) -> str | None:
        n = len(self.pipe.tokenizer(prompt).input_ids)
        if n > self.max_sequence_length:
            return f"prompt {prompt!r} has {n} tokens; keep instructions under {self.max_sequence_length}"
        return None

    def _check_inputs(self, images: Tensor, masks: Tensor | None, prompts: list[str]) -> None:
        self._check_images(images)
        check_edit_batch(images, images[:, :1] if masks is None else masks, prompts)

    def _vae_latents(self, pixels: Tensor) -> Tensor:
        """Pixels [B, 3, H, W] in [-1, 1] -> normalised latents [B, C, h, w] (float32), as the pipeline."""
        vae = self.pipe.vae
        z = vae.encode(pixels.unsqueeze(2).to(vae.dtype)).latent_dist.mode()[:, :, 0].float()
        mean, std = self._latent_stats(z)
        return (z - mean) / std

    def _latent_stats(self, like: Tensor) -> tuple[Tensor, Tensor]:
        cfg = self.pipe.vae.config
        shape = (1, cfg.z_dim, 1, 1)
        return (torch.tensor(cfg.latents_mean).view(shape).to(like.device, like.dtype),
                torch.tensor(cfg.latents_std).view(shape).to(like.device, like.dtype))

    @torch.no_grad()
    def encode(self, images: Tensor, masks: Tensor | None, prompts: list[str]) -> Condition:
        """Source images [B,3,H,W] in [0,1] and instructions -> Condition (float32; no gradients).
        `masks` ([B,1,H,W] or None) is checked and ignored: the whole image is generated."""
        self._check_inputs(images, masks, prompts)
        device = self.device
        images = images.to(device=device, dtype=torch.float32)
        seq, mask = self.encode_prompts(prompts, images)
        extra = {"prompt_mask": mask}
        if self.true_cfg_scale > 1:
            neg, neg_mask = self.encode_prompts([self.negative_prompt] * len(prompts), images)
            extra.update(negative_embeds=neg, negative_mask=neg_mask)
        return self._source_appended_condition(images, seq, None, extra=extra)

    def _transformer(self, hidden: Tensor, t: Tensor, embeds: Tensor, mask: Tensor, cond: Condition) -> Tensor:
        dtype, L = self.dtype, hidden.shape[1] // 2
        h, w = cond.latent_hw
        grid = (1, h // 2, w // 2)
        out = self.call_model(
            hidden_states=hidden, timestep=t.to(dtype), encoder_hidden_states=embeds.to(dtype),
            encoder_hidden_states_mask=None if bool(mask.all()) else mask,
            img_shapes=[[grid, grid]] * hidden.shape[0], return_dict=False)[0]
        return out[:, :L]

    def _velocity(self, x_t: Tensor, t: Tensor, cond: Condition) -> Tensor:
        if x_t.shape != cond.x0_known.shape:
            raise ValueError(f"x_t {tuple(x_t.shape)} does not match the condition's latents {tuple(cond.x0_known.shape)}")
        hidden = torch.cat([x_t.to(self.dtype), cond.cond_latents.to(self.dtype)], dim=1)
        v = self._transformer(hidden, t, cond.prompt_embeds, cond.extra["prompt_mask"], cond)
        if self.true_cfg_scale > 1:
            if "negative_embeds" not in cond.extra:
                raise ValueError("true_cfg_scale > 1 but the condition has no negative prompt: encode it with "
                                 "this policy (true_cfg_scale set before encode)")
            neg = self._transformer(hidden, t, cond.extra["negative_embeds"], cond.extra["negative_mask"], cond)
            comb = neg + self.true_cfg_scale * (v - neg)
            v = comb * (torch.norm(v, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))
        return v.to(x_t.dtype)

    def decode(self, x0: Tensor, cond) -> Tensor:
        """Packed clean latents [B, L, C] -> images [B, 3, H, W] in [0, 1] (differentiable)."""
        vae = self.pipe.vae
        z = packing.unpack(x0, *cond.latent_hw)
        mean, std = self._latent_stats(z)
        image = vae.decode((z * std + mean).unsqueeze(2).to(vae.dtype), return_dict=False)[0][:, :, 0]
        return (image.float() / 2 + 0.5).clamp(0, 1)


__all__ = ["QwenImageEditPolicy"]
