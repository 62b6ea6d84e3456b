"""Train the toy FLUX's AutoencoderKL on the synthetic world's images, resumably and exactly.

    python -m core.toy_flux.vae_training OUT [--set steps=N] [--stop-after N] [--set edge=W] ...

What it learns from: each training image is one of a world sample's target (what the policy's
decode must draw), source, or masked source (the Fill condition the policy encodes: the masked
area grey), drawn from the "train" split with a random task. Batches are a pure function of
(seed, step), so nothing about the data needs saving.

Loss, on pixels in [-1, 1]: l1 |x' - x| + l2 (x' - x)^2 + kl * KL(posterior || N(0, 1)) per
latent element, + edge * |grad x' - grad x| (finite differences: the 2-pixel strokes of the text
task's glyphs are edges, which a pixel loss alone lets a small VAE blur); with mask_weight, the
l1 / l2 terms weigh pixels inside the sample's edit mask (1 + mask_weight) times as much. The decoder reads a
posterior sample, as in VAE training; evaluation and the policy use the posterior mode.

Held-out evaluation (the world's "heldout" split, `eval_per_task` samples per task): PSNR of
the reconstructed ground-truth target over the whole image and inside the edit mask, and for the
text task core.synthetic.metrics' glyph accuracy of the reconstructed target (it must stay ~1.0: the VAE is
the ceiling of every text edit the policy can make).

Resumption: OUT/checkpoint holds weights, AdamW state, the posterior-noise generator, the step,
the config and the evaluation history (core.toy_flux.state: safetensors + JSON). A run stopped
by `stop_after` and resumed ends bit-identical (CPU) to a run without the stop. When the last
step is reached, the latent scaling (FLUX's shift_factor / scaling_factor) is fitted and the VAE
saved with save_pretrained to OUT/vae.
"""
from __future__ import annotations

import dataclasses
import json
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import AutoencoderKL
from torch import Tensor

from core.config.cli import config_parser, parse_config
from core.config.loading import ConfigError, from_dict
from core.config.schema import POSITIVE, Range, at_least, check_ranges, opt, section
from core.synthetic.metrics import sample_metrics
from core.synthetic.world import EditSample, SyntheticWorld
from core.tasks import TASKS
from core.toy_flux.build import VAESpec, build_vae
from core.toy_flux.state import find_checkpoint, load_state, save_checkpoint
from core.toy_flux.steps import step_seed, warmup_cosine

CHECKPOINT = "checkpoint"
HISTORY = "history.json"
#: the kinds of training image and how often each is drawn
IMAGE_KINDS: tuple[str, ...] = ("target", "source", "masked")
#: config fields a resumed run may change: none of them touches the weights' trajectory (with a
#: cosine schedule, a new `steps` stretches the decay from the current step on)
FREE_ON_RESUME: tuple[str, ...] = ("steps", "eval_every", "eval_per_task", "checkpoint_every")


