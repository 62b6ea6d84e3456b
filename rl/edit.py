"""`python -m rl.edit`: edit your own images with a base model, a training run or a checkpoint.

    python -m rl.edit --model RUN|MODEL_DIR|CKPT_DIR|base --image IN.png --mask MASK.png \\
        --prompt "a red circle" [--task fill|extend|removal|text] [--steps N] [--sampler euler|dpm2] \\
        [--shift S] [--seed S] [--device cpu|cuda|auto] [--keep-size] [--config CFG.yaml] --out OUT.png
    python -m rl.edit --model RUN --jsonl RECORDS.jsonl --out-dir DIR [same options]

    # an instruction editor (FLUX.1 Kontext, Qwen-Image-Edit, the toy tiny_kontext): no mask
    python -m rl.edit --model RUN --image IN.png --prompt "make the red circle blue" --out OUT.png

The mask is white (1) where the model generates and black where the image is kept; a mask of
another size must have exactly the image's aspect ratio (a 32x24 mask for a 128x96 image).

Instruction editors. A run (or checkpoint) whose model.kind is one of
rl.plumbing.config.INSTRUCTION_KINDS (tiny_kontext, flux_kontext, qwen_image_edit), a model
directory holding a FluxKontextPipeline or QwenImageEditPipeline, or `base` with --config naming
such a kind edits from the prompt alone: give no mask (one is refused; the whole image is generated,
internally with a mask of ones), always a prompt (the instruction), and no task (or one of
core.tasks.INSTRUCTION_TASKS, which changes nothing but the record). --keep-size resizes the output
back to the input's size (there is no kept region to paste back); JSONL records have no "mask".
Mask-guided models (FLUX.1 Fill) still need a mask and refuse instruction tasks.

--config CFG.yaml gives the run settings (model, sampler, data.image_size) for `base` and for model
directories, which have no config.yaml of their own (default: rl.plumbing.config.RunConfig's).

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

Tasks (mask-guided models) only choose the default prompt: removal uses the fixed removal prompt
and extend a generic continuation prompt when none is given (core.tasks); fill and text need a prompt.

From Python:

    from rl.edit import edit, load_editor
    images = edit("runs/nft-x", ["in.png"], ["mask.png"], ["a red circle"], seed=0)   # PIL images
    images = edit("runs/kontext-x", ["in.png"], None, ["make the red circle blue"])    # an instruction editor
    editor = load_editor("runs/nft-x")            # load once, edit many times
    out = editor.edit(pil_images, pil_masks, prompts, task="fill", seed=3, keep_size=True)
    out = load_editor("runs/kontext-x").edit(pil_images, None, ["make the red circle blue"])  # instruction editor

(An instruction run's final/README.md gives its FluxKontextPipeline or QwenImageEditPipeline call:
`pipe(image=..., prompt=..., height=S, width=S, max_area=S*S, _auto_resize=False, ...)`, no mask.)

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
  data prediction, core/sampling/samplers.py) with 8 steps. For the same trajectory use a run sampled with
  --sampler euler, pass num_inference_steps=N and leave the shift unset (then both use FLUX's
  resolution-dependent shift; core/sampling/schedules.py is tested against the pipeline's times);
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

from core.io.image_io import (
    resize_image,
    to_pil,
)
from core.synthetic.world import EditSample
from core.tasks import INSTRUCTION_TASKS, TASKS
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

#: the policy classes that edit from an instruction alone (no mask)
_INSTRUCTION_POLICIES = ("FluxKontextPolicy", "QwenImageEditPolicy")
#: the noise of every edit is drawn from (seed, NOISE_KEY) (rl.evaluation.heldout keys it by condition)
NOISE_KEY = "rl.edit"


class Editor:
    """A loaded model with its sampler settings: call `edit` as often as you like.

    Build it with `load_editor`. `steps`, `method` and `shift` are the defaults of `edit` (the
    run's evaluation sampler unless overridden); `size` is the working resolution (h, w).
    `instruction`: the model is an instruction editor (no mask; None: told by the policy's class)."""

    def __init__(self, policy, weights: dict[str, Tensor] | None, description: str, *, steps: int, method: str,
                 shift: float | None, size: tuple[int, int], device: torch.device, instruction: bool | None = None):
        check_sampler(steps, method, shift)
        self.policy, self.weights, self.description = policy, weights, description
        self.steps, self.method, self.shift = steps, method, shift
        self.size, self.device = size, device
        if instruction is None:
            instruction = any(c.__name__ in _INSTRUCTION_POLICIES for c in type(policy).__mro__)
        self.instruction = instruction

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

    def prepare(self, images, masks=None, prompts=None,
                task: str | None | Sequence[str | None] = None) -> list[PreparedEdit]:
        """Check and load the inputs of `edit` without sampling (EditError on bad input)."""
        items = prepare(*_per_image(images, masks, prompts, task), self.size, instruction=self.instruction)
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
    def edit(self, images: ImageLike | Sequence[ImageLike], masks: ImageLike | Sequence[ImageLike] | None = None,
             prompts: str | None | Sequence[str | None] = None, *, task: str | None | Sequence[str | None] = None,
             seed: int | Sequence[int] = 0, steps: int | None = None, method: str | None = None,
             shift: float | None = None, keep_size: bool = False, noise_keys: Sequence[str] | None = None,
             batch_size: int = 16) -> list[Image.Image]:
        """Edit images (paths, PIL images or [3,H,W] tensors in [0, 1]) inside their masks.

        `prompts`, `task` and `seed` are one value for all images or one per image; every input is
        checked before anything is sampled (EditError naming the problem and the fix). `task`
        None: "fill" for a mask-guided model. An instruction editor (`self.instruction`) takes
        `masks=None` and a prompt per image, and regenerates the whole image. Returns RGB PIL
        images at the working resolution, or at each input's size with `keep_size` (the input's
        pixels outside the mask; an instruction edit is only resized). `noise_keys` replaces
        NOISE_KEY per image (give a held-out sample's key to reproduce rl.evaluation.heldout's
        image of it)."""
        check_sampler(steps, method, shift)
        items = self.prepare(images, masks, prompts, task)
        n = len(items)
        seeds = as_list(seed, n, "seeds")
        if any(isinstance(s, bool) or not isinstance(s, int) for s in seeds):
            raise EditError(f"seed must be an integer, got {seeds}")
        keys = [NOISE_KEY] * n if noise_keys is None else as_list(list(noise_keys), n, "noise keys")
        # an instruction edit given no task: the task is not read when sampling; name an instruction one
        samples = [EditSample(key, it.task or INSTRUCTION_TASKS[0], it.image, it.mask, it.prompt, None, {})
                   for key, it in zip(keys, items)]
        images_out = self.generate(samples, seeds, steps=steps, method=method, shift=shift, batch_size=batch_size)
        results = []
        for it, img in zip(items, images_out):
            if keep_size and self.instruction:  # the whole image is generated: nothing to paste back
                img = resize_image(img, tuple(it.source.shape[-2:]))
            elif keep_size:
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


def _per_image(images, masks, prompts, task) -> tuple[list, list, list, list]:
    """images, masks, prompts and tasks as one list each (one value for all, or one per image)."""
    single = not isinstance(images, (list, tuple))
    images = [images] if single else list(images)
    n = len(images)
    masks = [masks] if single and not isinstance(masks, (list, tuple)) else as_list(masks, n, "masks")
    return images, masks, as_list(prompts, n, "prompts"), as_list(task, n, "tasks")


def run_settings(model: str | os.PathLike, config: str | os.PathLike | None = None):
    """The RunConfig a model spec was trained with: its run's or checkpoint's config.yaml, else
    `config` (for `base` and model directories), else the defaults of rl.plumbing.config.RunConfig.

    A model directory gets model.kind from its pipeline class (model_index.json) when the
    configured kind loads another policy class: a FluxKontextPipeline is an instruction editor
    (tiny_kontext for a toy, flux_kontext otherwise), a QwenImageEditPipeline qwen_image_edit, a
    FluxFillPipeline mask-guided (tiny for a toy, flux_fill otherwise)."""
    import dataclasses

    from core.config.loading import ConfigError
    from rl.plumbing.config import RunConfig, load_config
    from rl.plumbing.model_ref import model_config_for

    stored = Path(model) / "config.yaml"
    if str(model) != "base" and stored.is_file():
        if config is not None:
            raise ConfigError(f"--config is for 'base' and model directories; {model} has its own config.yaml "
                              "(drop --config)")
        return load_config(str(stored))
    cfg = load_config(str(config)) if config is not None else RunConfig()
    if str(model) != "base":
        cfg = dataclasses.replace(cfg, model=model_config_for(Path(model), cfg.model))
    return cfg


def is_instruction_model(model: str | os.PathLike, config: str | os.PathLike | None = None) -> bool | None:
    """Whether `model` is an instruction editor (no mask), from its settings alone (nothing is
    loaded); None when its config cannot be read (load_editor reports that with its fix)."""
    from rl.plumbing.config import INSTRUCTION_KINDS

    try:
        return run_settings(model, config).model.kind in INSTRUCTION_KINDS
    except Exception:  # noqa: BLE001 (load_editor reports a bad config with its fix)
        return None


def load_editor(model: str | os.PathLike = "base", device: str | torch.device | None = None, *,
                steps: int | None = None, method: str | None = None, shift: float | None = None,
                config: str | os.PathLike | None = None) -> Editor:
    """Load `model` ("base", a run directory, a checkpoint or a model directory) once.

    The sampler defaults to the run's evaluation settings (see the module docstring); `steps`,
    `method` and `shift` override them. `device`: "cpu", "cuda", "auto" or None (the run's
    model.device). `config`: a run config (YAML) for `base` and model directories, which have
    none of their own (e.g. one with model.kind tiny_kontext for the toy instruction editor)."""
    from core.config.loading import ConfigError
    from rl.plumbing.config import INSTRUCTION_KINDS
    from rl.plumbing.distributed import resolve_device
    from rl.plumbing.model_ref import resolve_model

    check_sampler(steps, method, shift)
    try:
        cfg = run_settings(model, config)
        dev = device if isinstance(device, torch.device) else resolve_device(device or cfg.model.device)
        policy, weights, description = resolve_model(str(model), dev, cfg.model, cfg.data.image_size)
    except (ConfigError, FileNotFoundError, ValueError) as e:  # each already names its fix
        raise EditError(f"--model {model}: {e}") from None
    size = getattr(policy, "image_size", cfg.data.image_size)
    size = (size, size) if isinstance(size, int) else tuple(size)
    if hasattr(policy, "pipe"):  # FLUX works at any size: use the one it was trained and evaluated at
        size = (cfg.data.image_size, cfg.data.image_size)
    configured = "euler" if cfg.sampler.method == "sde" else cfg.sampler.method
    instruction = cfg.model.kind in INSTRUCTION_KINDS
    return Editor(policy, weights, description, steps=steps or cfg.sampler.eval_steps,
                  method=method or configured, shift=cfg.sampler.shift if shift is None else shift,
                  size=size, device=dev, instruction=instruction)


def edit(model: str | os.PathLike | Editor, images: ImageLike | Sequence[ImageLike],
         masks: ImageLike | Sequence[ImageLike] | None = None, prompts: str | None | Sequence[str | None] = None, *,
         task: str | None | Sequence[str | None] = None, steps: int | None = None, seed: int | Sequence[int] = 0,
         method: str | None = None, shift: float | None = None, device: str | None = None,
         keep_size: bool = False, config: str | os.PathLike | None = None) -> list[Image.Image]:
    """Edit images with `model` (a spec for load_editor, or an Editor); see Editor.edit.

    With a spec, the inputs are checked before the model is loaded."""
    check_sampler(steps, method, shift)
    if isinstance(model, Editor):
        editor = model
    else:
        _precheck(images, masks, prompts, task, model, config)
        editor = load_editor(model, device, config=config)
    return editor.edit(images, masks, prompts, task=task, seed=seed, steps=steps, method=method, shift=shift,
                       keep_size=keep_size)


def _precheck(images, masks, prompts, task, model, config=None) -> None:
    """The input checks that need no loaded model (Editor.edit repeats the size-dependent ones);
    none when the model's config cannot be read (load_editor then reports it with its fix)."""
    instruction = is_instruction_model(model, config)
    if instruction is None:
        return
    prepare(*_per_image(images, masks, prompts, task), _size_hint(model, config), instruction=instruction)


def _size_hint(model, config=None) -> tuple[int, int] | None:
    """The working size the config tells (data.image_size), else None."""
    try:
        cfg = run_settings(model, config)
    except Exception:  # load_editor reports a bad config with its fix
        return None
    return (cfg.data.image_size,) * 2


# -- the command line ----------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rl.edit", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="base", help="'base', a run directory, a checkpoint or a model directory")
    p.add_argument("--image", help="the image to edit")
    p.add_argument("--mask", help="its mask: white = generate, black = keep (none for an instruction editor)")
    p.add_argument("--prompt", help="what to generate (fill, text; optional for extend and removal), or the "
                                    "instruction of an instruction editor (\"make the red circle blue\")")
    p.add_argument("--task", help=f"one of {', '.join(TASKS)} (default fill); an instruction editor needs none "
                                  f"(or one of {', '.join(INSTRUCTION_TASKS)})")
    p.add_argument("--config", help="run config (YAML) for 'base' and model directories: model.kind, model.path, "
                                    "sampler, data.image_size (e.g. model.kind tiny_kontext)")
    p.add_argument("--out", help="output PNG (single image)")
    p.add_argument("--jsonl", help="batch mode: records of image, mask, task, prompt (paths relative to the file)")
    p.add_argument("--out-dir", help="batch mode: where <line>.png and results.jsonl go")
    p.add_argument("--steps", type=int, help="sampling steps (default: the run's sampler.eval_steps)")
    p.add_argument("--sampler", help=f"{' or '.join(METHODS)} (default: the run's evaluation sampler)")
    p.add_argument("--shift", type=float, help="static time shift (default: the run's sampler.shift or the model's)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    p.add_argument("--device", help="cpu, cuda or auto (default: the run's model.device)")
    p.add_argument("--keep-size", action="store_true",
                   help="write the output at the input's size, with the input's pixels outside the mask "
                        "(an instruction edit is resized back)")
    p.add_argument("--batch-size", type=int, default=16, help="images per forward pass in batch mode")
    return p


def _check_args(args: argparse.Namespace) -> None:
    single = [args.image, args.mask, args.out]
    if args.jsonl:
        if any(single):
            raise EditError("give either --jsonl with --out-dir (batch) or --image, --mask and --out, not both")
        if not args.out_dir:
            raise EditError("--jsonl needs --out-dir, the folder for the outputs")
    else:
        # an instruction editor takes no --mask (prepare refuses one); unknown kind (an unreadable
        # config): load_editor reports the config
        need_mask = is_instruction_model(args.model, args.config) is False
        names = ("image", "mask", "out")
        missing = [f"--{n}" for n, v in zip(names, single) if not v and (n != "mask" or need_mask)]
        if missing:
            wanted = "--image, --mask and --out" if need_mask else "--image and --out"
            raise EditError(f"missing {', '.join(missing)}: give {wanted} (or --jsonl and --out-dir)")
    if args.batch_size < 1:
        raise EditError(f"--batch-size must be >= 1, got {args.batch_size}")
    check_sampler(args.steps, args.sampler, args.shift)


def _run_single(args: argparse.Namespace) -> None:
    _precheck([args.image], [args.mask], [args.prompt], [args.task], args.model, args.config)
    editor = load_editor(args.model, args.device, steps=args.steps, method=args.sampler, shift=args.shift,
                         config=args.config)
    [img] = editor.edit([args.image], [args.mask], [args.prompt], task=args.task, seed=args.seed,
                        keep_size=args.keep_size)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    img.save(args.out)
    print(f"[rl.edit] {editor.description}: {editor.method}, {editor.steps} steps -> {args.out}")


def _run_batch(args: argparse.Namespace) -> None:
    hint = _size_hint(args.model, args.config)
    instruction = is_instruction_model(args.model, args.config)
    if instruction is not None:
        records = read_records(args.jsonl, args.task, args.prompt, args.seed, hint, instruction=instruction)
    editor = load_editor(args.model, args.device, steps=args.steps, method=args.sampler, shift=args.shift,
                         config=args.config)
    # nothing is written unless every record can be edited: masks at the model's size (when the
    # config did not tell it), every prompt through the model's text encoder
    if hint != editor.size or instruction != editor.instruction:
        records = read_records(args.jsonl, args.task, args.prompt, args.seed, editor.size,
                               instruction=editor.instruction)
    editor.check_prompts([prompt_for(r.task, r.prompt, "", editor.instruction) for r in records],
                         [f"{args.jsonl}:{r.line}: " for r in records])
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    width = max(5, len(str(records[-1].line)))
    rows = []
    for start in range(0, len(records), args.batch_size):
        chunk = records[start:start + args.batch_size]
        masks = None if editor.instruction else [r.mask_path for r in chunk]
        images = editor.edit([r.image_path for r in chunk], masks, [r.prompt for r in chunk],
                             task=[r.task for r in chunk], seed=[r.seed for r in chunk], keep_size=args.keep_size,
                             batch_size=args.batch_size)
        for r, img in zip(chunk, images):
            name = f"{r.line:0{width}d}.png"
            img.save(out_dir / name)
            row = {"line": r.line, "output": name, "image": r.image, "mask": r.mask, "task": r.task,
                   "prompt": prompt_for(r.task, r.prompt, "", editor.instruction), "seed": r.seed,
                   "size": list(img.size[::-1]), "model": editor.description, "sampler": editor.method,
                   "steps": editor.steps, "shift": editor.shift}
            if editor.instruction:  # no mask; the task only when the record named one
                del row["mask"]
                if r.task is None:
                    del row["task"]
            rows.append(row)
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
