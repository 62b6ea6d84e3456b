"""`python -m rl.pretrain`: build the built-in editor, a toy FLUX.1 Fill pipeline, on the synthetic world.

    python -m rl.pretrain --out core/assets/toy_flux [--work DIR] [--stop-after N] [--set KEY=VALUE ...]

Three stages; the first two take hours on 2 cores and resume exactly where they stopped (run the
same command again; `--stop-after N` ends a piece after N optimiser steps):

1. the AutoencoderKL (core.toy_flux.vae_training), state in WORK/vae;
2. the editor — FluxTransformer2DModel, CLIP and T5 trained jointly on the frozen VAE, through
   FluxFillPolicy as RL trains it (core.toy_flux.editor_training), state in WORK/editor;
3. the sampler's time shift, chosen by held-out ground truth on a *validation* world
   (`validation_world_seed`), written into the scheduler config (FLUX's dynamic shift, anchored
   so a 64x64 image samples with that shift); then quality.json — ground-truth metrics on the
   held-out split of `world_seed`, which nothing was tuned on — and samples.png.

`--instruction` builds the toy instruction editor instead (core.toy_flux.instruction_training): a
FLUX.1 Kontext-style pipeline warm-started from the Fill toy in `--base` (default: the shipped one),
trained on the instruction world (state in WORK/instruction, resumable the same way), evaluated on
the held-out instructions of `instruction.world_seed` with the base's sampler shift. The shipped one:
`python -m rl.pretrain --instruction --out core/assets/toy_kontext`.

--out receives a FluxFillPipeline (or FluxKontextPipeline) directory (`FluxFillPipeline.from_pretrained(out)` loads it)
plus quality.json, samples.png and toy_flux.json, written to a temporary directory that then
replaces the old one. Settings are config keys: `--config FILE.yaml`, `--set KEY=VALUE`, `--help`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
from pathlib import Path

import torch

from core.config.cli import config_parser, parse_config
from core.config.loading import ConfigError
from core.config.schema import Range, at_least, check_ranges, opt, section
from core.io.image_io import image_grid, save_image
from core.policies.flux_fill import FluxFillPolicy
from core.synthetic.world import SyntheticWorld
from core.tasks import TASKS
from core.toy_flux.build import (
    SPEC_FILE,
    ToyFluxSpec,
    build_scheduler,
    save_toy_pipeline,
)
from core.toy_flux.editor_training import RANGES as EDITOR_RANGES
from core.toy_flux.editor_training import (
    EditorTrainConfig,
    evaluate_editor,
    train_editor,
)
from core.toy_flux.instruction_training import (
    DEFAULT_BASE,
    InstructionTrainConfig,
    evaluate_instruction_editor,
    train_instruction_editor,
)
from core.toy_flux.instruction_training import RANGES as INSTRUCTION_RANGES
from core.toy_flux.vae_training import RANGES as VAE_RANGES
from core.toy_flux.vae_training import VAETrainConfig, train_vae

QUALITY_FILE = "quality.json"
GRID_FILE = "samples.png"


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    """Every setting of `python -m rl.pretrain` (--config FILE.yaml, --set KEY=VALUE)."""

    vae: VAETrainConfig = section(VAETrainConfig, "stage 1: the autoencoder (core.toy_flux.vae_training)")
    editor: EditorTrainConfig = section(EditorTrainConfig, "stage 2: the editor (core.toy_flux.editor_training)")
    instruction: InstructionTrainConfig = section(
        InstructionTrainConfig, "--instruction: the toy instruction editor (core.toy_flux.instruction_training)")
    shifts: tuple[float, ...] = opt((1.0, 2.0, 3.0), "sampler time shifts to choose from on the validation world")
    validation_world_seed: int = opt(1, "world whose held-out split chooses the shift (not the reported one)")
    eval_per_task: int = opt(64, "held-out conditions per task for the shift choice and quality.json")
    eval_steps: int = opt(8, "sampler steps of those evaluations (dpm2, mask blend: as RL samples)")
    threads: int = opt(0, "torch CPU threads (0 = torch's default; 1 on a busy machine)")

    def __post_init__(self) -> None:
        check_ranges(self, RANGES, "rl/pretrain.py RANGES")
        tr = self.editor.transformer
        if tr.attention_head_dim % 4:
            raise ConfigError(f"editor.transformer.attention_head_dim must be a multiple of 4 (three rope axes), "
                              f"got {tr.attention_head_dim}")
        if tr.num_layers + tr.num_single_layers < 1:
            raise ConfigError("the transformer needs a block: set num_layers or num_single_layers >= 1")


RANGES: dict[str, Range] = {
    **{f"vae.{k}": v for k, v in VAE_RANGES.items()},
    **{f"editor.{k}": v for k, v in EDITOR_RANGES.items()},
    **{f"instruction.{k}": v for k, v in INSTRUCTION_RANGES.items()},
    "shifts": Range(0, None, open_lo=True), "validation_world_seed": at_least(0), "eval_per_task": at_least(1),
    "eval_steps": Range(1, 1000), "threads": at_least(0, "0 = torch's default"),
}


def parser() -> argparse.ArgumentParser:
    p = config_parser("python -m rl.pretrain", __doc__.split("\n\n")[0], PretrainConfig, ranges=RANGES,
                      example="editor.steps=12000")
    p.add_argument("--out", type=Path, required=True,
                   help="the model directory to write (the shipped one: --out core/assets/toy_flux)")
    p.add_argument("--work", type=Path, default=Path("pretraining/toy_flux"),
                   help="where the resumable training state lives (default: pretraining/toy_flux)")
    p.add_argument("--stop-after", type=int, default=None, metavar="N",
                   help="run at most N optimiser steps now (VAE, then editor), keeping the state to resume")
    p.add_argument("--instruction", action="store_true",
                   help="build the toy instruction editor (FLUX.1 Kontext-style) from the Fill toy in --base")
    p.add_argument("--base", type=Path, default=DEFAULT_BASE,
                   help="--instruction: the toy Fill pipeline to warm-start from (default: the shipped one)")
    p.add_argument("--eval-only", action="store_true",
                   help="re-evaluate the model in --out and rewrite its quality.json and samples.png")
    return p


def score_of(summary: dict[str, dict[str, float]]) -> float:
    """One number per evaluation, to choose a shift by: the mean over tasks of each task's
    ground-truth content metric (glyph / shape accuracy) or in-mask PSNR / 30."""
    parts = [summary["text"]["glyph_acc"], summary["fill"]["shape_acc"],
             summary["extend"]["psnr_mask"] / 30, summary["removal"]["psnr_mask"] / 30]
    return sum(parts) / len(parts)


def set_shift(policy: FluxFillPolicy, spec: ToyFluxSpec, shift: float) -> ToyFluxSpec:
    """Anchor the pipeline's dynamic shift so a native-size image samples with `shift`."""
    spec = dataclasses.replace(spec, scheduler=dataclasses.replace(spec.scheduler, shift=float(shift)))
    policy.pipe.scheduler = build_scheduler(spec)
    return spec


