"""Train the toy instruction editor — a FLUX.1 Kontext-style pipeline (source tokens appended to the
sequence, no mask) — on the instruction world, warm-started from the built-in Fill editor.

    python -m core.toy_flux.instruction_training OUT [--base core/assets/toy_flux] [--set steps=N] [--stop-after N]

Edit-R1 post-trains instruction editors (FLUX.1 Kontext, Qwen-Image-Edit); this is the toy one, so
that its recipe can be run and checked against ground truth on a laptop. What is trained, and why
it starts from the Fill toy rather than from noise:

- the VAE is the Fill toy's, frozen (latents, scale and shift unchanged);
- the tokenizers are rebuilt over core.synthetic.instruction_world.INSTRUCTION_VOCABULARY (the world's words
  plus "make", "remove", "add", "top", ...). Every token both vocabularies share (the world's words,
  bytes, characters) keeps its trained embedding row in CLIP and T5, found by the token's string;
  the new words start from the fresh model's random rows;
- the transformer is the Fill transformer with Kontext's input: x_embedder keeps the columns of the
  noisy latents (the first 4c of Fill's 4c + 4c + 4f^2) and drops the masked-image and mask ones.
  Every block is kept. What it must learn anew is to find the edit from the words and to copy the
  source through attention to the appended tokens (position ids with first coordinate 1);
- loss: flow matching as core.toy_flux.editor_training's (its time sampling, EMA, schedule), the
  target's packed latents as x0, tokens that touch the region that should change (the sample's
  ground-truth mask, never an input) weighted 1 and the rest `keep_weight`: most of an instruction
  edit is copying, and copying is easy once learned, so the loss would otherwise be spent on it.

Runs are resumable and exact (core.toy_flux.editor_training.run_training, the same loop). At the
last step OUT/model is a FluxKontextPipeline directory (`FluxKontextPipeline.from_pretrained` and
core.policies.flux_kontext.FluxKontextPolicy load it), with toy_flux.json saying pipeline "kontext".
Held-out evaluation samples as RL does (dpm2, `eval_steps`, the scheduler's shift) and reports
core.synthetic.metrics' instruction metrics per task.
"""
from __future__ import annotations

import dataclasses
import json
import random
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import FluxFillPipeline
from torch import Tensor

from core.config.cli import config_parser, parse_config
from core.config.loading import ConfigError
from core.config.schema import Range, at_least, check_ranges, opt
from core.policies import packing
from core.policies.flux_base import quiet_weights_io
from core.policies.flux_kontext import FluxKontextPolicy
from core.sampling.samplers import sample_policy
from core.synthetic.instruction_world import InstructionWorld
from core.synthetic.metrics import ground_truth_metrics, summarize
from core.synthetic.world import collate
from core.tasks import INSTRUCTION_TASKS
from core.toy_flux.build import (
    SPEC_FILE,
    ToyFluxSpec,
    build_toy_pipeline,
    save_toy_pipeline,
)
from core.toy_flux.editor_training import (
    MODEL,
    TRAINED,
    Recipe,
    run_training,
    sample_times,
)
from core.toy_flux.editor_training import RANGES as EDITOR_RANGES
from core.toy_flux.steps import step_seed

#: what each task's evaluation line shows (core.synthetic.metrics' instruction metrics)
SHOWN = {"recolour": ("colour_acc", "psnr_keep"), "remove_named": ("residue", "psnr_mask", "psnr_keep"),
         "add": ("shape_acc", "colour_acc", "position_acc", "psnr_keep"), "retext": ("glyph_acc", "psnr_keep"),
         "restyle": ("style_acc", "psnr_keep")}
DEFAULT_BASE = Path(__file__).resolve().parent.parent / "assets" / "toy_flux"


