"""Train the toy FLUX.1 Fill's editor (transformer + both text encoders) on the synthetic world,
through `core.policies.flux_fill.FluxFillPolicy`, resumably and exactly.

    python -m core.toy_flux.editor_training OUT --vae VAE_DIR [--set steps=N] [--stop-after N]

Flow matching in FLUX Fill's packed latent layout, with a frozen VAE (trained first by
core.toy_flux.vae_training): x0 = packed, scaled VAE latents of the target; the condition is what
FluxFillPolicy.encode makes of (source, mask, prompt) — masked-image latents, folded mask, T5
sequence and CLIP pooled vector, guidance 30 (the constant FluxFillPolicy feeds FLUX.1 Fill [dev]);
x_t = (1 - t) x0 + t eps, loss = weighted MSE(v_pred, eps - x0).

- t: logit-normal(0, 1) with a 10% uniform share: most samples mid-path, where the velocity is
  hardest to predict, the uniform share keeps the ends trained (a sampler's first step is t = 1).
  No shift is baked in; the sampler's is chosen afterwards by evaluation.
- Weighting: tokens of the blend mask (latents that touch the edit mask) weigh 1, the rest
  `known_weight`: the sampler overwrites them with the re-noised source at every step. Each
  sample is normalised by its own weight sum, so small masks (text) are not drowned.
- The text encoders train jointly (the pipeline's CLIP and T5 start random); prompts are encoded
  with `FluxFillPipeline.encode_prompt`, as the pipeline and the policy do, but with gradients.
- Tasks are drawn with `task_weights`: text and fill (drawing glyphs and shapes) get more.
- Batches and noise are pure functions of (seed, step): a run cut into pieces by `--stop-after`
  ends bit-identical (CPU) to one run. The state (weights, EMA, AdamW, step, config, history) is
  a core.toy_flux.state checkpoint in OUT/checkpoint.

Held-out evaluation (EMA weights, the world's "heldout" split) samples edits with FluxFillPolicy
and core.sampling.samplers exactly as RL will (dpm2, 8 steps, mask blend, the scheduler's shift) and
reports core.synthetic.metrics' ground truth per task. At the last step, OUT/model is a FluxFillPipeline
directory with the EMA weights (`FluxFillPipeline.from_pretrained` loads it).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL
from torch import Tensor

from core.config.cli import config_parser, parse_config
from core.config.loading import ConfigError, from_dict
from core.config.schema import UNIT, Range, at_least, check_ranges, opt, section
from core.policies import packing
from core.policies.flux_fill import FluxFillPolicy
from core.sampling.samplers import sample_policy
from core.synthetic.metrics import ground_truth_metrics, summarize
from core.synthetic.world import SyntheticWorld, collate
from core.tasks import TASKS
from core.toy_flux.build import (
    ToyFluxSpec,
    TransformerSpec,
    VAESpec,
    build_toy_pipeline,
    save_toy_pipeline,
)
from core.toy_flux.state import find_checkpoint, load_state, save_checkpoint
from core.toy_flux.steps import step_seed, warmup_cosine

CHECKPOINT = "checkpoint"
HISTORY = "history.json"
MODEL = "model"
UNIFORM_T_SHARE = 0.1
#: config fields a resumed run may change without touching the weights' trajectory before the
#: current step (a new `steps` re-times the cosine from here on)
FREE_ON_RESUME: tuple[str, ...] = ("steps", "eval_every", "eval_per_task", "checkpoint_every")
#: trained components of the pipeline, by their FluxFillPipeline attribute
TRAINED = ("transformer", "text_encoder", "text_encoder_2")


@dataclasses.dataclass(frozen=True)
class EditorTrainConfig:
    """Hyper-parameters of `train_editor`; all but FREE_ON_RESUME must match on resume."""

    transformer: TransformerSpec = section(TransformerSpec, "the FluxTransformer2DModel's shape")
    steps: int = opt(6000, "optimiser steps")
    batch_size: int = opt(32, "edits per step")
    lr: float = opt(1e-3, "peak AdamW learning rate")
    warmup: int = opt(300, "linear warm-up steps")
    min_lr_ratio: float = opt(0.05, "the cosine's final rate, as a share of lr")
    weight_decay: float = opt(0.01, "AdamW weight decay of matrices (norms and biases get none)")
    grad_clip: float = opt(1.0, "largest gradient norm")
    ema_decay: float = opt(0.999, "EMA decay of the saved weights (ramped up from 0.1 early on)")
    known_weight: float = opt(0.1, "loss weight of latents outside the blend mask")
    task_weights: tuple[float, float, float, float] = opt((0.3, 0.15, 0.15, 0.4),
                                                          "how often a step draws fill, extend, removal, text")
    world_seed: int = opt(0, "seed of the synthetic world")
    seed: int = opt(0, "seed of initialisation, data and noise")
    eval_every: int = opt(500, "held-out evaluation every N steps (0 = only at the end)")
    eval_per_task: int = opt(32, "held-out samples per task in the periodic evaluation")
    eval_steps: int = opt(8, "sampler steps of the evaluation (dpm2, mask blend)")
    checkpoint_every: int = opt(250, "checkpoint every N steps (and at the end of every piece)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)



#: allowed values of every number (core.config.schema.check_ranges names the key on a violation)
RANGES: dict[str, Range] = {
    "transformer.num_layers": at_least(0), "transformer.num_single_layers": at_least(0),
    "transformer.num_attention_heads": at_least(1), "transformer.attention_head_dim": at_least(12),
    "transformer.axes_dims_rope": at_least(2),
    "steps": at_least(1), "batch_size": at_least(1), "lr": Range(0, 1, open_lo=True), "warmup": at_least(0),
    "min_lr_ratio": UNIT, "weight_decay": UNIT, "grad_clip": Range(0, None, open_lo=True),
    "ema_decay": Range(0, 1, open_hi=True, note="1 would freeze the saved weights"),
    "known_weight": at_least(0, "the generated region weighs 1"), "task_weights": at_least(0),
    "world_seed": at_least(0), "seed": at_least(0), "eval_every": at_least(0), "eval_per_task": at_least(1),
    "eval_steps": Range(1, 1000), "checkpoint_every": at_least(0),
}


def learning_rate(cfg: EditorTrainConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to `min_lr_ratio * lr` at `cfg.steps`."""
    return warmup_cosine(step, lr=cfg.lr, warmup=cfg.warmup, steps=cfg.steps, min_lr_ratio=cfg.min_lr_ratio)