def choose_shift(policy: FluxFillPolicy, spec: ToyFluxSpec, cfg: PretrainConfig) -> tuple[float, dict]:
    """The shift with the best validation score; returns it and every candidate's score."""
    world = SyntheticWorld(size=spec.image_size, seed=cfg.validation_world_seed)
    scores = {}
    for shift in cfg.shifts:
        set_shift(policy, spec, shift)
        summary, _ = evaluate_editor(policy, world, per_task=cfg.eval_per_task, steps=cfg.eval_steps)
        scores[shift] = round(score_of(summary), 4)
        print(f"shift {shift:g}: validation score {scores[shift]:.4f}", file=sys.stderr)
    best = max(scores, key=scores.get)
    return best, {str(k): v for k, v in scores.items()}


def sample_grid(world: SyntheticWorld, edited: dict[str, torch.Tensor], per_task: int = 3) -> torch.Tensor:
    """Rows per task: (source with the region darkened, edit, ground truth) x `per_task`."""
    rows = []
    for task in TASKS:
        row = []
        for s, e in zip(world.held_out(task, per_task), edited[task][:per_task]):
            row += [s.source * (1 - 0.5 * s.mask), e, s.target]
        rows.append(row)
    return image_grid(rows)


def write_atomically(out: Path, fill) -> None:
    """Run fill(tmp_dir), then replace `out` with it (the old directory survives a failure)."""
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        fill(tmp)
        if out.exists():
            out.rename(old)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def finish(policy: FluxFillPolicy, spec: ToyFluxSpec, cfg: PretrainConfig, out: Path, training: dict,
           shift: float | None = None) -> dict:
    """Choose the shift (unless given), evaluate on the reported held-out split, write `out`."""
    scores = None
    if shift is None:
        shift, scores = choose_shift(policy, spec, cfg)
    spec = set_shift(policy, spec, shift)
    world = SyntheticWorld(size=spec.image_size, seed=cfg.editor.world_seed)
    summary, edited = evaluate_editor(policy, world, per_task=cfg.eval_per_task, steps=cfg.eval_steps)
    quality = {"held_out_per_task": cfg.eval_per_task, "world_seed": cfg.editor.world_seed,
               "sampler": {"method": "dpm2", "steps": cfg.eval_steps, "shift": shift, "blend": True},
               "shift_choice": {"validation_world_seed": cfg.validation_world_seed, "scores": scores},
               "metrics": {t: {k: round(v, 4) for k, v in m.items()} for t, m in summary.items()},
               "training": training}
    grid = sample_grid(world, edited)

    def fill(tmp: Path) -> None:
        save_toy_pipeline(policy.pipe, tmp, spec)
        (tmp / QUALITY_FILE).write_text(json.dumps(quality, indent=2) + "\n")
        save_image(grid, tmp / GRID_FILE)

    write_atomically(out, fill)
    return quality


