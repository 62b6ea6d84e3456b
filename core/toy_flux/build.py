"""A genuine diffusers `FluxFillPipeline` at toy size, built from a small spec (no downloads).

Every component is the class FLUX.1 Fill [dev] uses, only smaller: AutoencoderKL, CLIPTextModel +
CLIPTokenizer, T5EncoderModel + T5TokenizerFast, FluxTransformer2DModel (Fill's channel-concat
conditioning, guidance-distilled like Fill [dev]) and FlowMatchEulerDiscreteScheduler with FLUX's
dynamic shifting. So `FluxFillPipeline.from_pretrained(dir)` loads it and diffusers' own call
runs it, and `core.policies.flux_fill.FluxFillPolicy` trains it like the real model.

Shapes tie together as in FLUX: with VAE scale factor f (2 ** (levels - 1)) and c latent
channels, a token packs 2x2 latents (4c channels) and the Fill transformer reads
noisy | masked-image latents | mask folded f x f and packed: in = 4c + 4c + 4 f^2, out = 4c;
joint_attention_dim = T5's d_model; pooled_projection_dim = CLIP's hidden size (FLUX pools CLIP's
un-projected output).

Scheduler (our choice for 64x64 toy images): FLUX's curve moved to the toy's token counts.
FLUX interpolates mu from base_shift at 256 tokens (512 px) to max_shift at 4096 (1024 px);
here base_image_seq_len = the tokens of a native-size image (64 for 64x64 and f = 4) and
max_image_seq_len = 16x that (256x256 images), the same 16x span; base_shift = ln(3), so the
native size samples with shift 3 by default (rl.pretrain re-anchors it at the shift that
evaluation on a validation world picks), and max_shift = base_shift + 0.65, FLUX's span.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxFillPipeline,
    FluxKontextPipeline,
    FluxTransformer2DModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from core.config.schema import opt
from core.synthetic.world import VOCABULARY
from core.toy_flux.tokenizers import (
    DEFAULT_MAX_LENGTH,
    build_clip_tokenizer,
    build_t5_tokenizer,
)

SPEC_FILE = "toy_flux.json"
#: the pipeline classes a toy can be, by ToyFluxSpec.pipeline
PIPELINES = {"fill": FluxFillPipeline, "kontext": FluxKontextPipeline}
#: FLUX's spans of the dynamic shift: max/base image tokens (4096 / 256) and max - base shift
FLUX_SEQ_LEN_RATIO = 16
FLUX_SHIFT_SPAN = 1.15 - 0.5


@dataclasses.dataclass(frozen=True)
class VAESpec:
    """AutoencoderKL: one level per entry of `block_out_channels`; scale factor 2 ** (levels - 1).

    `scaling_factor` / `shift_factor` map latents to roughly unit scale ((z - shift) * scale, as
    FLUX); a fresh VAE has 1 / 0, training fits them (vae_training.fit_latent_scaling)."""

    block_out_channels: tuple[int, ...] = opt((16, 32, 64), "channels of each level (full resolution first)")
    latent_channels: int = opt(8, "channels of the latent")
    layers_per_block: int = opt(1, "ResNet blocks per level")
    norm_num_groups: int = opt(8, "GroupNorm groups (divides every level's channels)")
    mid_block_attention: bool = opt(False, "self-attention in the middle block")
    scaling_factor: float = opt(1.0, "latent scale ((z - shift) * scale); training fits it")
    shift_factor: float = opt(0.0, "latent shift; training fits it")

    @property
    def scale_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def of(cls, vae: AutoencoderKL) -> VAESpec:
        """The spec of a built (e.g. trained) VAE, with its fitted latent scaling."""
        c = vae.config
        return cls(block_out_channels=tuple(c.block_out_channels), latent_channels=c.latent_channels,
                   layers_per_block=c.layers_per_block, norm_num_groups=c.norm_num_groups,
                   mid_block_attention=c.mid_block_add_attention, scaling_factor=c.scaling_factor,
                   shift_factor=c.shift_factor)


@dataclasses.dataclass(frozen=True)
class ClipSpec:
    """CLIPTextModel: its pooled output is FLUX's pooled projection input."""

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 2
    intermediate_size: int = 128
    max_length: int = DEFAULT_MAX_LENGTH