def sample_times(n: int, generator: torch.Generator) -> Tensor:
    """Logit-normal(0, 1) times with a uniform share (module doc)."""
    t = torch.sigmoid(torch.randn(n, generator=generator))
    uniform = torch.rand(n, generator=generator)
    pick = torch.rand(n, generator=generator) < UNIFORM_T_SHARE
    return torch.where(pick, uniform, t)


def training_batch(cfg: EditorTrainConfig, step: int, world: SyntheticWorld):
    """The collated world samples of training step `step` (a pure function of the step)."""
    rng = random.Random(step_seed(cfg.seed, "editor-data", step))
    tasks = rng.choices(TASKS, weights=cfg.task_weights, k=cfg.batch_size)
    return collate([world.sample(task, rng.randrange(2**31), "train") for task in tasks])


def trained_parameters(policy: FluxFillPolicy) -> dict[str, torch.nn.Parameter]:
    """Every trained tensor, named `<component>.<parameter>`."""
    return {f"{name}.{n}": p for name in TRAINED for n, p in getattr(policy.pipe, name).named_parameters()}


def flow_matching_loss(policy: FluxFillPolicy, batch, generator: torch.Generator, known_weight: float) -> Tensor:
    """Per-sample weighted velocity MSE [B] for one collated batch (gradients reach the text encoders)."""
    with torch.no_grad():
        cond = policy.encode(batch.images, batch.masks, batch.prompts)
        x0 = packing.pack(policy._vae_latents(batch.targets.to(policy.device) * 2 - 1))
    seq, pooled, _ = policy.pipe.encode_prompt(prompt=list(batch.prompts), prompt_2=None, device=policy.device,
                                               max_sequence_length=policy.max_sequence_length)
    cond = dataclasses.replace(cond, prompt_embeds=seq, pooled=pooled)
    eps = torch.randn(x0.shape, generator=generator).to(x0.device)
    t = sample_times(x0.shape[0], generator).to(x0.device)
    x_t = (1 - t[:, None, None]) * x0 + t[:, None, None] * eps
    v = policy.velocity(x_t, t, cond)
    w = cond.blend_mask + known_weight * (1 - cond.blend_mask)
    return (w * (v - (eps - x0)) ** 2).sum((1, 2)) / w.sum((1, 2))