def format_table(summary: dict[str, dict[str, float]]) -> str:
    lines = [f"{'task':<9} ground truth (held out)"]
    for task, metrics in summary.items():
        lines.append(f"{task:<9} " + "  ".join(f"{k}={v:.3f}" for k, v in metrics.items()))
    return "\n".join(lines)


def _training_info(vae_history: list, editor_history: list, cfg: PretrainConfig) -> dict:
    def last(history):
        return history[-1] if history else {}

    return {"vae": {"steps": cfg.vae.steps, "batch_size": cfg.vae.batch_size,
                    "held_out_reconstruction": last(vae_history).get("eval")},
            "editor": {"steps": cfg.editor.steps, "batch_size": cfg.editor.batch_size, "lr": cfg.editor.lr,
                       "final_loss": round(last(editor_history).get("loss", math.nan), 5)},
            "hours": round(sum(_hours(h) for h in (vae_history, editor_history)), 2)}


def instruction_grid(world, edited: dict[str, torch.Tensor], per_task: int = 3) -> torch.Tensor:
    """Rows per instruction task: (source, edit, ground truth) x `per_task` (the instruction is the row's task)."""
    from core.tasks import INSTRUCTION_TASKS

    rows = []
    for task in INSTRUCTION_TASKS:
        row = []
        for s, e in zip(world.held_out(task, per_task), edited[task][:per_task]):
            row += [s.source, e, s.target]
        rows.append(row)
    return image_grid(rows)