@dataclasses.dataclass(frozen=True)
class T5Spec:
    """T5EncoderModel (v1.1's gated-GELU feed-forward, as FLUX's T5-XXL); its last hidden state is
    the joint-attention text sequence. `max_length` is tokenizer_2.model_max_length: the
    `max_sequence_length` the pipeline must be called with."""

    d_model: int = 64
    num_layers: int = 2
    num_heads: int = 2
    d_ff: int = 128
    relative_attention_num_buckets: int = 8
    max_length: int = DEFAULT_MAX_LENGTH


@dataclasses.dataclass(frozen=True)
class TransformerSpec:
    """FluxTransformer2DModel: `num_layers` double-stream and `num_single_layers` single-stream
    blocks of `num_attention_heads` x `attention_head_dim`; rope axes default to `rope_axes`."""

    num_layers: int = opt(2, "double-stream (text | image) blocks")
    num_single_layers: int = opt(4, "single-stream blocks")
    num_attention_heads: int = opt(4, "attention heads")
    attention_head_dim: int = opt(32, "width of a head (a multiple of 4, >= 12)")
    axes_dims_rope: tuple[int, int, int] | None = opt(None, "rope dims per position axis (null: rope_axes)")


@dataclasses.dataclass(frozen=True)
class SchedulerSpec:
    """FLUX's dynamic shift (see the module doc): `shift` = e^base_shift at the native size."""

    shift: float = 3.0
    shift_span: float = FLUX_SHIFT_SPAN
    seq_len_ratio: int = FLUX_SEQ_LEN_RATIO