@contextlib.contextmanager
def weights_of(params: dict[str, torch.nn.Parameter], values: dict[str, Tensor]) -> Iterator[None]:
    """Run with `values` copied into `params` (e.g. the EMA), restoring the live weights after."""
    live = {n: p.detach().clone() for n, p in params.items()}
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(values[n])
    try:
        yield
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(live[n])


@torch.no_grad()
def sample_edits(policy: FluxFillPolicy, batch, *, steps: int = 8, shift: float | None = None,
                 method: str = "dpm2", generator: torch.Generator | None = None) -> Tensor:
    """Edited images [B, 3, H, W] as RL samples them: mask blend, the policy's schedule (or a
    static `shift`)."""
    cond = policy.encode(batch.images, batch.masks, batch.prompts)
    x0 = sample_policy(policy, cond, sigmas=policy.schedule(steps, shift), method=method, blend=True,
                       generator=generator)
    return policy.decode(x0, cond)


def evaluate_editor(policy: FluxFillPolicy, world: SyntheticWorld, *, per_task: int, steps: int = 8,
                    shift: float | None = None, seed: int = 1234, chunk: int = 64
                    ) -> tuple[dict[str, dict[str, float]], dict[str, Tensor]]:
    """Held-out ground-truth metrics (means per task) and the edited images per task."""
    generator = torch.Generator().manual_seed(seed)
    summary, images = {}, {}
    for task in TASKS:
        samples = world.held_out(task, per_task)
        edited = torch.cat([sample_edits(policy, collate(samples[i:i + chunk]), steps=steps, shift=shift,
                                         generator=generator).cpu() for i in range(0, len(samples), chunk)])
        summary[task] = summarize(ground_truth_metrics(samples, edited))[task]
        images[task] = edited
    return summary, images


def build_policy(vae_dir: str | Path, cfg: EditorTrainConfig) -> tuple[FluxFillPolicy, ToyFluxSpec]:
    """A freshly initialised toy pipeline around the trained VAE in `vae_dir` (whose sample size is
    the image size), as a policy."""
    vae = AutoencoderKL.from_pretrained(vae_dir)
    image_size = int(vae.config.sample_size)
    spec = ToyFluxSpec(image_size=image_size, transformer=cfg.transformer, seed=cfg.seed, vae=VAESpec.of(vae))
    pipe = build_toy_pipeline(spec, vae=vae)
    policy = FluxFillPolicy(pipe, max_sequence_length=pipe.tokenizer_2.model_max_length, image_size=image_size)
    return policy, spec


