"""Activation memory of one FluxTransformer2DModel (or QwenImageTransformer2DModel) forward with
gradients, as a formula.

The formula counts the tensors autograd keeps for the backward pass, read op by op from diffusers'
FluxTransformerBlock / FluxSingleTransformerBlock / FluxAttnProcessor (diffusers 0.42):

- which inputs a Linear keeps depends on what is trained: with a full fine-tune every Linear keeps
  its input (for its weight's gradient); with LoRA only the adapted Linears do, through the
  adapter (peft casts the input to the adapter's dtype first, one copy per adapted Linear, so
  bf16 models with float32 adapters keep float32 copies), plus the rank-r hidden of each adapter;
- the AdaLN modulation `norm(x) * (1 + scale) + shift` and the gates keep the normalised /
  gated tensor only when the modulation weights train (full fine-tune);
- attention keeps q, k, v, the output and the log-sum-exp (flash / memory-efficient kernels, no
  L x L matrix: an `eager` / math attention would keep B x heads x L^2 more);
- the q/k RMSNorms keep their input: on CUDA aten's fused kernel keeps it in the model dtype;
  elsewhere (the CPU, where the test measures) the composite keeps float32 copies.

With gradient checkpointing (diffusers: torch.utils.checkpoint, non-reentrant) each block keeps
only its inputs, and the backward recomputes one block at a time. Per-sample tensors (time and
guidance embeddings, modulation vectors: B x 6 x width) are left out: they are ~1/tokens of the rest.
tests/rl/test_plan.py checks `saved_bytes` against the bytes a real forward keeps, and
tests/rl/test_plan_qwen.py for Qwen-Image's blocks (FluxDims.from_config says what differs).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import torch

_FP32 = 4  # bytes of the float32 statistics (LayerNorm mean/rstd, RMSNorm rstd, attention log-sum-exp)


@dataclasses.dataclass(frozen=True)
class FluxDims:
    """The transformer sizes the formula needs (from its config.json)."""

    width: int                 # heads x head_dim
    heads: int
    head_dim: int
    mlp_hidden: int            # 4 x width in FLUX (diffusers' mlp_ratio)
    double_blocks: int
    single_blocks: int
    in_channels: int
    text_width: int            # joint_attention_dim: the text encoder's output width
    #: the double blocks' MLP modules (image stream, text stream): FLUX's ff / ff_context,
    #: Qwen-Image's img_mlp / txt_mlp (LoRA targets are matched against these names)
    mlp_names: tuple[str, str] = ("ff", "ff_context")
    #: rotary tables per token: FLUX keeps float32 cos and sin (2 x head_dim x 4 B), Qwen-Image one
    #: complex64 table of head_dim / 2 entries (head_dim x 4 B)
    rope_bytes_per_token: int = 0
    #: rotary tables of fixed size: Qwen-Image's positive and negative frequencies for 4096 positions
    rope_fixed_bytes: int = 0

    @classmethod
    def from_config(cls, config: Mapping[str, Any], class_name: str = "FluxTransformer2DModel") -> FluxDims:
        """The sizes of a FluxTransformer2DModel, or of a QwenImageTransformer2DModel: the same
        dual-stream block op for op (LayerNorm, AdaLN modulation, joint attention with q/k RMSNorm,
        gate, LayerNorm, modulation, GELU-tanh MLP of 4 x width, gate; diffusers 0.42), all of them
        dual-stream (no single blocks), an RMSNorm on the text input and complex rotary tables."""
        heads, head_dim = int(config["num_attention_heads"]), int(config["attention_head_dim"])
        width = heads * head_dim
        common = dict(width=width, heads=heads, head_dim=head_dim, mlp_hidden=int(width * 4.0),
                      double_blocks=int(config["num_layers"]), in_channels=int(config["in_channels"]),
                      text_width=int(config["joint_attention_dim"]))
        if class_name == "QwenImageTransformer2DModel":
            axes = sum(config.get("axes_dims_rope", (16, 56, 56)))
            return cls(**common, single_blocks=0, mlp_names=("img_mlp", "txt_mlp"),
                       rope_bytes_per_token=head_dim * 4, rope_fixed_bytes=2 * 4096 * (axes // 2) * 8)
        return cls(**common, single_blocks=int(config["num_single_layers"]), rope_bytes_per_token=2 * head_dim * _FP32)


@dataclasses.dataclass(frozen=True)
class Training:
    """What takes gradients: every weight (full fine-tune) or LoRA adapters on named Linears."""

    lora_targets: frozenset[str] | None = None   # None = full fine-tune
    lora_rank: int = 0
    adapter_dtype: torch.dtype = torch.float32   # the policy keeps adapters in float32

    @property
    def full(self) -> bool:
        return self.lora_targets is None

    def adapted(self, local_name: str) -> bool:
        """Does a LoRA target name this Linear (peft matches a target as the name or its suffix)?"""
        return not self.full and any(local_name == t or local_name.endswith("." + t) for t in self.lora_targets)


@dataclasses.dataclass(frozen=True)
class Batch:
    """One forward pass: its size, its tokens and how it runs."""

    batch: int
    image_tokens: int
    text_tokens: int
    dtype: torch.dtype
    gradient_checkpointing: bool = False
    fused_rms_norm: bool = True   # CUDA: aten's fused RMSNorm; False = the composite (CPU)

    @property
    def tokens(self) -> int:
        return self.image_tokens + self.text_tokens


def _linear_inputs(width: int, names: Iterable[str], training: Training, e: int, dtype: torch.dtype) -> int:
    """Bytes per token kept for the input of Linears that share it (q/k/v; proj_mlp with them)."""
    names = list(names)
    if training.full:
        return width * e
    adapted = [n for n in names if training.adapted(n)]
    if not adapted:
        return 0  # frozen Linears keep only their weight (a parameter, counted elsewhere)
    a = training.adapter_dtype.itemsize
    hidden = len(adapted) * training.lora_rank * a
    if training.adapter_dtype == dtype:
        return width * e + hidden     # one shared input
    return len(adapted) * width * a + hidden  # peft casts the input once per adapted Linear


def _rms_norm(dims: FluxDims, training: Training, batch: Batch, e: int) -> int:
    """Bytes per token of one q or k RMSNorm (over head_dim, weight shared by the heads)."""
    rstd = dims.heads * _FP32
    if batch.fused_rms_norm:
        return dims.width * e + rstd
    # composite: pow keeps the float32 input; the weight's gradient also needs the normalised value
    return dims.width * _FP32 * (2 if training.full else 1) + rstd


def _attention(dims: FluxDims, e: int) -> int:
    """Bytes per token of the joint attention: q, k, v, output, log-sum-exp."""
    return 4 * dims.width * e + dims.heads * _FP32


def double_stream_bytes(dims: FluxDims, training: Training, batch: Batch, text: bool) -> int:
    """Bytes per token of one stream (image or text) of a double block, attention excluded."""
    e = batch.dtype.itemsize
    D, F, full = dims.width, dims.mlp_hidden, training.full
    qkv = ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj") if text else ("attn.to_q", "attn.to_k", "attn.to_v")
    out = "attn.to_add_out" if text else "attn.to_out.0"
    ff = dims.mlp_names[1] if text else dims.mlp_names[0]
    total = D * e + 2 * _FP32                                   # norm1: LayerNorm input and statistics
    total += D * e if full else 0                               # modulation keeps the normalised x
    total += _linear_inputs(D, qkv, training, e, batch.dtype)   # q, k, v projections
    total += 2 * _rms_norm(dims, training, batch, e)            # q and k norms
    total += _linear_inputs(D, [out], training, e, batch.dtype)  # attention output projection
    total += D * e if full else 0                               # gate_msa * attention output
    total += D * e + 2 * _FP32                                  # norm2
    total += D * e if full else 0                               # modulation
    total += _linear_inputs(D, [f"{ff}.net.0.proj"], training, e, batch.dtype)
    total += F * e                                              # GELU keeps its input
    total += _linear_inputs(F, [f"{ff}.net.2"], training, e, batch.dtype)
    total += D * e if full else 0                               # gate_mlp * ff output
    if text and batch.dtype == torch.float16:
        total += D * e                                          # clip(-65504, 65504) keeps its input
    return total


def single_block_bytes_per_token(dims: FluxDims, training: Training, batch: Batch) -> int:
    """Bytes per (joint) token of a single-stream block."""
    e = batch.dtype.itemsize
    D, F, full = dims.width, dims.mlp_hidden, training.full
    total = D * e + 2 * _FP32                                   # LayerNorm of the concatenated stream
    total += D * e if full else 0                               # modulation
    total += _linear_inputs(D, ["proj_mlp", "attn.to_q", "attn.to_k", "attn.to_v"], training, e, batch.dtype)
    total += F * e                                              # GELU of the MLP branch
    total += 2 * _rms_norm(dims, training, batch, e)
    total += _attention(dims, e)
    total += _linear_inputs(D + F, ["proj_out"], training, e, batch.dtype)  # [attention | MLP] -> width
    total += D * e if full else 0                               # gate * proj_out
    if batch.dtype == torch.float16:
        total += D * e
    return total


def double_block_bytes(dims: FluxDims, training: Training, batch: Batch) -> int:
    """Bytes one double-stream block keeps for the whole batch."""
    e = batch.dtype.itemsize
    per_sample = (batch.image_tokens * double_stream_bytes(dims, training, batch, text=False)
                  + batch.text_tokens * double_stream_bytes(dims, training, batch, text=True)
                  + batch.tokens * _attention(dims, e))
    return batch.batch * per_sample


def single_block_bytes(dims: FluxDims, training: Training, batch: Batch) -> int:
    return batch.batch * batch.tokens * single_block_bytes_per_token(dims, training, batch)


def outside_block_bytes(dims: FluxDims, training: Training, batch: Batch) -> int:
    """Embedders, the output norm and projection, and the rotary tables."""
    e = batch.dtype.itemsize
    B, Li, Lt, D = batch.batch, batch.image_tokens, batch.text_tokens, dims.width
    total = B * Li * _linear_inputs(dims.in_channels, ["x_embedder"], training, e, batch.dtype)
    total += B * Lt * _linear_inputs(dims.text_width, ["context_embedder"], training, e, batch.dtype)
    # norm_out reads the image tokens: in FLUX a slice of the last single block's joint output (the
    # whole stays kept), in Qwen-Image (no single blocks) the image stream alone
    total += B * (batch.tokens if dims.single_blocks else Li) * D * e + B * Li * 2 * _FP32
    total += B * Li * D * e if training.full else 0            # its modulation
    total += B * Li * _linear_inputs(D, ["proj_out"], training, e, batch.dtype)
    total += batch.tokens * dims.rope_bytes_per_token + dims.rope_fixed_bytes  # rotary tables, shared by every block
    return total


def saved_bytes(dims: FluxDims, training: Training, batch: Batch) -> int:
    """Bytes the forward leaves alive for the backward: the saved tensors (inputs included) and,
    with checkpointing, what each checkpoint holds instead."""
    if batch.gradient_checkpointing:
        e = batch.dtype.itemsize
        # each checkpointed block keeps its inputs: the image and text streams (B x L x width)
        blocks = (dims.double_blocks + dims.single_blocks) * batch.batch * batch.tokens * dims.width * e
        return blocks + outside_block_bytes(dims, training, batch)
    return (dims.double_blocks * double_block_bytes(dims, training, batch)
            + dims.single_blocks * single_block_bytes(dims, training, batch)
            + outside_block_bytes(dims, training, batch))


def backward_working_bytes(dims: FluxDims, training: Training, batch: Batch) -> int:
    """An estimate of what the backward adds on top of `saved_bytes`: with checkpointing, one
    block recomputed (its saved tensors); always, the gradients in flight through one block
    (~2 x (width + MLP width) per token). With the gradients it errs high: the test checks that
    saved + working + gradients lies between 0.9x and 1.5x a measured forward-and-backward peak."""
    e = batch.dtype.itemsize
    in_flight = 2 * batch.batch * batch.tokens * (dims.width + dims.mlp_hidden) * e
    if not batch.gradient_checkpointing:
        return in_flight
    no_ckpt = dataclasses.replace(batch, gradient_checkpointing=False)
    return in_flight + max(double_block_bytes(dims, training, no_ckpt), single_block_bytes(dims, training, no_ckpt))


def no_grad_peak_bytes(dims: FluxDims, n_images: int, image_tokens: int, text_tokens: int, dtype: torch.dtype) -> int:
    """An estimate of the transient peak of a forward without gradients (rollouts, the old and
    reference policies' velocities): the tensors alive at once inside one single-stream block
    (residual input, modulated input, q/k/v and attention output, the MLP branch and the
    concatenation: ~6 x width + 2 x MLP width per token, plus the float32 rotary temporaries of q
    and k), and the rotary tables of fixed size (Qwen-Image's). A Qwen-Image dual-stream block holds
    about as much per token. The tests check it within 25% of a measured peak."""
    e = dtype.itemsize
    D, F = dims.width, dims.mlp_hidden
    return n_images * (image_tokens + text_tokens) * ((6 * D + 2 * F) * e + 2 * D * _FP32) + dims.rope_fixed_bytes