def _main_instruction(args, cfg: PretrainConfig) -> None:
    """--instruction: train (or resume) the instruction editor, then write --out with quality.json."""
    from core.synthetic.instruction_world import InstructionWorld

    if not (Path(args.base) / SPEC_FILE).is_file():
        sys.exit(f"python -m rl.pretrain: --base {args.base} holds no toy Fill pipeline ({SPEC_FILE} missing)")
    icfg = cfg.instruction
    run = train_instruction_editor(args.work / "instruction", args.base, icfg, stop_after=args.stop_after)
    if not run["done"]:
        print(f"instruction editor at step {run['step']}/{icfg.steps}; run again to continue")
        return
    policy = run["policy"]
    spec = ToyFluxSpec.from_dict(json.loads((args.work / "instruction" / "model" / SPEC_FILE).read_text()))
    world = InstructionWorld(size=spec.image_size, seed=icfg.world_seed)
    summary, edited = evaluate_instruction_editor(policy, world, per_task=cfg.eval_per_task, steps=cfg.eval_steps)
    history = run["history"]
    quality = {"held_out_per_task": cfg.eval_per_task, "world_seed": icfg.world_seed,
               "sampler": {"method": "dpm2", "steps": cfg.eval_steps, "shift": spec.scheduler.shift,
                           "shift_from": "the Fill toy it was warm-started from"},
               "metrics": {t: {k: round(v, 4) for k, v in m.items()} for t, m in summary.items()},
               "training": {"steps": icfg.steps, "batch_size": icfg.batch_size, "lr": icfg.lr,
                            "final_loss": round(history[-1]["loss"], 5) if history else None,
                            "hours": round(_hours(history), 2), "warm_start": "the toy FLUX.1 Fill"}}
    grid = instruction_grid(world, edited)

    def fill(tmp: Path) -> None:
        save_toy_pipeline(policy.pipe, tmp, spec)
        (tmp / QUALITY_FILE).write_text(json.dumps(quality, indent=2) + "\n")
        save_image(grid, tmp / GRID_FILE)

    write_atomically(args.out, fill)
    print(format_table(quality["metrics"]))
    print(f"saved to {args.out}")


def _hours(history: list) -> float:
    times = [e["time"] for e in history if "time" in e]
    return (max(times) - min(times)) / 3600 if len(times) > 1 else 0.0


def main(argv: list[str] | None = None) -> None:
    """`python -m rl.pretrain --out DIR [--work DIR] [--stop-after N] [--set KEY=VALUE ...]`."""
    p = parser()
    args, cfg = parse_config(p, PretrainConfig, argv)  # checked in PretrainConfig.__post_init__
    if args.stop_after is not None and args.stop_after < 1:
        p.error(f"--stop-after must be >= 1, got {args.stop_after}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out: Path = args.out
    if args.eval_only:
        if not (out / SPEC_FILE).is_file():
            p.exit(2, f"{p.prog}: {out} holds no toy model ({SPEC_FILE} missing): build one first\n")
        policy = FluxFillPolicy.from_pretrained(out)
        spec = ToyFluxSpec.from_dict(json.loads((out / SPEC_FILE).read_text()))
        previous = json.loads((out / QUALITY_FILE).read_text()) if (out / QUALITY_FILE).is_file() else {}
        quality = finish(policy, spec, cfg, out, previous.get("training", {}),
                         shift=spec.scheduler.shift)
        print(format_table(quality["metrics"]))
        return
    if args.instruction:
        _main_instruction(args, cfg)
        return
    budget = args.stop_after
    vae = train_vae(args.work / "vae", cfg.vae, stop_after=budget)
    if not vae["done"]:
        print(f"VAE at step {vae['step']}/{cfg.vae.steps}; run again to continue")
        return
    if budget is not None:
        budget -= vae["ran"]
        if budget <= 0:
            print("VAE finished; run again to train the editor")
            return
    editor = train_editor(args.work / "editor", args.work / "vae" / "vae", cfg.editor, stop_after=budget)
    if not editor["done"]:
        print(f"editor at step {editor['step']}/{cfg.editor.steps}; run again to continue")
        return
    spec = ToyFluxSpec.from_dict(json.loads((args.work / "editor" / "model" / SPEC_FILE).read_text()))
    quality = finish(editor["policy"], spec, cfg, out, _training_info(vae["history"], editor["history"], cfg))
    print(format_table(quality["metrics"]))
    print(f"saved to {out}")


if __name__ == "__main__":
    main()