@dataclasses.dataclass(frozen=True)
class ToyFluxSpec:
    """Everything `build_toy_pipeline` needs; `seed` fixes every random initialisation."""

    image_size: int = 64
    vae: VAESpec = VAESpec()
    clip: ClipSpec = ClipSpec()
    t5: T5Spec = T5Spec()
    transformer: TransformerSpec = TransformerSpec()
    scheduler: SchedulerSpec = SchedulerSpec()
    seed: int = 0
    #: "fill": a FluxFillPipeline over the world's words; "kontext": a FluxKontextPipeline (instruction
    #: editing: source tokens appended, no mask) whose tokenizers also know INSTRUCTION_WORDS
    pipeline: str = "fill"

    def __post_init__(self) -> None:
        if self.pipeline not in PIPELINES:
            raise ValueError(f"toy pipeline {self.pipeline!r}: expected one of {list(PIPELINES)}")

    @property
    def transformer_channels(self) -> tuple[int, int]:
        """(in, out) channels of the transformer for this VAE: FLUX Fill's noisy | masked-image |
        folded-mask tokens, or Kontext's packed latents alone (source tokens join the sequence)."""
        c, f = self.vae.latent_channels, self.vae.scale_factor
        if self.pipeline == "kontext":
            return 4 * c, 4 * c
        return 8 * c + 4 * f * f, 4 * c

    @property
    def vocabulary(self) -> list[str]:
        """The words its tokenizers keep whole and its text encoders were trained on."""
        if self.pipeline == "kontext":
            from core.synthetic.instruction_world import INSTRUCTION_VOCABULARY

            return INSTRUCTION_VOCABULARY
        return VOCABULARY

    @property
    def image_seq_len(self) -> int:
        """Packed image tokens of a native-size image."""
        return (self.image_size // (2 * self.vae.scale_factor)) ** 2

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ToyFluxSpec:
        """The inverse of `to_dict` (JSON lists become tuples); unknown keys are errors."""
        parts = {"vae": VAESpec, "clip": ClipSpec, "t5": T5Spec, "transformer": TransformerSpec,
                 "scheduler": SchedulerSpec}
        kwargs = {}
        for key, value in data.items():
            if key in parts:
                value = parts[key](**{k: tuple(v) if isinstance(v, list) else v for k, v in value.items()})
            kwargs[key] = value
        return cls(**kwargs)


def rope_axes(head_dim: int) -> tuple[int, int, int]:
    """Rope dimensions for FLUX's three position axes, summing to `head_dim`. FLUX gives the
    first axis (always 0 for images and text alike) an eighth, 16 of 128; here at least 4, and the
    rows and columns split the rest evenly (each axis must be even)."""
    if head_dim < 12 or head_dim % 4:
        raise ValueError(f"attention_head_dim must be a multiple of 4 and >= 12 for three rope axes, got {head_dim}")
    first = max(4, head_dim // 8 // 2 * 2)
    side = (head_dim - first) // 2
    if side % 2:
        first, side = first + 2, side - 1
    return first, side, side


def check_spec(spec: ToyFluxSpec) -> None:
    """Raise ValueError for a spec whose parts do not fit together."""
    v, t = spec.vae, spec.transformer
    if not v.block_out_channels or any(ch % v.norm_num_groups for ch in v.block_out_channels):
        raise ValueError(f"VAE block_out_channels {v.block_out_channels} must all be divisible by "
                         f"norm_num_groups {v.norm_num_groups}")
    if spec.image_size % (2 * v.scale_factor):
        raise ValueError(f"image_size {spec.image_size} must be divisible by {2 * v.scale_factor} "
                         f"(VAE factor {v.scale_factor} x 2x2 packing)")
    axes = t.axes_dims_rope or rope_axes(t.attention_head_dim)
    if sum(axes) != t.attention_head_dim or any(a % 2 for a in axes):
        raise ValueError(f"axes_dims_rope {axes} must be even and sum to attention_head_dim {t.attention_head_dim}")
    for name, width, heads in (("clip", spec.clip.hidden_size, spec.clip.num_heads),
                               ("t5", spec.t5.d_model, spec.t5.num_heads)):
        if width % heads:
            raise ValueError(f"{name} width {width} is not divisible by its {heads} heads")
    if not spec.scheduler.shift > 0:
        raise ValueError(f"scheduler shift must be > 0, got {spec.scheduler.shift}")


def _component_seed(seed: int, name: str) -> int:
    # one seed per component: resizing one part leaves the others' initial weights unchanged
    return int.from_bytes(hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=8).digest(), "little") & (2**62 - 1)


def build_vae(spec: VAESpec, *, image_size: int = 64, seed: int = 0) -> AutoencoderKL:
    """A randomly initialised AutoencoderKL of `spec` (FLUX's VAE has no quant convs either)."""
    levels = len(spec.block_out_channels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_component_seed(seed, "vae"))
        return AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * levels,
            up_block_types=("UpDecoderBlock2D",) * levels, block_out_channels=tuple(spec.block_out_channels),
            layers_per_block=spec.layers_per_block, latent_channels=spec.latent_channels,
            norm_num_groups=spec.norm_num_groups, sample_size=image_size,
            scaling_factor=float(spec.scaling_factor), shift_factor=float(spec.shift_factor),
            use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=spec.mid_block_attention,
            force_upcast=False)


def build_scheduler(spec: ToyFluxSpec) -> FlowMatchEulerDiscreteScheduler:
    """FLUX's scheduler config moved to the toy's token counts (module doc)."""
    s = spec.scheduler
    base = spec.image_seq_len
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=float(s.shift), use_dynamic_shifting=True,
        base_shift=math.log(s.shift), max_shift=math.log(s.shift) + s.shift_span,
        base_image_seq_len=base, max_image_seq_len=base * s.seq_len_ratio)


