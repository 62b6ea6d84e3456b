"""Size-versus-speed measurements for the toy FLUX's VAE and transformer (CPU, 64x64 images).

    python -m core.toy_flux.measure [--threads 1 2] [--batch 48] [--reps 5] [--only vae|transformer|text]

Times are medians of `reps` runs after one warm-up run, in seconds, for one batch of `batch`
images; every case runs at each thread count in `--threads` (torch.set_num_threads). Columns *_s
are wall time, *_cpu_s the process's CPU time (all threads). On a shared machine, compare rows
of one run, and prefer the CPU time at one thread.
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence

import torch

from core.toy_flux.build import (
    ToyFluxSpec,
    TransformerSpec,
    VAESpec,
    build_vae,
    rope_axes,
)

#: VAE candidates: (name, spec). Scale factor 4 needs 3 levels, 8 needs 4.
VAE_CANDIDATES: tuple[tuple[str, VAESpec], ...] = (
    ("f4 c8 32-64-64", VAESpec(block_out_channels=(32, 64, 64), latent_channels=8)),
    ("f4 c8 16-32-64", VAESpec(block_out_channels=(16, 32, 64), latent_channels=8)),
    ("f4 c8 8-32-64", VAESpec(block_out_channels=(8, 32, 64), latent_channels=8)),
    ("f4 c8 8-16-32", VAESpec(block_out_channels=(8, 16, 32), latent_channels=8)),
    ("f4 c4 16-32-64", VAESpec(block_out_channels=(16, 32, 64), latent_channels=4)),
    ("f4 c16 16-32-64", VAESpec(block_out_channels=(16, 32, 64), latent_channels=16)),
    ("f8 c16 16-32-64-64", VAESpec(block_out_channels=(16, 32, 64, 64), latent_channels=16)),
)
#: transformer candidates: (name, spec)
TRANSFORMER_CANDIDATES: tuple[tuple[str, TransformerSpec], ...] = (
    ("1+1 x 3x32", TransformerSpec(num_layers=1, num_single_layers=1, num_attention_heads=3, attention_head_dim=32)),
    ("1+2 x 3x32", TransformerSpec(num_layers=1, num_single_layers=2, num_attention_heads=3, attention_head_dim=32)),
    ("2+4 x 4x32", TransformerSpec(num_layers=2, num_single_layers=4, num_attention_heads=4, attention_head_dim=32)),
)


def median_time(fn: Callable[[], object], reps: int = 5, warmup: int = 1) -> tuple[float, float]:
    """(wall, CPU) seconds of `fn()`: medians over `reps` runs after `warmup` untimed runs.

    CPU time is the process's, all threads summed: on a machine shared with other jobs it is the
    steadier number (at one thread it is the uncontended wall time); wall time includes waiting."""
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    for _ in range(reps):
        w, c = time.perf_counter(), time.process_time()
        fn()
        cpu.append(time.process_time() - c)
        wall.append(time.perf_counter() - w)
    return statistics.median(wall), statistics.median(cpu)


def _timed(name: str, fn: Callable[[], object], reps: int) -> dict[str, float]:
    wall, cpu = median_time(fn, reps)
    return {f"{name}_s": wall, f"{name}_cpu_s": cpu}


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def measure_vae(spec: VAESpec, *, batch: int = 48, size: int = 64, reps: int = 5) -> dict[str, float]:
    """Encode (posterior mode) and decode of `batch` images without gradients, and the decode a
    ReFL update back-propagates through (gradients to the latents, VAE weights frozen)."""
    vae = build_vae(spec, image_size=size).eval().requires_grad_(False)
    x = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        z0 = vae.encode(x).latent_dist.mode()

    @torch.no_grad()
    def encode():
        return vae.encode(x).latent_dist.mode()

    @torch.no_grad()
    def decode():
        return vae.decode(z0).sample

    def decode_backward():
        z = z0.clone().requires_grad_(True)
        vae.decode(z).sample.square().mean().backward()

    return {"params": count(vae), "encoder_params": count(vae.encoder), "decoder_params": count(vae.decoder),
            "latent": f"{spec.latent_channels}x{size // spec.scale_factor}x{size // spec.scale_factor}",
            **_timed("enc", encode, reps), **_timed("dec", decode, reps),
            **_timed("dec_fwd_bwd", decode_backward, reps)}


def measure_transformer(spec: TransformerSpec, *, vae: VAESpec = VAESpec(), batch: int = 48, size: int = 64,
                        text_len: int = 16, text_dim: int = 64, reps: int = 5) -> dict[str, float]:
    """A no-grad forward and a full forward+backward (every weight trained) of the Fill
    transformer for `batch` images, with `text_len` text tokens."""
    from diffusers import FluxTransformer2DModel

    toy = ToyFluxSpec(image_size=size, vae=vae)
    in_ch, out_ch = toy.transformer_channels
    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=in_ch, out_channels=out_ch, num_layers=spec.num_layers,
        num_single_layers=spec.num_single_layers, attention_head_dim=spec.attention_head_dim,
        num_attention_heads=spec.num_attention_heads, joint_attention_dim=text_dim, pooled_projection_dim=text_dim,
        guidance_embeds=True, axes_dims_rope=tuple(spec.axes_dims_rope or rope_axes(spec.attention_head_dim)))
    from core.policies import packing

    L = toy.image_seq_len
    side = size // vae.scale_factor
    g = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(batch, L, in_ch, generator=g), timestep=torch.rand(batch, generator=g),
                  guidance=torch.full((batch,), 30.0), pooled_projections=torch.randn(batch, text_dim, generator=g),
                  encoder_hidden_states=torch.randn(batch, text_len, text_dim, generator=g),
                  txt_ids=packing.text_ids(text_len), img_ids=packing.image_ids(side, side), return_dict=False)

    @torch.no_grad()
    def forward():
        return model(**inputs)[0]

    def forward_backward():
        model.zero_grad(set_to_none=True)
        model(**inputs)[0].square().mean().backward()

    return {"params": count(model), "tokens": f"{L}+{text_len}", "in/out": f"{in_ch}/{out_ch}",
            **_timed("fwd", forward, reps), **_timed("fwd_bwd", forward_backward, reps)}


def measure_text_encoders(spec: ToyFluxSpec = ToyFluxSpec(), *, batch: int = 48, reps: int = 5) -> dict[str, float]:
    """FluxFillPipeline.encode_prompt (CLIP pooled + T5 sequence) for `batch` world prompts:
    FluxFillPolicy runs it in every `encode` (it keeps no prompt cache)."""
    from core.synthetic.world import SyntheticWorld
    from core.toy_flux.build import build_toy_pipeline

    pipe = build_toy_pipeline(spec)
    world = SyntheticWorld()
    prompts = [world.sample(("fill", "extend", "removal", "text")[i % 4], i).prompt for i in range(batch)]

    def encode():
        with torch.no_grad():
            pipe.encode_prompt(prompt=prompts, prompt_2=None, max_sequence_length=spec.t5.max_length)

    return {"clip_params": count(pipe.text_encoder), "t5_params": count(pipe.text_encoder_2),
            **_timed("encode_prompt", encode, reps)}


def _table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3f}"
        if isinstance(v, int) and v >= 10_000:
            return f"{v / 1e6:.2f}M"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch", type=int, default=48)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--only", choices=["vae", "transformer", "text"], default=None)
    args = parser.parse_args(argv)
    previous = torch.get_num_threads()
    try:
        if args.only in (None, "vae"):
            rows = []
            for name, spec in VAE_CANDIDATES:
                for n in args.threads:
                    torch.set_num_threads(n)
                    rows.append({"vae": name, "threads": n, **measure_vae(spec, batch=args.batch, reps=args.reps)})
            print(f"VAE, {args.batch} images 64x64 (seconds per batch)")
            print(_table(rows, ["vae", "threads", "params", "encoder_params", "decoder_params", "latent",
                                "enc_s", "enc_cpu_s", "dec_s", "dec_cpu_s", "dec_fwd_bwd_s", "dec_fwd_bwd_cpu_s"]))
        if args.only in (None, "transformer"):
            rows = []
            for name, spec in TRANSFORMER_CANDIDATES:
                for n in args.threads:
                    torch.set_num_threads(n)
                    rows.append({"transformer": name, "threads": n,
                                 **measure_transformer(spec, batch=args.batch, reps=args.reps)})
            print(f"\nFill transformer for the default VAE (f4 c8), {args.batch} images (seconds per batch)")
            print(_table(rows, ["transformer", "threads", "params", "tokens", "in/out", "fwd_s", "fwd_cpu_s",
                                "fwd_bwd_s", "fwd_bwd_cpu_s"]))
        if args.only in (None, "text"):
            rows = []
            for n in args.threads:
                torch.set_num_threads(n)
                rows.append({"threads": n, **measure_text_encoders(batch=args.batch, reps=args.reps)})
            print(f"\nCLIP + T5 prompt encoding, {args.batch} prompts (seconds per batch)")
            print(_table(rows, ["threads", "clip_params", "t5_params", "encode_prompt_s", "encode_prompt_cpu_s"]))
    finally:
        torch.set_num_threads(previous)


if __name__ == "__main__":
    main()
