"""What every FLUX editor policy shares, whatever its conditioning (FLUX.1 Fill, FLUX.1 Kontext).

- `resolve_model_path`: a local pipeline directory or a cached Hub id, with a clear error;
- `check_attention_backend` and `quiet_weights_io`: diffusers attention backends, quiet loading;
- `FluxPolicyBase`: a `Policy` on a diffusers FLUX pipeline (CLIP + T5 prompts, the VAE with
  shift and scale, FLUX's packed 2x2 latents, FLUX's resolution-dependent schedule, dtypes and
  devices, LoRA in diffusers' format, a loadable pipeline directory). A subclass names its
  pipeline class and implements `_check_transformer`, `encode` and `_velocity`: how the condition
  reaches the transformer (Fill: channels concatenated per token; Kontext: tokens appended to the
  sequence).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

import torch
from diffusers import FluxTransformer2DModel
from torch import Tensor

from core.policies import packing
from core.policies.lora import merged_state_dict
from core.policies.policy import Condition, Policy, swapped_weights
from core.sampling.schedules import flux_sigmas, image_seq_len

ADAPTER = Policy.LORA_ADAPTER
FRAME_COMPONENTS = ("vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler")
#: diffusers attention backends with a CPU implementation (PyTorch SDPA's math/flash kernels, flex)
CPU_ATTENTION_BACKENDS = frozenset({"native", "_native_math", "_native_flash", "flex"})
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def resolve_model_path(path: str | os.PathLike, *, local_files_only: bool = True,
                       pipeline: str = "FluxFillPipeline", example: str = "black-forest-labs/FLUX.1-Fill-dev") -> str:
    """A local `pipeline` directory or a Hub id (in the cache unless downloads are allowed);
    raises FileNotFoundError naming the path and the fix before anything heavy is loaded
    (`example`: a Hub id to show in the message)."""
    p = Path(path)
    if p.exists():
        if not (p / "model_index.json").is_file():
            raise FileNotFoundError(f"{p} has no model_index.json: give a {pipeline} directory "
                                    f"({pipeline}.save_pretrained or a Hub snapshot)")
        return str(p)
    name = str(path)
    if not _REPO_ID.fullmatch(name):
        raise FileNotFoundError(f"model path {name!r} does not exist (and is not a Hub id like {example!r})")
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


#: first position-id coordinate of appended source tokens (Kontext's, also Qwen-Image-Edit's)
SOURCE_ID = 1


class FluxPolicyBase(Policy):
    """A Policy on a diffusers FLUX pipeline (see the module docstring); subclasses set the class
    attributes and implement `_check_transformer`, `encode` and `_velocity`."""

    #: the diffusers pipeline class whose directories this policy loads and writes
    PIPELINE_CLASS: ClassVar[type]
    #: the model's name in messages, and a Hub id for the "not found" message
    MODEL_NAME: ClassVar[str] = "FLUX"
    HUB_EXAMPLE: ClassVar[str] = "black-forest-labs/FLUX.1-dev"
    #: the distilled-guidance value when none is given (the pipeline's for this model)
    DEFAULT_GUIDANCE: ClassVar[float] = 3.5
    #: the transformer class (`from_pretrained(transformer=...)`) and the components saved besides it
    TRANSFORMER_CLASS: ClassVar[type] = FluxTransformer2DModel
    FRAME_COMPONENTS: ClassVar[tuple[str, ...]] = FRAME_COMPONENTS

    def __init__(self, pipe, *, guidance: float | None = None,
                 max_sequence_length: int | None = None, image_size: int | tuple[int, int] | None = None):
        self.pipe = pipe
        self.model: FluxTransformer2DModel = pipe.transformer
        self._check_transformer()
        cfg = self.model.config
        if guidance is not None and not cfg.guidance_embeds:
            raise ValueError(f"guidance={guidance} given, but this transformer has no guidance embedding "
                             "(leave model.guidance unset; true CFG is core.sampling.samplers.sample_policy(cfg_scale=, uncond=))")
        self.guidance = ((self.DEFAULT_GUIDANCE if guidance is None else float(guidance))
                         if cfg.guidance_embeds else None)
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
        #: a toy's toy_flux.json text (how it was built; its vocabulary), None for other models
        self.toy_spec: str | None = None

    def _check_transformer(self) -> None:
        """Raise a ValueError when `self.model` does not take this policy's conditioning."""
        raise NotImplementedError

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
        components: Mapping | None = None,
        **options,
    ):
        """Load the pipeline's components from `path` (local directory or cached Hub id).

        `lora`: {"r", "alpha", "targets", "init"} (see `add_lora`); `transformer`: a directory
        with a transformer to use instead of the pipeline's (e.g. `save_pretrained(...,
        transformer_only=True)`); `image_size`: the resolution `schedule()` assumes by default (None:
        the VAE's `sample_size`); `max_sequence_length`: T5 tokens (None: the tokenizer's length, at
        most 512); `components`: pipeline components to use instead of loading them (passed to
        the pipeline's from_pretrained); `options`: further keyword arguments of the policy class.
        """
        if attention_backend is not None:
            check_attention_backend(attention_backend, local_files_only=local_files_only, device=device or "cpu")
        resolved = resolve_model_path(path, local_files_only=local_files_only,
                                      pipeline=cls.PIPELINE_CLASS.__name__, example=cls.HUB_EXAMPLE)
        kwargs = {"local_files_only": local_files_only}
        if dtype is not None:
            kwargs["dtype"] = dtype
        with quiet_weights_io():
            if transformer is not None:
                if not (Path(transformer) / "config.json").is_file():
                    raise FileNotFoundError(f"transformer directory {transformer} has no config.json")
                kwargs["transformer"] = cls.TRANSFORMER_CLASS.from_pretrained(transformer, dtype=dtype)
            pipe = cls.PIPELINE_CLASS.from_pretrained(resolved, **kwargs, **dict(components or {}))
        policy = cls(pipe, guidance=guidance, max_sequence_length=max_sequence_length, image_size=image_size,
                     **options)
        spec_file = Path(resolved, "toy_flux.json")
        if spec_file.is_file():  # a toy: its encoders know only the world's words
            from core.toy_flux.build import ToyFluxSpec

            policy.known_words = frozenset(ToyFluxSpec.from_dict(json.loads(spec_file.read_text())).vocabulary)
            policy.toy_spec = spec_file.read_text()  # save_pretrained writes it along, so exports stay toys
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

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None):
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
        # the VAE's: a transformer whose shards FSDP2 keeps in host memory (rl dist.cpu_offload) reports the CPU
        # while it computes on the GPU
        return self.pipe.vae.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def vae_scale_factor(self) -> int:
        return self.pipe.vae_scale_factor

    # -- shared parts of the Policy interface ---------------------------------------------------
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
                        "trained only on the synthetic world's words (core.synthetic.world.VOCABULARY; an instruction toy "
                        "also on core.synthetic.instruction_world.INSTRUCTION_WORDS)")
        return None

    def _check_images(self, images: Tensor) -> None:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W] in [0, 1], got {tuple(images.shape)}")
        m = 2 * self.vae_scale_factor
        H, W = images.shape[2:]
        if H % m or W % m:
            raise ValueError(f"{self.MODEL_NAME} needs image sides divisible by {m} (VAE factor x 2x2 packing), got "
                             f"{H}x{W}: resize with core.io.image_io.resize_to_multiple(image, {m}) (and the mask alike)")
        lo, hi = float(images.min()), float(images.max())
        if not (lo >= -1e-3 and hi <= 1 + 1e-3):
            raise ValueError(f"images must be floats in [0, 1], got values in [{lo:.3g}, {hi:.3g}]")

    def _vae_latents(self, pixels: Tensor) -> Tensor:
        """Pixels in [-1, 1] -> the VAE posterior's mode, shifted and scaled as the pipelines do (float32)."""
        vae = self.pipe.vae
        z = vae.encode(pixels.to(vae.dtype)).latent_dist.mode()
        return ((z - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor).float()

    def _guidance(self, batch: int) -> Tensor | None:
        return None if self.guidance is None else torch.full((batch,), self.guidance, device=self.device)

    def _text_ids(self, seq: Tensor) -> Tensor:
        return packing.text_ids(seq.shape[1], device=seq.device, dtype=seq.dtype)

    def _source_appended_condition(self, images: Tensor, seq: Tensor, pooled: Tensor | None, *,
                                   ids_dtype: torch.dtype = torch.float32, **fields) -> Condition:
        """Instruction editing (Kontext, Qwen-Image-Edit): the source's packed latents are both the
        conditioning tokens appended to the sequence (position ids with first coordinate SOURCE_ID) and
        `x0_known`; no mask, so the blend mask is all ones. `fields`: guidance, extra."""
        source = self._vae_latents(images * 2 - 1)
        h, w = source.shape[-2:]
        tokens = packing.pack(source)
        ids = packing.image_ids(h, w, device=images.device, dtype=ids_dtype)
        source_ids = ids.clone()
        source_ids[:, 0] = SOURCE_ID
        B, L, _ = tokens.shape
        return Condition(
            prompt_embeds=seq, pooled=pooled, cond_latents=tokens, x0_known=tokens,
            blend_mask=torch.ones(B, L, 1, device=images.device, dtype=tokens.dtype),
            img_ids=torch.cat([ids, source_ids], dim=0), text_ids=self._text_ids(seq),
            latent_hw=(h, w), image_hw=tuple(images.shape[2:]), **fields)

    def decode(self, x0: Tensor, cond) -> Tensor:
        """Packed clean latents [B, L, C] -> images [B, 3, H, W] in [0, 1] (differentiable)."""
        vae = self.pipe.vae
        z = packing.unpack(x0, *cond.latent_hw) / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        image = vae.decode(z.to(vae.dtype), return_dict=False)[0]
        return (image.float() / 2 + 0.5).clamp(0, 1)

    # -- reference policy and persistence -------------------------------------------------------
    def save_lora_weights(self, directory: str | os.PathLike, weights: Mapping[str, Tensor] | None = None,
                          state_dict: Mapping[str, Tensor] | None = None) -> None:
        """Write the adapter (or the adapter weight set `weights`) in diffusers' LoRA format
        (the pipeline's `load_lora_weights` reads it). `state_dict`: the model's (adapter) tensors,
        whole, to write instead of reading the modules (a sharded model gathers them first)."""
        from peft.utils import get_peft_model_state_dict

        if not self.has_lora:
            raise ValueError("this policy has no LoRA adapter to save; use save_pretrained for a full model")
        with swapped_weights(self.model, weights) if weights is not None else contextlib.nullcontext():
            state = {k: v.detach().cpu().clone() for k, v in
                     get_peft_model_state_dict(self.model, state_dict=state_dict, adapter_name=ADAPTER).items()}
        config = self.model.peft_config[ADAPTER].to_dict()
        config["target_modules"] = sorted(config["target_modules"])
        self.PIPELINE_CLASS.save_lora_weights(directory, transformer_lora_layers=state,
                                              transformer_lora_adapter_metadata=config)

    def load_lora_weights(self, directory: str | os.PathLike) -> None:
        """Load a LoRA saved by `save_lora_weights` (or diffusers) into this policy's adapter, in
        place (optimisers keep their parameters); without an adapter, add one from the file's config."""
        from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

        if not Path(directory).exists():
            raise FileNotFoundError(f"LoRA directory {directory} does not exist")
        pipeline = self.PIPELINE_CLASS
        state, metadata = pipeline.lora_state_dict(directory, return_lora_metadata=True)
        prefix = pipeline.transformer_name + "."
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

    def save_pretrained(self, directory: str | os.PathLike, *, transformer_only: bool = False,
                        transformer_state: Mapping[str, Tensor] | None = None) -> None:
        """A pipeline directory (PIPELINE_CLASS.from_pretrained loads it) with the (LoRA-merged)
        transformer; `transformer_only` writes just transformer/ (load it with
        from_pretrained(base, transformer=...)). `transformer_state`: the transformer's whole state dict
        to write instead of reading its modules (a model sharded by FSDP2 gathers it first; full
        fine-tunes only)."""
        with quiet_weights_io():
            self._save_pretrained(Path(directory), transformer_only, transformer_state)

    def _save_pretrained(self, root: Path, transformer_only: bool,
                         transformer_state: Mapping[str, Tensor] | None = None) -> None:
        from huggingface_hub import save_torch_state_dict

        target = root / "transformer"
        target.mkdir(parents=True, exist_ok=True)
        if transformer_state is not None:
            if self.has_lora:
                raise ValueError("transformer_state is for a full fine-tune; a LoRA policy saves its adapter "
                                 "(save_lora_weights(state_dict=...)) or merges it from its own modules")
            self.model.save_config(target)
            # FSDP2's fully_shard gives the module a generated class (FSDPFluxTransformer2DModel): name the
            # class the pipeline registered, so that diffusers loads the directory as it would the model's own
            config = json.loads((target / "config.json").read_text())
            config["_class_name"] = self.pipe.config["transformer"][1]
            (target / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            save_torch_state_dict(dict(transformer_state), target,
                                  filename_pattern="diffusion_pytorch_model{suffix}.safetensors", max_shard_size="10GB")
        elif self.has_lora:
            self.model.save_config(target)
            save_torch_state_dict(merged_state_dict(self.model, ADAPTER), target,
                                  filename_pattern="diffusion_pytorch_model{suffix}.safetensors",
                                  max_shard_size="10GB")
        else:
            self.model.save_pretrained(target)
        if transformer_only:
            return
        for name in self.FRAME_COMPONENTS:
            getattr(self.pipe, name).save_pretrained(root / name)
        self.pipe.save_config(root)
        if self.toy_spec is not None:
            (root / "toy_flux.json").write_text(self.toy_spec)


__all__ = ["ADAPTER", "CPU_ATTENTION_BACKENDS", "FRAME_COMPONENTS", "FluxPolicyBase", "check_attention_backend",
           "quiet_weights_io", "resolve_model_path"]