@dataclasses.dataclass(frozen=True)
class VAETrainConfig:
    """Hyper-parameters of `train_vae`; all but FREE_ON_RESUME must match when a run is resumed."""

    vae: VAESpec = section(VAESpec, "the autoencoder's shape")
    steps: int = opt(10000, "optimiser steps (glyph accuracy of reconstructions 0.84 at 6000, docs/toy_flux.md)")
    batch_size: int = opt(16, "images per step")
    lr: float = opt(1e-3, "peak AdamW learning rate")
    warmup: int = opt(100, "linear warm-up steps")
    min_lr_ratio: float = opt(0.1, "the cosine's final rate, as a share of lr")
    schedule: Literal["cosine", "constant"] = opt("cosine", "learning-rate decay after the warm-up")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    grad_clip: float = opt(1.0, "largest gradient norm")
    l1: float = opt(1.0, "weight of |x' - x|")
    l2: float = opt(1.0, "weight of (x' - x)^2")
    kl: float = opt(1e-4, "weight of the posterior's KL to N(0, 1), per latent element")
    # measured: no glyph gain within 800 steps, ~1 dB PSNR lost
    edge: float = opt(0.0, "weight of the finite-difference edge loss")
    mask_weight: float = opt(0.0, "pixels inside the sample's edit mask weigh 1 + this in l1 / l2")
    kind_weights: tuple[float, float, float] = opt((0.5, 0.25, 0.25),
                                                   "how often a training image is a target, source, masked source")
    image_size: int = opt(64, "image side in pixels")
    world_seed: int = opt(0, "seed of the synthetic world")
    seed: int = opt(0, "seed of initialisation, data and posterior noise")
    eval_every: int = opt(250, "held-out evaluation every N steps (0 = only at the end)")
    eval_per_task: int = opt(64, "held-out samples per task")
    checkpoint_every: int = opt(250, "checkpoint every N steps (and at the end of every piece)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)



def masked_source(sample: EditSample) -> Tensor:
    """The Fill condition's pixels: the source with the mask grey (0 in [-1, 1], as the pipeline's
    `image * (1 - mask)` makes it)."""
    return sample.source * (1 - sample.mask) + 0.5 * sample.mask


def training_batch(cfg: VAETrainConfig, step: int, world: SyntheticWorld) -> tuple[Tensor, Tensor]:
    """The images [B, 3, H, W] in [0, 1] of training step `step` and their samples' edit masks
    [B, 1, H, W] (a pure function of the step)."""
    rng = random.Random(step_seed(cfg.seed, "vae-data", step))
    images, masks = [], []
    for _ in range(cfg.batch_size):
        sample = world.sample(rng.choice(TASKS), rng.randrange(2**31), "train")
        kind = rng.choices(IMAGE_KINDS, weights=cfg.kind_weights)[0]
        images.append(sample.target if kind == "target" else sample.source if kind == "source"
                      else masked_source(sample))
        masks.append(sample.mask)
    return torch.stack(images), torch.stack(masks)


def learning_rate(cfg: VAETrainConfig, step: int) -> float:
    """Linear warm-up, then constant or cosine decay to `min_lr_ratio * lr` at `cfg.steps`."""
    return warmup_cosine(step, lr=cfg.lr, warmup=cfg.warmup, steps=cfg.steps, min_lr_ratio=cfg.min_lr_ratio,
                         constant=cfg.schedule == "constant")


def edge_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Mean |finite difference of pred - that of target| over both image axes."""
    dx = (pred[..., :, 1:] - pred[..., :, :-1]) - (target[..., :, 1:] - target[..., :, :-1])
    dy = (pred[..., 1:, :] - pred[..., :-1, :]) - (target[..., 1:, :] - target[..., :-1, :])
    return dx.abs().mean() + dy.abs().mean()


def vae_loss(vae: AutoencoderKL, images: Tensor, cfg: VAETrainConfig, generator: torch.Generator,
             masks: Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
    """The training loss of a batch of images in [0, 1] (with `cfg.mask_weight`, pixels where
    `masks` is 1 weigh more) and its parts."""
    x = images * 2 - 1
    posterior = vae.encode(x).latent_dist
    z = posterior.sample(generator=generator)
    recon = vae.decode(z).sample
    diff = recon - x
    if cfg.mask_weight and masks is not None:
        # the policy generates inside masks: that is where reconstruction error shows in edits
        w = 1 + cfg.mask_weight * masks.expand_as(diff)
        l1, l2 = (w * diff.abs()).sum() / w.sum(), (w * diff.square()).sum() / w.sum()
    else:
        l1, l2 = diff.abs().mean(), diff.square().mean()
    parts = {"l1": l1, "l2": l2,
             "kl": posterior.kl().sum() / z.numel(), "edge": edge_loss(recon, x)}
    loss = sum(getattr(cfg, name) * value for name, value in parts.items() if getattr(cfg, name))
    return loss, {k: v.detach().item() for k, v in parts.items()}


@torch.no_grad()
def reconstruct(vae: AutoencoderKL, images: Tensor, chunk: int = 64) -> Tensor:
    """Encode (posterior mode, as FluxFillPolicy) and decode images in [0, 1]."""
    out = []
    for i in range(0, images.shape[0], chunk):
        x = images[i:i + chunk] * 2 - 1
        out.append(vae.decode(vae.encode(x).latent_dist.mode()).sample)
    return (torch.cat(out) / 2 + 0.5).clamp(0, 1)


def held_out_samples(world: SyntheticWorld, per_task: int) -> dict[str, list[EditSample]]:
    return {task: world.held_out(task, per_task) for task in TASKS}


def evaluate_vae(vae: AutoencoderKL, samples: dict[str, list[EditSample]]) -> dict[str, dict[str, float]]:
    """Per task: PSNR of reconstructed targets (whole image and inside the mask) and core.synthetic.metrics'
    scores of the reconstructed ground truth, the ceiling of any edit decoded by this VAE: fill's
    shape and colour accuracy, text's glyph accuracy / exact text / ink IoU."""
    was_training = vae.training
    vae.eval()
    out = {}
    for task, group in samples.items():
        targets = torch.stack([s.target for s in group])
        recon = reconstruct(vae, targets)
        mse = (recon - targets).square().flatten(1).mean(1).clamp_min(1e-10)
        row = {"psnr": float((10 * torch.log10(1 / mse)).mean())}
        per_sample = [sample_metrics(s, r) for s, r in zip(group, recon)]
        for key in per_sample[0]:
            if key in ("psnr_mask", "glyph_acc", "text_exact", "ink_iou", "shape_acc", "colour_acc"):
                row[key] = sum(m[key] for m in per_sample) / len(per_sample)
        out[task] = row
    vae.train(was_training)
    return out


@torch.no_grad()
def fit_latent_scaling(vae: AutoencoderKL, images: Tensor) -> tuple[float, float]:
    """FLUX's latent normalisation from data: shift = mean, scale = 1 / std of the posterior modes
    of `images` (in [0, 1]); written into the VAE's config and returned."""
    z = torch.cat([vae.encode(images[i:i + 64] * 2 - 1).latent_dist.mode() for i in range(0, len(images), 64)])
    shift, scale = float(z.mean()), float(1.0 / z.std().clamp_min(1e-6))
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    return shift, scale


def _state(step: int, vae, optimizer, generator, cfg, history) -> dict[str, Any]:
    return {"step": step, "config": cfg.to_dict(), "model": vae.state_dict(), "optimizer": optimizer.state_dict(),
            "generator": generator.get_state(), "history": history}


def train_vae(out: str | Path, cfg: VAETrainConfig = VAETrainConfig(), *, stop_after: int | None = None,
              progress: bool = True) -> dict[str, Any]:
    """Train (or resume training) a VAE in `out`; returns {"step", "ran" (steps run now), "done", "history", "vae"}.

    `stop_after`: run at most this many steps in this call, then checkpoint and return (resume by
    calling again with the same config). When `cfg.steps` is reached, the fitted VAE is saved to
    `out`/vae (AutoencoderKL.from_pretrained loads it) and "done" is True.
    """
    from tqdm.auto import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    world = SyntheticWorld(size=cfg.image_size, seed=cfg.world_seed)
    vae = build_vae(cfg.vae, image_size=cfg.image_size, seed=cfg.seed)
    params = [p for p in vae.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(step_seed(cfg.seed, "vae-noise"))
    step, history = 0, []
    found = find_checkpoint(out / CHECKPOINT)
    if found is not None:
        state = load_state(found)
        saved = from_dict(VAETrainConfig, state["config"])
        free = {k: getattr(cfg, k) for k in FREE_ON_RESUME}
        if dataclasses.replace(saved, **free) != cfg:
            changed = [k for k in cfg.to_dict() if k not in free and getattr(saved, k) != getattr(cfg, k)]
            raise ValueError(f"{out} was trained with another config (differs in {changed}); use a new directory")
        vae.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        step, history = int(state["step"]), list(state["history"])
    start = step
    end = cfg.steps if stop_after is None else min(cfg.steps, step + stop_after)
    eval_set = None
    vae.train()
    bar = tqdm(total=cfg.steps, initial=step, desc="vae", disable=not progress, dynamic_ncols=True)
    try:
        while step < end:
            lr = learning_rate(cfg, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            images, masks = training_batch(cfg, step, world)
            loss, parts = vae_loss(vae, images, cfg, generator, masks)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            step += 1
            bar.update(1)
            loss_value = loss.detach().item()
            bar.set_postfix(loss=f"{loss_value:.4f}", l1=f"{parts['l1']:.4f}")
            if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps:
                eval_set = eval_set or held_out_samples(world, cfg.eval_per_task)
                history.append({"step": step, "loss": loss_value, "time": time.time(),
                                "eval": evaluate_vae(vae, eval_set)})
                bar.write(_eval_line(history[-1]))
            if step < end and cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                save_checkpoint(_state(step, vae, optimizer, generator, cfg, history), out / CHECKPOINT)
    finally:
        bar.close()
    save_checkpoint(_state(step, vae, optimizer, generator, cfg, history), out / CHECKPOINT)
    (out / HISTORY).write_text(json.dumps(history, indent=1) + "\n")
    done = step >= cfg.steps
    if done:
        vae.eval()
        fit_latent_scaling(vae, torch.cat([training_batch(cfg, -1 - i, world)[0] for i in range(8)]))
        vae.save_pretrained(out / "vae")
    return {"step": step, "ran": step - start, "done": done, "history": history, "vae": vae}


def _eval_line(entry: dict[str, Any]) -> str:
    ev = entry["eval"]
    psnr = " ".join(f"{t} {m['psnr']:.1f}/{m['psnr_mask']:.1f}" for t, m in ev.items())
    fill, text = ev.get("fill", {}), ev.get("text", {})
    extra = [f"{k} {d[k]:.3f}" for d, k in ((fill, "shape_acc"), (fill, "colour_acc"), (text, "glyph_acc")) if k in d]
    return f"step {entry['step']}: PSNR image/mask {psnr}" + "".join(f"; {e}" for e in extra)


#: allowed values of every number (core.config.schema.check_ranges names the key on a violation)
RANGES: dict[str, Range] = {
    "vae.block_out_channels": at_least(1), "vae.latent_channels": at_least(1), "vae.layers_per_block": at_least(1),
    "vae.norm_num_groups": at_least(1), "vae.scaling_factor": POSITIVE, "vae.shift_factor": Range(),
    "steps": at_least(1), "batch_size": at_least(1), "lr": Range(0, 1, open_lo=True), "warmup": at_least(0),
    "min_lr_ratio": Range(0, 1), "weight_decay": Range(0, 1), "grad_clip": POSITIVE, "l1": at_least(0),
    "l2": at_least(0), "kl": at_least(0), "edge": at_least(0), "mask_weight": at_least(0),
    "kind_weights": at_least(0), "image_size": Range(16, 1024), "world_seed": at_least(0), "seed": at_least(0),
    "eval_every": at_least(0), "eval_per_task": at_least(1), "checkpoint_every": at_least(0),
}


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m core.toy_flux.vae_training OUT [--config FILE] [--set KEY=VALUE ...] [--stop-after N]`."""
    parser = config_parser("python -m core.toy_flux.vae_training", __doc__.split("\n\n")[0], VAETrainConfig,
                           ranges=RANGES, example="steps=20000")
    parser.add_argument("out", help="run directory (resumed when it holds a checkpoint)")
    parser.add_argument("--stop-after", type=int, default=None, metavar="N",
                        help="run at most N steps now, then checkpoint (resume by running again)")
    args, cfg = parse_config(parser, VAETrainConfig, list(argv) if argv is not None else None)
    try:
        check_ranges(cfg, RANGES, "core/toy_flux/vae_training.py RANGES")
    except ConfigError as e:
        parser.exit(2, f"{parser.prog}: config error: {e}\n")
    result = train_vae(args.out, cfg, stop_after=args.stop_after)
    print(f"step {result['step']}/{cfg.steps}" + (f"; VAE saved to {Path(args.out) / 'vae'}" if result["done"] else ""))


if __name__ == "__main__":
    main()
