"""`python -m rl.edit`: edit your own images with a base model, a training run or a checkpoint.

    python -m rl.edit --model RUN|MODEL_DIR|CKPT_DIR|base --image IN.png --mask MASK.png \\
        --prompt "a red circle" [--task fill|extend|removal|text] [--steps N] [--sampler euler|dpm2] \\
        [--shift S] [--seed S] [--device cpu|cuda|auto] [--keep-size] --out OUT.png
    python -m rl.edit --model RUN --jsonl RECORDS.jsonl --out-dir DIR [same options]

The mask is white (1) where the model generates and black where the image is kept; a mask of
another size must have exactly the image's aspect ratio (a 32x24 mask for a 128x96 image).

Sampler settings. By default an edit is sampled exactly as the run's held-out evaluation samples
(rl.evaluation.run_summary.evaluate_weights): the run's `sampler.method` ("sde" rollouts evaluate with its
deterministic limit, "euler"), `sampler.eval_steps` and `sampler.shift`, read from the
config.yaml of a run or checkpoint directory, or rl.plumbing.config.RunConfig's defaults (dpm2, 8 steps,
the model's own shift) for `base` and model directories. --steps, --sampler and --shift override
them. The output equals what rl.evaluation.heldout.generate_images gives for the same condition and noise.

Noise. The starting noise is drawn from (seed, a fixed key), independently of the image and of the
other images in a batch: the same image, mask, prompt and seed give the same output alone or
inside any batch. (Evaluation keys its noise by the held-out condition instead; `Editor.edit(...,
noise_keys=[sample.key])` reproduces an evaluation image exactly.)

Resolution. The model edits at its working resolution, the run's `data.image_size` squared (64x64
for the built-in toy FLUX.1 Fill); images and masks are resized to it (a non-square image is
squashed to a square, as training data is), and the output is written at that size. With
--keep-size (keep_size=True) the output is resized back to the input image's size and the input's
own pixels are put back outside the mask, so the kept region is not blurred by the two resizes.

The known region. Every sampling step keeps the region outside the mask on the re-noised source,
so at t = 0 it is the source's latents exactly: the VAE's round trip of the source, which is close
but not pixel-exact (--keep-size restores the exact pixels).

Tasks only choose the default prompt: removal uses the fixed removal prompt and extend a generic
continuation prompt when none is given (core.tasks); fill and text need a prompt.

From Python:

    from rl.edit import edit, load_editor
    images = edit("runs/nft-x", ["in.png"], ["mask.png"], ["a red circle"], seed=0)   # PIL images
    editor = load_editor("runs/nft-x")            # load once, edit many times
    out = editor.edit(pil_images, pil_masks, prompts, task="fill", seed=3, keep_size=True)

With diffusers' FluxFillPipeline (a toy run's final/ is a whole pipeline:
`FluxFillPipeline.from_pretrained("RUN/final")`, called with height=64, width=64,
max_sequence_length=16):

    pipe = FluxFillPipeline.from_pretrained(BASE, torch_dtype=torch.bfloat16).to("cuda")
    pipe.load_lora_weights("RUN/final")
    # a full fine-tune instead: FluxFillPipeline.from_pretrained(BASE, torch_dtype=torch.bfloat16,
    #     transformer=FluxTransformer2DModel.from_pretrained("RUN/final/transformer", torch_dtype=torch.bfloat16))
    out = pipe(prompt=..., image=..., mask_image=..., height=S, width=S, num_inference_steps=N,
               guidance_scale=30.0).images[0]

That gives a similar edit, not the same one:
- blending: rl.edit (like training and evaluation) puts the known region back on the re-noised
  source after every step; FluxFillPipeline only conditions the model on the masked image and
  never blends, so the model regenerates the kept region too and it can drift. Paste the source
  back outside the mask to come closer;
- sampler: the pipeline integrates with Euler (FlowMatchEulerDiscreteScheduler), 50 steps by
  default. rl.edit uses the run's evaluation sampler, by default "dpm2" (DPM-Solver++(2M) with
  data prediction, core/samplers.py) with 8 steps. For the same trajectory use a run sampled with
  --sampler euler, pass num_inference_steps=N and leave the shift unset (then both use FLUX's
  resolution-dependent shift; core/schedules.py is tested against the pipeline's times);
- noise: the pipeline draws its noise from its generator in the unpacked latent layout; rl.edit
  draws packed noise [1, L, 64] from the seed. Pass the same tensor as the pipeline's `latents=`
  (it takes packed latents) to share it;
- encoding: the pipeline samples the VAE posterior of the masked image, the adapter takes its mode;
- the pipeline resizes to height x width (1024 by default); rl.edit to the run's data.image_size.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from core.image_io import (
    resize_image,
    to_pil,
)
from core.tasks import TASKS
from core.world import EditSample
from rl.plumbing.edit_inputs import (
    METHODS,
    EditError,
    ImageLike,
    PreparedEdit,
    as_list,
    check_sampler,
    prepare,
    prompt_for,
    read_records,
)

#: the noise of every edit is drawn from (seed, NOISE_KEY) (rl.evaluation.heldout keys it by condition)
NOISE_KEY = "rl.edit"


class Editor:
    """A loaded model with its sampler settings: call `edit` as often as you like.

    Build it with `load_editor`. `steps`, `method` and `shift` are the defaults of `edit` (the
    run's evaluation sampler unless overridden); `size` is the working resolution (h, w)."""

    def __init__(self, policy, weights: dict[str, Tensor] | None, description: str, *, steps: int, method: str,
                 shift: float | None, size: tuple[int, int], device: torch.device):
        check_sampler(steps, method, shift)
        self.policy, self.weights, self.description = policy, weights, description
        self.steps, self.method, self.shift = steps, method, shift
        self.size, self.device = size, device

    def sigmas(self, steps: int | None = None, shift: float | None = None) -> Tensor:
        """The step times, as rl.plumbing.builders.rollout_sigmas gives them for the run's policy."""
        from rl.plumbing.builders import rollout_sigmas

        steps = self.steps if steps is None else steps
        shift = self.shift if shift is None else shift
        if shift is None and hasattr(self.policy, "pipe"):
            # FLUX's shift depends on the resolution; the run evaluated at data.image_size, which a
            # policy restored from a checkpoint does not know
            return self.policy.schedule(steps, image_hw=self.size)
        return rollout_sigmas(self.policy, steps, shift)

    def prepare(self, images, masks, prompts=None, task: str | Sequence[str] = "fill") -> list[PreparedEdit]:
        """Check and load the inputs of `edit` without sampling (EditError on bad input)."""
        single = not isinstance(images, (list, tuple))
        images = [images] if single else list(images)
        n = len(images)
        masks = [masks] if single and not isinstance(masks, (list, tuple)) else as_list(masks, n, "masks")
        items = prepare(images, masks, as_list(prompts, n, "prompts"), as_list(task, n, "tasks"), self.size)
        self.check_prompts([it.prompt for it in items])
        return items

    def check_prompts(self, prompts: Sequence[str], names: Sequence[str] | None = None) -> None:
        """EditError listing the prompts this model would misread (too long for its T5 length; the
        toy knows only the synthetic world's words); `names` prefixes each (e.g. "file.jsonl:3: ")."""
        problem_of = getattr(self.policy, "prompt_problem", None)
        if problem_of is None:
            return
        problems = []
        for i, prompt in enumerate(prompts):
            problem = problem_of(prompt)
            if problem is not None:
                where = names[i] if names is not None else ("" if len(prompts) == 1 else f"image {i}: ")
                problems.append(f"{where}{problem}")
        if problems:
            raise EditError("\n".join(problems))

    @torch.no_grad()
    def edit(self, images: ImageLike | Sequence[ImageLike], masks: ImageLike | Sequence[ImageLike],
             prompts: str | None | Sequence[str | None] = None, *, task: str | Sequence[str] = "fill",
             seed: int | Sequence[int] = 0, steps: int | None = None, method: str | None = None,
             shift: float | None = None, keep_size: bool = False, noise_keys: Sequence[str] | None = None,
             batch_size: int = 16) -> list[Image.Image]:
        """Edit images (paths, PIL images or [3,H,W] tensors in [0, 1]) inside their masks.

        `prompts`, `task` and `seed` are one value for all images or one per image; every input is
        checked before anything is sampled (EditError naming the problem and the fix). Returns RGB
        PIL images at the working resolution, or at each input's size with `keep_size` (the
        input's pixels outside the mask). `noise_keys` replaces NOISE_KEY per image (give a
        held-out sample's key to reproduce rl.evaluation.heldout's image of it)."""
        check_sampler(steps, method, shift)
        items = self.prepare(images, masks, prompts, task)
        n = len(items)
        seeds = as_list(seed, n, "seeds")
        if any(isinstance(s, bool) or not isinstance(s, int) for s in seeds):
            raise EditError(f"seed must be an integer, got {seeds}")
        keys = [NOISE_KEY] * n if noise_keys is None else as_list(list(noise_keys), n, "noise keys")
        samples = [EditSample(key, it.task, it.image, it.mask, it.prompt, None, {}) for key, it in zip(keys, items)]
        images_out = self.generate(samples, seeds, steps=steps, method=method, shift=shift, batch_size=batch_size)
        results = []
        for it, img in zip(items, images_out):
            if keep_size:
                big = resize_image(img, tuple(it.source.shape[-2:]))
                img = it.mask_full * big + (1 - it.mask_full) * it.source
            results.append(to_pil(img))
        return results

    def generate(self, samples: list[EditSample], seeds: Sequence[int], *, steps: int | None = None,
                 method: str | None = None, shift: float | None = None, batch_size: int = 16) -> Tensor:
        """Images [N, 3, h, w] for prepared samples: rl.evaluation.heldout.generate_images, one call per seed."""
        from rl.evaluation.heldout import generate_images

        sigmas = self.sigmas(steps, shift)
        method = self.method if method is None else method
        out: list[Tensor | None] = [None] * len(samples)
        for s in dict.fromkeys(seeds):
            idx = [i for i, x in enumerate(seeds) if x == s]
            imgs = generate_images(self.policy, [samples[i] for i in idx], weights=self.weights, sigmas=sigmas,
                                   method=method, seed=s, device=self.device, batch_size=batch_size)
            for i, img in zip(idx, imgs):
                out[i] = img
        return torch.stack(out)


def run_settings(model: str | os.PathLike):
    """The RunConfig a model spec was trained with: its run's or checkpoint's config.yaml, else the
    defaults of rl.plumbing.config.RunConfig (for `base` and model directories)."""
    from rl.plumbing.config import RunConfig, load_config

    stored = Path(model) / "config.yaml"
    if str(model) != "base" and stored.is_file():
        return load_config(str(stored))
    return RunConfig()


def load_editor(model: str | os.PathLike = "base", device: str | torch.device | None = None, *,
                steps: int | None = None, method: str | None = None, shift: float | None = None) -> Editor:
    """Load `model` ("base", a run directory, a checkpoint or a model directory) once.

    The sampler defaults to the run's evaluation settings (see the module docstring); `steps`,
    `method` and `shift` override them. `device`: "cpu", "cuda", "auto" or None (the run's
    model.device)."""
    from core.config_io import ConfigError
    from rl.plumbing.distributed import resolve_device
    from rl.plumbing.model_ref import resolve_model

    check_sampler(steps, method, shift)
    try:
        cfg = run_settings(model)
        dev = device if isinstance(device, torch.device) else resolve_device(device or cfg.model.device)
        policy, weights, description = resolve_model(str(model), dev, cfg.model, cfg.data.image_size)
    except (ConfigError, FileNotFoundError, ValueError) as e:  # each already names its fix
        raise EditError(f"--model {model}: {e}") from None
    size = getattr(policy, "image_size", cfg.data.image_size)
    size = (size, size) if isinstance(size, int) else tuple(size)
    if hasattr(policy, "pipe"):  # FLUX works at any size: use the one it was trained and evaluated at
        size = (cfg.data.image_size, cfg.data.image_size)
    configured = "euler" if cfg.sampler.method == "sde" else cfg.sampler.method
    return Editor(policy, weights, description, steps=steps or cfg.sampler.eval_steps,
                  method=method or configured, shift=cfg.sampler.shift if shift is None else shift,
                  size=size, device=dev)


def edit(model: str | os.PathLike | Editor, images: ImageLike | Sequence[ImageLike],
         masks: ImageLike | Sequence[ImageLike], prompts: str | None | Sequence[str | None] = None, *,
         task: str | Sequence[str] = "fill", steps: int | None = None, seed: int | Sequence[int] = 0,
         method: str | None = None, shift: float | None = None, device: str | None = None,
         keep_size: bool = False) -> list[Image.Image]:
    """Edit images with `model` (a spec for load_editor, or an Editor); see Editor.edit.

    With a spec, the inputs are checked before the model is loaded."""
    check_sampler(steps, method, shift)
    if isinstance(model, Editor):
        editor = model
    else:
        _precheck(images, masks, prompts, task, model)
        editor = load_editor(model, device)
    return editor.edit(images, masks, prompts, task=task, seed=seed, steps=steps, method=method, shift=shift,
                       keep_size=keep_size)


def _precheck(images, masks, prompts, task, model) -> None:
    """The input checks that need no loaded model (Editor.edit repeats the size-dependent ones)."""
    single = not isinstance(images, (list, tuple))
    imgs = [images] if single else list(images)
    n = len(imgs)
    msks = [masks] if single and not isinstance(masks, (list, tuple)) else as_list(masks, n, "masks")
    prepare(imgs, msks, as_list(prompts, n, "prompts"), as_list(task, n, "tasks"), _size_hint(model))


def _size_hint(model) -> tuple[int, int] | None:
    """The working size the config tells (data.image_size), else None."""
    try:
        cfg = run_settings(model)
    except Exception:  # load_editor reports a bad config with its fix
        return None
    return (cfg.data.image_size,) * 2


# -- the command line ----------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rl.edit", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="base", help="'base', a run directory, a checkpoint or a model directory")
    p.add_argument("--image", help="the image to edit")
    p.add_argument("--mask", help="its mask: white = generate, black = keep")
    p.add_argument("--prompt", help="what to generate (fill, text; optional for extend and removal)")
    p.add_argument("--task", default="fill", help=f"one of {', '.join(TASKS)} (default fill)")
    p.add_argument("--out", help="output PNG (single image)")
    p.add_argument("--jsonl", help="batch mode: records of image, mask, task, prompt (paths relative to the file)")
    p.add_argument("--out-dir", help="batch mode: where <line>.png and results.jsonl go")
    p.add_argument("--steps", type=int, help="sampling steps (default: the run's sampler.eval_steps)")
    p.add_argument("--sampler", help=f"{' or '.join(METHODS)} (default: the run's evaluation sampler)")
    p.add_argument("--shift", type=float, help="static time shift (default: the run's sampler.shift or the model's)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    p.add_argument("--device", help="cpu, cuda or auto (default: the run's model.device)")
    p.add_argument("--keep-size", action="store_true",
                   help="write the output at the input's size, with the input's pixels outside the mask")
    p.add_argument("--batch-size", type=int, default=16, help="images per forward pass in batch mode")
    return p


def _check_args(args: argparse.Namespace) -> None:
    single = [args.image, args.mask, args.out]
    if args.jsonl:
        if any(single):
            raise EditError("give either --jsonl with --out-dir (batch) or --image, --mask and --out, not both")
        if not args.out_dir:
            raise EditError("--jsonl needs --out-dir, the folder for the outputs")
    elif not all(single):
        missing = [f"--{n}" for n, v in zip(("image", "mask", "out"), single) if not v]
        raise EditError(f"missing {', '.join(missing)}: give --image, --mask and --out (or --jsonl and --out-dir)")
    if args.batch_size < 1:
        raise EditError(f"--batch-size must be >= 1, got {args.batch_size}")
    check_sampler(args.steps, args.sampler, args.shift)


def _run_single(args: argparse.Namespace) -> None:
    _precheck([args.image], [args.mask], [args.prompt], [args.task], args.model)
    editor = load_editor(args.model, args.device, steps=args.steps, method=args.sampler, shift=args.shift)
    [img] = editor.edit([args.image], [args.mask], [args.prompt], task=args.task, seed=args.seed,
                        keep_size=args.keep_size)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    img.save(args.out)
    print(f"[rl.edit] {editor.description}: {editor.method}, {editor.steps} steps -> {args.out}")


def _run_batch(args: argparse.Namespace) -> None:
    hint = _size_hint(args.model)
    records = read_records(args.jsonl, args.task, args.prompt, args.seed, hint)
    editor = load_editor(args.model, args.device, steps=args.steps, method=args.sampler, shift=args.shift)
    # nothing is written unless every record can be edited: masks at the model's size (when the
    # config did not tell it), every prompt through the model's text encoder
    if hint != editor.size:
        records = read_records(args.jsonl, args.task, args.prompt, args.seed, editor.size)
    editor.check_prompts([prompt_for(r.task, r.prompt, "") for r in records],
                         [f"{args.jsonl}:{r.line}: " for r in records])
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    width = max(5, len(str(records[-1].line)))
    rows = []
    for start in range(0, len(records), args.batch_size):
        chunk = records[start:start + args.batch_size]
        images = editor.edit([r.image_path for r in chunk], [r.mask_path for r in chunk], [r.prompt for r in chunk],
                             task=[r.task for r in chunk], seed=[r.seed for r in chunk], keep_size=args.keep_size,
                             batch_size=args.batch_size)
        for r, img in zip(chunk, images):
            name = f"{r.line:0{width}d}.png"
            img.save(out_dir / name)
            rows.append({"line": r.line, "output": name, "image": r.image, "mask": r.mask, "task": r.task,
                         "prompt": prompt_for(r.task, r.prompt, ""), "seed": r.seed, "size": list(img.size[::-1]),
                         "model": editor.description, "sampler": editor.method, "steps": editor.steps,
                         "shift": editor.shift})
    (out_dir / "results.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    print(f"[rl.edit] {editor.description}: {len(rows)} edits ({editor.method}, {editor.steps} steps) -> {out_dir}")


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status (2: bad input or model, with a message on stderr)."""
    args = _parser().parse_args(argv)
    try:
        _check_args(args)
        (_run_batch if args.jsonl else _run_single)(args)
    except EditError as e:
        print(f"rl.edit: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