def build_toy_pipeline(spec: ToyFluxSpec = ToyFluxSpec(), *, vae: AutoencoderKL | None = None):
    """A randomly initialised FluxFillPipeline (or FluxKontextPipeline: `spec.pipeline`) of `spec`; `vae` replaces the fresh VAE (e.g. one
    trained by core.toy_flux.vae_training) and must have `spec.vae`'s latent channels and levels."""
    check_spec(spec)
    if vae is None:
        vae = build_vae(spec.vae, image_size=spec.image_size, seed=spec.seed)
    elif (vae.config.latent_channels != spec.vae.latent_channels
          or len(vae.config.block_out_channels) != len(spec.vae.block_out_channels)):
        raise ValueError(f"the given VAE has {vae.config.latent_channels} latent channels and "
                         f"{len(vae.config.block_out_channels)} levels; the spec asks for "
                         f"{spec.vae.latent_channels} and {len(spec.vae.block_out_channels)}")
    clip_tok = build_clip_tokenizer(spec.vocabulary, max_length=spec.clip.max_length)
    t5_tok = build_t5_tokenizer(spec.vocabulary, max_length=spec.t5.max_length)
    c, t5, tr = spec.clip, spec.t5, spec.transformer
    in_ch, out_ch = spec.transformer_channels
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_component_seed(spec.seed, "clip"))
        clip = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(clip_tok), hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
            num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, max_position_embeddings=c.max_length,
            projection_dim=c.hidden_size, bos_token_id=clip_tok.bos_token_id, eos_token_id=clip_tok.eos_token_id,
            pad_token_id=clip_tok.pad_token_id))
        torch.manual_seed(_component_seed(spec.seed, "t5"))
        t5_model = T5EncoderModel(T5Config(
            vocab_size=len(t5_tok), d_model=t5.d_model, d_ff=t5.d_ff, d_kv=t5.d_model // t5.num_heads,
            num_layers=t5.num_layers, num_heads=t5.num_heads, feed_forward_proj="gated-gelu",
            relative_attention_num_buckets=t5.relative_attention_num_buckets,
            relative_attention_max_distance=max(2 * t5.max_length, 16), dropout_rate=0.0,
            pad_token_id=t5_tok.pad_token_id, eos_token_id=t5_tok.eos_token_id, is_encoder_decoder=False))
        torch.manual_seed(_component_seed(spec.seed, "transformer"))
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=in_ch, out_channels=out_ch, num_layers=tr.num_layers,
            num_single_layers=tr.num_single_layers, attention_head_dim=tr.attention_head_dim,
            num_attention_heads=tr.num_attention_heads, joint_attention_dim=t5.d_model,
            pooled_projection_dim=c.hidden_size, guidance_embeds=True,
            axes_dims_rope=tuple(tr.axes_dims_rope or rope_axes(tr.attention_head_dim)))
    for module in (vae, clip, t5_model, transformer):
        module.eval()
    return PIPELINES[spec.pipeline](scheduler=build_scheduler(spec), vae=vae, text_encoder=clip, tokenizer=clip_tok,
                            text_encoder_2=t5_model, tokenizer_2=t5_tok, transformer=transformer)


def save_toy_pipeline(pipe, directory: str | os.PathLike, spec: ToyFluxSpec) -> Path:
    """`pipe.save_pretrained(directory)` plus the spec as toy_flux.json (the pipeline's loader
    ignores that file; it records how the directory was built)."""
    from core.policies.flux_base import quiet_weights_io

    root = Path(directory)
    with quiet_weights_io():
        pipe.save_pretrained(root)
    for config in root.glob("*/config.json"):
        # a component loaded from disk records where it came from: a path of this machine, not the model's
        data = json.loads(config.read_text())
        if data.pop("_name_or_path", None) is not None:
            config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    (root / SPEC_FILE).write_text(json.dumps(spec.to_dict(), indent=2) + "\n")
    return root


def parameter_counts(pipe: FluxFillPipeline) -> dict[str, int]:
    """Parameters per model component."""
    return {name: sum(p.numel() for p in getattr(pipe, name).parameters())
            for name in ("vae", "text_encoder", "text_encoder_2", "transformer")}


__all__ = [
    "ClipSpec",
    "SchedulerSpec",
    "T5Spec",
    "ToyFluxSpec",
    "TransformerSpec",
    "VAESpec",
    "build_scheduler",
    "build_toy_pipeline",
    "build_vae",
    "check_spec",
    "parameter_counts",
    "rope_axes",
    "save_toy_pipeline",
]