@dataclasses.dataclass(frozen=True)
class InstructionTrainConfig:
    """Hyper-parameters of `train_instruction_editor`; all but the loop's FREE_ON_RESUME must match on resume."""

    steps: int = opt(5000, "optimiser steps")
    batch_size: int = opt(32, "edits per step")
    lr: float = opt(5e-4, "peak AdamW learning rate (a warm start: half the Fill editor's)")
    warmup: int = opt(200, "linear warm-up steps")
    min_lr_ratio: float = opt(0.05, "the cosine's final rate, as a share of lr")
    weight_decay: float = opt(0.01, "AdamW weight decay of matrices (norms and biases get none)")
    grad_clip: float = opt(1.0, "largest gradient norm")
    ema_decay: float = opt(0.998, "EMA decay of the saved weights (ramped up from 0.1 early on)")
    keep_weight: float = opt(0.25, "loss weight of tokens away from the region that should change")
    task_weights: tuple[float, float, float, float, float] = opt(
        (0.2, 0.2, 0.25, 0.2, 0.15), "how often a step draws recolour, remove_named, add, retext, restyle")
    world_seed: int = opt(0, "seed of the instruction world (its train split is used)")
    seed: int = opt(0, "seed of data and noise (and of the new tokens' rows)")
    eval_every: int = opt(500, "held-out evaluation every N steps (0 = only at the end)")
    eval_per_task: int = opt(24, "held-out samples per task in the periodic evaluation")
    eval_steps: int = opt(8, "sampler steps of the evaluation (dpm2)")
    checkpoint_every: int = opt(100, "checkpoint every N steps (and at the end of every piece)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


#: the optimisation keys' ranges are the Fill editor's (the same loop reads them)
RANGES: dict[str, Range] = {
    **{k: v for k, v in EDITOR_RANGES.items() if k in InstructionTrainConfig.__dataclass_fields__},
    "keep_weight": at_least(0, "the region that should change weighs 1"), "task_weights": at_least(0),
}


def _copy_rows(new: torch.nn.Embedding, old: torch.nn.Embedding, new_vocab: dict[str, int],
               old_vocab: dict[str, int]) -> int:
    """Copy `old`'s row of every token string both vocabularies hold; returns how many."""
    shared = [(new_vocab[tok], i) for tok, i in old_vocab.items() if tok in new_vocab]
    with torch.no_grad():
        for j, i in shared:
            new.weight[j] = old.weight[i]
    return len(shared)


def kontext_from_fill(base: str | Path, *, seed: int = 0):
    """A toy FluxKontextPipeline warm-started from the toy Fill pipeline in `base` (module doc);
    returns (pipeline, spec)."""
    base = Path(base)
    if not (base / SPEC_FILE).is_file():
        raise FileNotFoundError(f"{base} holds no toy Fill pipeline ({SPEC_FILE} missing): give the built-in "
                                "editor's directory (core/assets/toy_flux) or one `python -m rl.pretrain` wrote")
    fill_spec = ToyFluxSpec.from_dict(json.loads((base / SPEC_FILE).read_text()))
    if fill_spec.pipeline != "fill":
        raise ValueError(f"{base} is a toy {fill_spec.pipeline!r} pipeline; the warm start takes a Fill one")
    with quiet_weights_io():
        fill = FluxFillPipeline.from_pretrained(base)
    spec = dataclasses.replace(fill_spec, pipeline="kontext", seed=seed)
    pipe = build_toy_pipeline(spec, vae=fill.vae)
    state = fill.transformer.state_dict()
    width = spec.transformer_channels[0]
    state["x_embedder.weight"] = state["x_embedder.weight"][:, :width]  # the noisy latents' columns come first
    pipe.transformer.load_state_dict(state)
    for enc, tok in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
        new_enc, old_enc = getattr(pipe, enc), getattr(fill, enc)
        new_emb, old_emb = new_enc.get_input_embeddings(), old_enc.get_input_embeddings()
        rest = {k: v for k, v in old_enc.state_dict().items() if v.data_ptr() != old_emb.weight.data_ptr()}
        new_enc.load_state_dict(rest, strict=False)
        _copy_rows(new_emb, old_emb, getattr(pipe, tok).get_vocab(), getattr(fill, tok).get_vocab())
    return pipe, spec


def build_instruction_policy(base: str | Path, cfg: InstructionTrainConfig) -> tuple[FluxKontextPolicy, ToyFluxSpec]:
    pipe, spec = kontext_from_fill(base, seed=cfg.seed)
    policy = FluxKontextPolicy(pipe, max_sequence_length=pipe.tokenizer_2.model_max_length, image_size=spec.image_size)
    return policy, spec


def training_batch(cfg: InstructionTrainConfig, step: int, world: InstructionWorld):
    """The collated instruction samples of training step `step` (a pure function of the step)."""
    rng = random.Random(step_seed(cfg.seed, "instruction-data", step))
    tasks = rng.choices(INSTRUCTION_TASKS, weights=cfg.task_weights, k=cfg.batch_size)
    return collate([world.sample(task, rng.randrange(2**31), "train") for task in tasks])


def token_mask(masks: Tensor, policy: FluxKontextPolicy) -> Tensor:
    """[B, 1, H, W] pixel masks -> [B, L, 1]: 1 for packed tokens whose 2f x 2f pixels touch the mask."""
    k = 2 * policy.vae_scale_factor
    pooled = F.max_pool2d(masks.float(), kernel_size=k, stride=k)
    return pooled.flatten(2).transpose(1, 2)


def instruction_loss(policy: FluxKontextPolicy, batch, generator: torch.Generator, keep_weight: float) -> Tensor:
    """Per-sample weighted velocity MSE [B] (gradients reach the text encoders)."""
    device = policy.device
    with torch.no_grad():
        cond = policy.encode(batch.images, None, batch.prompts)
        x0 = packing.pack(policy._vae_latents(batch.targets.to(device) * 2 - 1))
    seq, pooled, _ = policy.pipe.encode_prompt(prompt=list(batch.prompts), prompt_2=None, device=device,
                                               max_sequence_length=policy.max_sequence_length)
    cond = dataclasses.replace(cond, prompt_embeds=seq, pooled=pooled)
    eps = torch.randn(x0.shape, generator=generator).to(device)
    t = sample_times(x0.shape[0], generator).to(device)
    x_t = (1 - t[:, None, None]) * x0 + t[:, None, None] * eps
    v = policy.velocity(x_t, t, cond)
    edit = token_mask(batch.masks.to(device), policy)
    w = edit + keep_weight * (1 - edit)
    return (w * (v - (eps - x0)) ** 2).sum((1, 2)) / w.sum((1, 2))


@torch.no_grad()
def sample_instruction_edits(policy: FluxKontextPolicy, batch, *, steps: int = 8, method: str = "dpm2",
                             generator: torch.Generator | None = None) -> Tensor:
    """Edited images [B, 3, H, W] as RL samples them (the policy's schedule)."""
    cond = policy.encode(batch.images, None, batch.prompts)
    x0 = sample_policy(policy, cond, sigmas=policy.schedule(steps), method=method, generator=generator)
    return policy.decode(x0, cond)


def evaluate_instruction_editor(policy: FluxKontextPolicy, world: InstructionWorld, *, per_task: int,
                                steps: int = 8, seed: int = 1234, chunk: int = 64
                                ) -> tuple[dict[str, dict[str, float]], dict[str, Tensor]]:
    """Held-out ground-truth metrics (means per task) and the edited images per task."""
    generator = torch.Generator().manual_seed(seed)
    summary, images = {}, {}
    for task in INSTRUCTION_TASKS:
        samples = world.held_out(task, per_task)
        edited = torch.cat([sample_instruction_edits(policy, collate(samples[i:i + chunk]), steps=steps,
                                                     generator=generator).cpu()
                            for i in range(0, len(samples), chunk)])
        summary[task] = summarize(ground_truth_metrics(samples, edited))[task]
        images[task] = edited
    return summary, images


def eval_line(entry: dict[str, Any]) -> str:
    ev = entry["eval"]
    parts = [f"{t} " + " ".join(f"{k} {ev[t][k]:.3f}" for k in ks if k in ev.get(t, {})) for t, ks in SHOWN.items()]
    return f"step {entry['step']}: " + "; ".join(parts)


def train_instruction_editor(out: str | Path, base: str | Path = DEFAULT_BASE,
                             cfg: InstructionTrainConfig = InstructionTrainConfig(), *,
                             stop_after: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Train (or resume) the toy instruction editor in `out` from the Fill toy in `base`; returns
    run_training's dict. At `cfg.steps`, OUT/model is the FluxKontextPipeline (EMA weights)."""
    policy, spec = build_instruction_policy(base, cfg)
    world = InstructionWorld(size=spec.image_size, seed=cfg.world_seed)
    params = {f"{name}.{n}": p for name in TRAINED for n, p in getattr(policy.pipe, name).named_parameters()}
    recipe = Recipe(
        policy=policy, params=params,
        batch=lambda step: training_batch(cfg, step, world),
        loss=lambda batch, generator: instruction_loss(policy, batch, generator, cfg.keep_weight),
        evaluate=lambda: evaluate_instruction_editor(policy, world, per_task=cfg.eval_per_task,
                                                     steps=cfg.eval_steps)[0],
        save=lambda directory: save_toy_pipeline(policy.pipe, directory, spec),
        fingerprint=policy.pipe.vae.config.scaling_factor, eval_line=eval_line)
    return run_training(Path(out), cfg, recipe, stop_after=stop_after, progress=progress, desc="instruction editor")


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m core.toy_flux.instruction_training OUT [--base DIR] [--set KEY=VALUE ...] [--stop-after N]`."""
    parser = config_parser("python -m core.toy_flux.instruction_training", __doc__.split("\n\n")[0],
                           InstructionTrainConfig, ranges=RANGES, example="steps=4000")
    parser.add_argument("out", help="run directory (resumed when it holds a checkpoint)")
    parser.add_argument("--base", default=str(DEFAULT_BASE), help="the toy Fill pipeline to warm-start from "
                        "(default: the built-in editor)")
    parser.add_argument("--stop-after", type=int, default=None, metavar="N",
                        help="run at most N steps now, then checkpoint (resume by running again)")
    args, cfg = parse_config(parser, InstructionTrainConfig, list(argv) if argv is not None else None)
    try:
        check_ranges(cfg, RANGES, "core/toy_flux/instruction_training.py RANGES")
    except ConfigError as e:
        parser.exit(2, f"{parser.prog}: config error: {e}\n")
    if not (Path(args.base) / SPEC_FILE).is_file():
        parser.exit(2, f"{parser.prog}: --base {args.base} holds no toy Fill pipeline ({SPEC_FILE} missing)\n")
    result = train_instruction_editor(args.out, args.base, cfg, stop_after=args.stop_after)
    print(f"step {result['step']}/{cfg.steps}" + (f"; model saved to {Path(args.out) / MODEL}" if result["done"] else ""),
          file=sys.stdout)


if __name__ == "__main__":
    main()
