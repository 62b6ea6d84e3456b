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

LoRA (core/lora.py): only adapter tensors are trainable (kept in float32 when the model runs in
bf16/fp16); `base()` evaluates the frozen base model; `save_lora_weights` writes diffusers' LoRA
format (FluxFillPipeline.load_lora_weights reads it) and `save_pretrained` a loadable pipeline
directory with the adapter merged into the transformer.
"""
from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from diffusers import FluxFillPipeline, FluxTransformer2DModel
from torch import Tensor

from . import packing
from .lora import merged_state_dict
from .masks import validate_mask
from .policy import Condition, Policy, check_edit_batch, swapped_weights
from .schedules import flux_sigmas, image_seq_len

DEFAULT_GUIDANCE = 30.0   # FluxFillPipeline's default guidance_scale for Fill [dev]
ADAPTER = Policy.LORA_ADAPTER
FRAME_COMPONENTS = ("vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler")
#: diffusers attention backends with a CPU implementation (PyTorch SDPA's math/flash kernels, flex)
CPU_ATTENTION_BACKENDS = frozenset({"native", "_native_math", "_native_flash", "flex"})
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def resolve_model_path(path: str | os.PathLike, *, local_files_only: bool = True) -> str:
    """A local FluxFillPipeline directory or a Hub id (in the cache unless downloads are allowed);
    raises FileNotFoundError naming the path and the fix before anything heavy is loaded."""
    p = Path(path)
    if p.exists():
        if not (p / "model_index.json").is_file():
            raise FileNotFoundError(f"{p} has no model_index.json: give a FluxFillPipeline directory "
                                    "(FluxFillPipeline.save_pretrained or a Hub snapshot)")
        return str(p)
    name = str(path)
    if not _REPO_ID.fullmatch(name):
        raise FileNotFoundError(f"model path {name!r} does not exist (and is not a Hub id like "
                                "'black-forest-labs/FLUX.1-Fill-dev')")
    if local_files_only:
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(name, "model_index.json"), str):
            raise FileNotFoundError(
                f"{name!r} is neither a local directory nor in the Hugging Face cache: download it first "
                f"(`hf download {name}`) or allow downloads (model.allow_download=true / local_files_only=False)")
    return name


def check_attention_backend(name: str, *, local_files_only: bool = True,
                            device: str | torch.device | None = None) -> str:
    """Validate a diffusers attention backend name, that its package is importable and, when
    `device` is given, that the backend runs there (most fused backends have no CPU kernel)."""
    from diffusers.models.attention_dispatch import (
        AttentionBackendName,
        _check_attention_backend_requirements,
    )

    valid = sorted(b.value for b in AttentionBackendName)
    if name not in valid:
        raise ValueError(f"unknown attention backend {name!r}; diffusers offers {', '.join(valid)} "
                         "('native' is PyTorch SDPA)")
    if name.endswith("_hub") and local_files_only:
        raise ValueError(f"attention backend {name!r} downloads its kernels from the Hub; allow downloads or "
                         "use 'flash' (flash-attn installed) or 'native'")
    try:
        _check_attention_backend_requirements(AttentionBackendName(name))
    except (RuntimeError, ImportError) as err:
        raise ValueError(f"attention backend {name!r} is not usable here: {err} Install that package "
                         "(flash-attn and xformers come with pip install '.[gpu]') or use "
                         "attention_backend='native'.") from None
    if device is not None and torch.device(device).type == "cpu" and name not in CPU_ATTENTION_BACKENDS:
        # otherwise SDPA fails at the first forward with "No viable backend ... was found"
        raise ValueError(f"attention backend {name!r} has no CPU kernel; on CPU use one of "
                         f"{', '.join(sorted(CPU_ATTENTION_BACKENDS))}")
    return name


class _DropMessage:
    """A logging filter that drops records containing `text`."""

    def __init__(self, text: str):
        self.text = text

    def filter(self, record) -> bool:
        return self.text not in record.getMessage()


@contextlib.contextmanager
def quiet_weights_io():
    """Without diffusers' and transformers' progress bars ("Loading pipeline components", "Loading
    weights", "Writing model shards"), which a small model prints on every load and save; the
    libraries' previous settings are restored afterwards."""
    from diffusers.utils import logging as dl
    from transformers.utils import logging as tl

    was = dl.is_progress_bar_enabled(), tl.is_progress_bar_enabled()
    dl.disable_progress_bar()
    tl.disable_progress_bar()
    try:
        yield
    finally:
        if was[0]:
            dl.enable_progress_bar()
        if was[1]:
            tl.enable_progress_bar()


class FluxFillPolicy(Policy):
    """FLUX.1 Fill as a mask-guided flow-matching editor (see the module docstring)."""

    def __init__(self, pipe: FluxFillPipeline, *, guidance: float | None = None,
                 max_sequence_length: int | None = None, image_size: int | tuple[int, int] | None = None):
        self.pipe = pipe
        self.model: FluxTransformer2DModel = pipe.transformer
        f = pipe.vae_scale_factor
        c = pipe.vae.config.latent_channels
        cfg = self.model.config
        if cfg.in_channels != 8 * c + 4 * f * f or (cfg.out_channels or cfg.in_channels) != 4 * c:
            raise ValueError(
                f"transformer in/out channels {cfg.in_channels}/{cfg.out_channels} are not FLUX Fill's "
                f"{8 * c + 4 * f * f}/{4 * c} for this VAE (is this FLUX.1 Fill, not FLUX.1 [dev]?)")
        if guidance is not None and not cfg.guidance_embeds:
            raise ValueError(f"guidance={guidance} given, but this transformer has no guidance embedding "
                             "(leave model.guidance unset; true CFG is core.samplers.sample_policy(cfg_scale=, uncond=))")
        self.guidance = (DEFAULT_GUIDANCE if guidance is None else float(guidance)) if cfg.guidance_embeds else None
        # FLUX's joint attention has no text mask: T5 padding changes the output, so a model must run
        # with the length it was trained with. FLUX.1's tokenizer says 512 (the pipeline's default);
        # the toy's says 16.
        self.max_sequence_length = (min(512, pipe.tokenizer_2.model_max_length) if max_sequence_length is None
                                    else int(max_sequence_length))
        if image_size is None:  # the VAE's native size: FLUX.1's config says 1024, the toy's 64
            image_size = int(pipe.vae.config.sample_size)
        self.image_size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        for part in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
            part.requires_grad_(False).eval()
        self.model.eval()  # no dropout in FLUX; eval keeps peft's LoRA dropout (0) out of it too
        #: words the text encoders were trained on, when that is a closed set (the toy: the world's)
        self.known_words: frozenset[str] | None = None

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        lora: Mapping | None = None,
        gradient_checkpointing: bool = False,
        attention_backend: str | None = None,
        guidance: float | None = None,
        local_files_only: bool = True,
        max_sequence_length: int | None = None,
        image_size: int | tuple[int, int] | None = None,
        transformer: str | os.PathLike | None = None,
    ) -> FluxFillPolicy:
        """Load FluxFillPipeline's components from `path` (local directory or cached Hub id).

        `lora`: {"r", "alpha", "targets", "init"} (see `add_lora`); `transformer`: a directory
        with a transformer to use instead of the pipeline's (e.g. `save_pretrained(...,
        transformer_only=True)`); `image_size`: the resolution `schedule()` assumes by default (None:
        the VAE's `sample_size`); `max_sequence_length`: T5 tokens (None: the tokenizer's length, at
        most 512).
        """
        if attention_backend is not None:
            check_attention_backend(attention_backend, local_files_only=local_files_only, device=device or "cpu")
        resolved = resolve_model_path(path, local_files_only=local_files_only)
        kwargs = {"local_files_only": local_files_only}
        if dtype is not None:
            kwargs["dtype"] = dtype
        with quiet_weights_io():
            if transformer is not None:
                if not (Path(transformer) / "config.json").is_file():
                    raise FileNotFoundError(f"transformer directory {transformer} has no config.json")
                kwargs["transformer"] = FluxTransformer2DModel.from_pretrained(transformer, dtype=dtype)
            pipe = FluxFillPipeline.from_pretrained(resolved, **kwargs)
        policy = cls(pipe, guidance=guidance, max_sequence_length=max_sequence_length, image_size=image_size)
        if Path(resolved, "toy_flux.json").is_file():  # the toy: its encoders know only the world's words
            from .world import VOCABULARY

            policy.known_words = frozenset(VOCABULARY)
        if device is not None:
            pipe.to(device)
        if lora is not None:
            policy.add_lora(**lora)
        if gradient_checkpointing:
            policy.model.enable_gradient_checkpointing()
        if attention_backend is not None:
            policy.set_attention_backend(attention_backend, local_files_only=local_files_only)
        return policy

    def set_attention_backend(self, name: str, *, local_files_only: bool = True) -> None:
        """Route the transformer's attention through a diffusers backend ('native', 'flash', ...);
        `*_hub` backends fetch kernels from the Hub and need `local_files_only=False`."""
        check_attention_backend(name, local_files_only=local_files_only, device=self.device)
        self.model.set_attention_backend(name)

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> FluxFillPolicy:
        """Move (and optionally cast) every component; LoRA tensors stay float32."""
        import logging

        # diffusers warns on every cast of a model, even when it keeps no module in float32 ("...: []")
        noise = logging.getLogger("diffusers.models.modeling_utils")
        drop = _DropMessage("should be kept in float32: []")
        noise.addFilter(drop)
        try:
            self.pipe.to(device=device, dtype=dtype)
        finally:
            noise.removeFilter(drop)
        if dtype is not None and self.has_lora:
            self._lora_to_float32()
        return self

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def vae_scale_factor(self) -> int:
        return self.pipe.vae_scale_factor

    # -- the Policy interface -------------------------------------------------------------------
    @property
    def latent_channels(self) -> int:
        return 4 * self.pipe.vae.config.latent_channels

    def schedule(self, steps: int, shift: float | None = None, *, image_hw: tuple[int, int] | None = None) -> Tensor:
        """Sampling times (steps + 1, 1 -> 0): FLUX's resolution-dependent shift for `image_hw`
        (default: the `image_size` given at load time), or a static `shift` when given."""
        if shift is not None:
            return flux_sigmas(steps, shift=shift)
        h, w = self.image_size if image_hw is None else image_hw
        sc = self.pipe.scheduler.config
        return flux_sigmas(steps, image_seq_len=image_seq_len(h, w, self.vae_scale_factor),
                           base_seq_len=sc.get("base_image_seq_len", 256), max_seq_len=sc.get("max_image_seq_len", 4096),
                           base_shift=sc.get("base_shift", 0.5), max_shift=sc.get("max_shift", 1.15))

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """Prompts -> (T5 sequence [B, Lt, D], CLIP pooled [B, Dp]), as the pipeline encodes them."""
        seq, pooled, _ = self.pipe.encode_prompt(prompt=list(prompts), prompt_2=None, device=self.device,
                                                 max_sequence_length=self.max_sequence_length)
        return seq, pooled

    def prompt_problem(self, prompt: str) -> str | None:
        """Why `prompt` would be read wrongly, or None: more T5 tokens than the model reads (the
        pipeline truncates silently), or words outside a closed training vocabulary."""
        n = len(self.pipe.tokenizer_2(prompt).input_ids)
        if n > self.max_sequence_length:
            return (f"prompt {prompt!r} has {n} T5 tokens; this model reads {self.max_sequence_length}: "
                    "shorten it")
        if self.known_words is not None:
            unknown = [w for w in re.findall(r"\d|[^\W\d_]+|[^\w\s]", prompt.lower()) if w not in self.known_words]
            if unknown:
                return (f"prompt {prompt!r} has words outside the toy model's vocabulary: {unknown}. The toy was "
                        "trained only on the synthetic world's words (core.world.VOCABULARY)")
        return None

    def _check_inputs(self, images: Tensor, masks: Tensor, prompts: list[str]) -> None:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W] in [0, 1], got {tuple(images.shape)}")
        m = 2 * self.vae_scale_factor
        H, W = images.shape[2:]
        if H % m or W % m:
            raise ValueError(f"FLUX Fill needs image sides divisible by {m} (VAE factor x 2x2 packing), got {H}x{W}: "
                             f"resize with core.image_io.resize_to_multiple(image, {m}) (and the mask alike)")
        check_edit_batch(images, masks, prompts)
        lo, hi = float(images.min()), float(images.max())
        if not (lo >= -1e-3 and hi <= 1 + 1e-3):
            raise ValueError(f"images must be floats in [0, 1], got values in [{lo:.3g}, {hi:.3g}]")

    def _vae_latents(self, pixels: Tensor) -> Tensor:
        vae = self.pipe.vae
        z = vae.encode(pixels.to(vae.dtype)).latent_dist.mode()
        return ((z - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor).float()

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
        B = images.shape[0]
        guidance = None if self.guidance is None else torch.full((B,), self.guidance, device=device)
        return Condition(
            prompt_embeds=seq, pooled=pooled,
            cond_latents=torch.cat([packing.pack(masked), packing.pack(folded)], dim=-1),
            x0_known=packing.pack(source), blend_mask=packing.pack(blend.contiguous()),
            img_ids=packing.image_ids(h, w, device=device, dtype=seq.dtype),
            text_ids=packing.text_ids(seq.shape[1], device=device, dtype=seq.dtype),
            latent_hw=(h, w), image_hw=tuple(images.shape[2:]), guidance=guidance)

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

    def decode(self, x0: Tensor, cond: Condition) -> Tensor:
        """Packed clean latents [B, L, C] -> images [B, 3, H, W] in [0, 1] (differentiable)."""
        vae = self.pipe.vae
        z = packing.unpack(x0, *cond.latent_hw) / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        image = vae.decode(z.to(vae.dtype), return_dict=False)[0]
        return (image.float() / 2 + 0.5).clamp(0, 1)

    # -- reference policy and persistence -------------------------------------------------------
    def save_lora_weights(self, directory: str | os.PathLike, weights: Mapping[str, Tensor] | None = None) -> None:
        """Write the adapter (or the adapter weight set `weights`) in diffusers' LoRA format."""
        from peft.utils import get_peft_model_state_dict

        if not self.has_lora:
            raise ValueError("this policy has no LoRA adapter to save; use save_pretrained for a full model")
        with swapped_weights(self.model, weights) if weights is not None else contextlib.nullcontext():
            state = {k: v.detach().cpu().clone() for k, v in
                     get_peft_model_state_dict(self.model, adapter_name=ADAPTER).items()}
        config = self.model.peft_config[ADAPTER].to_dict()
        config["target_modules"] = sorted(config["target_modules"])
        FluxFillPipeline.save_lora_weights(directory, transformer_lora_layers=state,
                                           transformer_lora_adapter_metadata=config)

    def load_lora_weights(self, directory: str | os.PathLike) -> None:
        """Load a LoRA saved by `save_lora_weights` (or diffusers) into this policy's adapter, in
        place (optimisers keep their parameters); without an adapter, add one from the file's config."""
        from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

        if not Path(directory).exists():
            raise FileNotFoundError(f"LoRA directory {directory} does not exist")
        state, metadata = FluxFillPipeline.lora_state_dict(directory, return_lora_metadata=True)
        prefix = FluxFillPipeline.transformer_name + "."
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if not self.has_lora:
            meta = {k[len(prefix):]: v for k, v in (metadata or {}).items() if k.startswith(prefix)}
            if not {"r", "lora_alpha", "target_modules"} <= set(meta):
                raise ValueError(f"{directory} carries no adapter config; call add_lora(r=..., alpha=..., "
                                 "targets=...) with the adapter's settings first")
            self.add_lora(r=int(meta["r"]), alpha=meta["lora_alpha"], targets=sorted(meta["target_modules"]),
                          init=False)
        expected = set(get_peft_model_state_dict(self.model, adapter_name=ADAPTER))
        if set(state) != expected:
            missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
            raise ValueError(f"LoRA in {directory} does not fit this adapter: {len(missing)} tensors missing "
                             f"(e.g. {missing[:2]}), {len(extra)} unexpected (e.g. {extra[:2]}); check targets")
        try:
            set_peft_model_state_dict(self.model, state, adapter_name=ADAPTER)
        except RuntimeError as err:
            raise ValueError(f"LoRA in {directory} has other shapes than this adapter (rank?): {err}") from None

    def save_pretrained(self, directory: str | os.PathLike, *, transformer_only: bool = False) -> None:
        """A FluxFillPipeline directory with the (LoRA-merged) transformer; `transformer_only`
        writes just transformer/ (load it with from_pretrained(base, transformer=...))."""
        with quiet_weights_io():
            self._save_pretrained(Path(directory), transformer_only)

    def _save_pretrained(self, root: Path, transformer_only: bool) -> None:
        from huggingface_hub import save_torch_state_dict

        target = root / "transformer"
        target.mkdir(parents=True, exist_ok=True)
        if self.has_lora:
            self.model.save_config(target)
            save_torch_state_dict(merged_state_dict(self.model, ADAPTER), target,
                                  filename_pattern="diffusion_pytorch_model{suffix}.safetensors",
                                  max_shard_size="10GB")
        else:
            self.model.save_pretrained(target)
        if transformer_only:
            return
        for name in FRAME_COMPONENTS:
            getattr(self.pipe, name).save_pretrained(root / name)
        self.pipe.save_config(root)


__all__ = ["DEFAULT_GUIDANCE", "FluxFillPolicy", "check_attention_backend", "quiet_weights_io", "resolve_model_path"]