def _eval_line(entry: dict[str, Any]) -> str:
    ev = entry["eval"]
    keys = {"fill": ("shape_acc", "colour_acc", "psnr_mask"), "extend": ("psnr_mask",),
            "removal": ("psnr_mask",), "text": ("glyph_acc", "psnr_mask")}
    parts = [f"{t} " + " ".join(f"{k} {ev[t][k]:.3f}" for k in ks if k in ev.get(t, {})) for t, ks in keys.items()]
    return f"step {entry['step']}: " + "; ".join(parts)


@dataclasses.dataclass
class Recipe:
    """What one pretraining run of an editor is made of; `run_training` is the loop they share
    (the Fill editor here, the instruction editor in core.toy_flux.instruction_training).

    `batch(step)` and `loss(batch, generator)` give a step's data and per-sample loss [B];
    `evaluate()` the held-out summary (run with the EMA weights); `fingerprint` is what a resumed
    checkpoint must have been trained on besides the config (e.g. the VAE's latent scale);
    `save(directory)` writes the finished model (EMA weights loaded)."""

    policy: Any
    params: dict[str, torch.nn.Parameter]
    batch: Any
    loss: Any
    evaluate: Any
    save: Any
    fingerprint: Any
    eval_line: Any = None


def run_training(out: Path, cfg: Any, recipe: Recipe, *, stop_after: int | None = None, progress: bool = True,
                 desc: str = "editor") -> dict[str, Any]:
    """The resumable, exact pretraining loop (module doc) of any `Recipe`; `cfg` has the fields of
    EditorTrainConfig's optimisation part (steps, lr, warmup, ..., checkpoint_every) and to_dict().
    Returns {"step", "ran", "done", "history", "policy"}."""
    from tqdm.auto import tqdm

    out.mkdir(parents=True, exist_ok=True)
    params = recipe.params
    decay = [p for p in params.values() if p.dim() >= 2]
    no_decay = [p for p in params.values() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    ema = {n: p.detach().clone() for n, p in params.items()}
    step, history, smoothed = 0, [], None
    found = find_checkpoint(out / CHECKPOINT)
    if found is not None:
        state = load_state(found)
        saved = from_dict(type(cfg), state["config"])
        free = {k: getattr(cfg, k) for k in FREE_ON_RESUME}
        if dataclasses.replace(saved, **free) != cfg:
            changed = [k for k in cfg.to_dict() if k not in free and getattr(saved, k) != getattr(cfg, k)]
            raise ValueError(f"{out} was trained with another config (differs in {changed}); use a new directory")
        if state["vae"] != recipe.fingerprint:
            raise ValueError(f"{out} was trained on another base (its VAE latent scale differs)")
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(state["params"][n])
                ema[n].copy_(state["ema"][n])
        optimizer.load_state_dict(state["optimizer"])
        step, history, smoothed = int(state["step"]), list(state["history"]), state["smoothed"]

    def checkpoint() -> None:
        save_checkpoint({"step": step, "config": cfg.to_dict(), "vae": recipe.fingerprint,
                         "params": {n: p.detach() for n, p in params.items()}, "ema": ema,
                         "optimizer": optimizer.state_dict(), "history": history, "smoothed": smoothed},
                        out / CHECKPOINT)

    def set_training(on: bool) -> None:
        for p in params.values():
            p.requires_grad_(on)
        for name in TRAINED:
            getattr(recipe.policy.pipe, name).train(on)

    start = step
    end = cfg.steps if stop_after is None else min(cfg.steps, step + stop_after)
    set_training(True)
    bar = tqdm(total=cfg.steps, initial=step, desc=desc, disable=not progress, dynamic_ncols=True, mininterval=2.0)
    try:
        while step < end:
            lr = learning_rate(cfg, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = recipe.batch(step)
            generator = torch.Generator().manual_seed(step_seed(cfg.seed, "editor-noise", step))
            loss = recipe.loss(batch, generator).mean()
            if not torch.isfinite(loss):
                raise RuntimeError(f"non-finite loss at step {step}: lower lr (--set lr=...) and resume "
                                   "from the last checkpoint in a new directory")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.grad_clip)
            optimizer.step()
            with torch.no_grad():
                d = min(cfg.ema_decay, (1 + step) / (10 + step))
                for n, p in params.items():
                    ema[n].lerp_(p.detach(), 1 - d)
            step += 1
            bar.update(1)
            smoothed = loss.item() if smoothed is None else 0.98 * smoothed + 0.02 * loss.item()
            bar.set_postfix(loss=f"{smoothed:.4f}", lr=f"{lr:.2e}", refresh=False)
            if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps:
                set_training(False)
                with weights_of(params, ema):
                    summary = recipe.evaluate()
                set_training(True)
                history.append({"step": step, "loss": smoothed, "time": time.time(), "eval": summary})
                bar.write((recipe.eval_line or _eval_line)(history[-1]), file=sys.stdout)
            if step < end and cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                checkpoint()
    finally:
        bar.close()
    checkpoint()
    (out / HISTORY).write_text(json.dumps(history, indent=1) + "\n")
    set_training(False)
    done = step >= cfg.steps
    if done:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(ema[n])
        recipe.save(out / MODEL)
    return {"step": step, "ran": step - start, "done": done, "history": history, "policy": recipe.policy}


def train_editor(out: str | Path, vae_dir: str | Path, cfg: EditorTrainConfig = EditorTrainConfig(), *,
                 stop_after: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Train (or resume training) the editor in `out`; returns {"step", "ran" (steps run now), "done", "history", "policy"}.

    `stop_after`: at most this many steps in this call, then checkpoint and return. When
    `cfg.steps` is reached, the EMA weights are saved as a pipeline in `out`/model.
    """
    policy, spec = build_policy(vae_dir, cfg)
    world = SyntheticWorld(size=spec.image_size, seed=cfg.world_seed)
    recipe = Recipe(
        policy=policy, params=trained_parameters(policy),
        batch=lambda step: training_batch(cfg, step, world),
        loss=lambda batch, generator: flow_matching_loss(policy, batch, generator, cfg.known_weight),
        evaluate=lambda: evaluate_editor(policy, world, per_task=cfg.eval_per_task, steps=cfg.eval_steps)[0],
        save=lambda directory: save_toy_pipeline(policy.pipe, directory, spec),
        fingerprint=policy.pipe.vae.config.scaling_factor)
    return run_training(Path(out), cfg, recipe, stop_after=stop_after, progress=progress)


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m core.toy_flux.editor_training OUT --vae DIR [--set KEY=VALUE ...] [--stop-after N]`."""
    parser = config_parser("python -m core.toy_flux.editor_training", __doc__.split("\n\n")[0], EditorTrainConfig,
                           ranges=RANGES, example="steps=6000")
    parser.add_argument("out", help="run directory (resumed when it holds a checkpoint)")
    parser.add_argument("--vae", required=True, help="the trained AutoencoderKL directory (vae_training's OUT/vae)")
    parser.add_argument("--stop-after", type=int, default=None, metavar="N",
                        help="run at most N steps now, then checkpoint (resume by running again)")
    args, cfg = parse_config(parser, EditorTrainConfig, list(argv) if argv is not None else None)
    try:
        check_ranges(cfg, RANGES, "core/toy_flux/editor_training.py RANGES")
    except ConfigError as e:
        parser.exit(2, f"{parser.prog}: config error: {e}\n")
    if not (Path(args.vae) / "config.json").is_file():
        parser.exit(2, f"{parser.prog}: --vae {args.vae} has no config.json: train the VAE first "
                       "(python -m core.toy_flux.vae_training OUT; it saves OUT/vae at its last step)\n")
    result = train_editor(args.out, args.vae, cfg, stop_after=args.stop_after)
    print(f"step {result['step']}/{cfg.steps}" + (f"; model saved to {Path(args.out) / MODEL}" if result["done"] else ""))


if __name__ == "__main__":
    main()
