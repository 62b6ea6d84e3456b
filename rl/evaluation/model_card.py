"""The model card a run leaves in final/README.md: what was trained, how well, and how to use it.

Written by `rl.train.run` after the export, from the resolved config and the run summary, so the
exported directory explains itself when it is copied or uploaded without its run directory.

Two kinds of card: mask-guided editors (FLUX.1 Fill: FluxFillPipeline with image and mask_image)
and instruction editors (model.kind in rl.plumbing.config.INSTRUCTION_KINDS: FluxKontextPipeline
or QwenImageEditPipeline with image and prompt, no mask anywhere).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from rl.plumbing.config import INSTRUCTION_KINDS, RunConfig

_NAMES = {"nft": "DiffusionNFT", "refl": "ReFL", "grpo": "Flow-GRPO", "awm": "AWM"}
_ALGORITHMS = {
    "nft": "DiffusionNFT with group filtering (Edit-R1 / UniWorld-V2)",
    "refl": "reward feedback learning against a reference model with a pairwise judge (OneReward)",
    "grpo": "Flow-GRPO (SDE rollouts, clipped per-step likelihood ratios, group advantages)",
    "awm": "Advantage Weighted Matching (the flow-matching loss weighted by group advantages)",
}


def write_model_card(final_dir: str | os.PathLike, cfg: RunConfig, summary: dict[str, Any]) -> Path:
    """Write `final_dir`/README.md for the model exported there; returns its path."""
    final = Path(final_dir)
    final.mkdir(parents=True, exist_ok=True)
    path = final / "README.md"
    path.write_text(model_card(final, cfg, summary))
    return path


def model_card(final_dir: Path, cfg: RunConfig, summary: dict[str, Any]) -> str:
    """The card's Markdown (see write_model_card)."""
    run_dir = Path(summary.get("run_dir") or final_dir.parent)
    parts = [
        f"# {_NAMES[cfg.train.algorithm]} fine-tune of {_base_name(cfg)}\n",
        f"Trained with `python -m rl.train`, {_ALGORITHMS[cfg.train.algorithm]}, for "
        f"{summary.get('steps', cfg.train.steps)} of {cfg.train.steps} steps"
        + (f" in {summary['train_wall_time_s']:.0f} s" if "train_wall_time_s" in summary else "")
        + f". Run directory: `{run_dir}`; the exact config is its `config.yaml`.\n",
        _base_section(cfg),
        _training_section(cfg),
        _judge_section(cfg),
        _data_section(cfg),
        _results_section(cfg, summary),
        *((_instruction_usage_section(cfg, run_dir), _instruction_diffusers_section(cfg))
          if cfg.model.kind in INSTRUCTION_KINDS else (_usage_section(cfg, run_dir), _diffusers_section(cfg))),
    ]
    return "\n".join(parts)


def _base_name(cfg: RunConfig) -> str:
    m = cfg.model
    if m.kind == "tiny_kontext":
        return ("the shipped toy instruction editor" if m.path is None
                else f"the toy instruction editor at `{m.path}`")
    if m.kind == "flux_kontext":
        return f"FLUX.1 Kontext (`{m.path}`)"
    if m.kind == "qwen_image_edit":
        return f"Qwen-Image-Edit (`{m.path}`)"
    if m.kind == "tiny":
        return ("the shipped toy FLUX.1 Fill" if m.path is None
                else f"the toy FLUX.1 Fill at `{m.path}`")
    return f"FLUX.1 Fill (`{m.path}`)"


def _base_section(cfg: RunConfig) -> str:
    m = cfg.model
    lines = ["## Base model\n", f"- kind: `{m.kind}`", f"- weights: {_base_name(cfg)}", f"- dtype: {m.dtype}"]
    if m.lora is None:
        lines.append("- trained: the whole transformer (full fine-tune)")
    else:
        lines.append(f"- trained: a LoRA adapter, r={m.lora.r}, alpha={m.lora.alpha}, on "
                     + ", ".join(f"`{t}`" for t in m.lora.targets))
    if m.kind in INSTRUCTION_KINDS:
        lines.append("- an instruction editor: no mask, the whole image is generated from the source and the "
                     "instruction")
    if m.guidance is not None:
        lines.append(f"- distilled guidance: {m.guidance:g}")
    return "\n".join(lines) + "\n"


def _training_section(cfg: RunConfig) -> str:
    s, o, t = cfg.sampler, cfg.optim, cfg.train
    lines = ["## Training\n", f"- algorithm: `{t.algorithm}`, {_ALGORITHMS[t.algorithm]}"]
    if t.algorithm == "nft":
        n = cfg.nft
        lines += [
            f"- {n.groups_per_step} conditions per step x {n.group_size} images each; beta {n.beta:g}, "
            f"{'adaptive' if n.adaptive else 'velocity'} loss weight, KL coefficient {n.kl_coef:g}",
            f"- training times: {n.time_sampling}, {n.timestep_fraction:g} of the rollout's steps per image; "
            f"advantage std per {n.std}, clip {n.clip:g}; generated region only: {n.mask_loss}",
            f"- old policy: decay rate {n.old_decay_rate:g} per step up to {n.old_decay_max:g}",
        ]
    elif t.algorithm in ("grpo", "awm"):
        n, g, a = cfg.nft, cfg.grpo, cfg.awm
        lines.append(f"- {n.groups_per_step} conditions per step x {n.group_size} images each; advantage std per "
                     f"{n.std}, clip {n.clip:g}")
        if t.algorithm == "grpo":
            lines.append(f"- {g.trained_steps} trained SDE steps per image ({g.step_selection}; noise "
                         f"{'only there' if g.sde_only_trained else 'at every step'}), ratio clip {g.clip_range:g}, "
                         f"KL coefficient {g.kl_coef:g}, {g.mini_batches} optimiser step(s) per step")
        else:
            lines.append(f"- {a.train_times} training times per image, {a.weighting} weighting, KL to the initial "
                         f"model {a.kl_coef:g}, to the lagging copy {a.old_kl_coef:g}")
    else:
        r = cfg.refl
        lines += [
            f"- {r.batch_size} conditions per step; {r.reference} reference "
            f"({'the frozen initial model' if r.reference == 'static' else 'the policy EMA'})",
            f"- the policy denoises to a random step in [{r.min_step}, {r.max_step}]; "
            f"reward upper bound {r.reward_upper_bound:g}",
        ]
    shift = "the model's default" if s.shift is None else f"{s.shift:g}"
    lines += [
        f"- rollouts: `{s.method}` sampler, {s.steps} steps, shift {shift}"
        + (f", noise level {s.noise_level:g}" if s.method == "sde" else ""),
        f"- optimiser: AdamW, lr {o.lr:g} ({o.decay} after {o.warmup_steps} warm-up steps), "
        f"weight decay {o.weight_decay:g}, gradient clip {o.grad_clip:g}",
        f"- exported weights: the evaluation EMA (decay up to {t.ema_max_decay:g}); seed {t.seed}",
    ]
    return "\n".join(lines) + "\n"


def _judge_section(cfg: RunConfig) -> str:
    j = cfg.judge
    kind = {"rule": "the rule judge (scores edits against the synthetic world's ground truth)",
            "transformers": "a local vision-language model (transformers)",
            "openai": "a vision-language model behind an OpenAI-compatible server"}[j.kind]
    lines = ["## Judge\n", f"- kind: `{j.kind}`, {kind}", f"- mode: `{j.mode}`"]
    if j.model:
        lines.append(f"- model: `{j.model}`")
    return "\n".join(lines) + "\n"


def _data_section(cfg: RunConfig) -> str:
    d = cfg.data
    mixture = ", ".join(f"{task} {w:g}" for task, w in d.mixture.items())
    source = (f"the synthetic edit world, world seed {d.world_seed}" if d.source == "world"
              else f"the JSONL `{d.jsonl}`")
    return "\n".join(["## Data\n", f"- source: {source}", f"- task mixture: {mixture}",
                      f"- image size: {d.image_size}x{d.image_size}"]) + "\n"


def _interval(g: dict[str, float]) -> str:
    return f"{g['mean']:+.3f} [{g['low']:+.3f}, {g['high']:+.3f}]"


def _results_section(cfg: RunConfig, summary: dict[str, Any]) -> str:
    head = "## Held-out results\n"
    if "reward_base" not in summary:
        return head + ("\nNo held-out evaluation was made (train.eval_per_task = 0): "
                       "run `python -m rl.eval --model RUN` to measure this model.\n")
    s = cfg.sampler
    method = "euler" if s.method == "sde" else s.method
    lines = [head,
             f"Judge reward (mean over the task's dimensions, 0 to 1) of the base and the final model on the same "
             f"{cfg.train.eval_per_task} held-out conditions per task with the same noise, sampled with "
             f"`{method}` in {s.eval_steps} steps; the gain is the paired mean difference with its 95% "
             "bootstrap interval.\n",
             "| task | base | final | gain [95% CI] |", "|---|---:|---:|---|"]
    for task, r in summary.get("by_task", {}).items():
        lines.append(f"| {task} | {r['base']:.3f} | {r['final']:.3f} | {_interval(r['gain'])} |")
    lines.append(f"| **all** | {summary['reward_base']:.3f} | {summary['reward_final']:.3f} | "
                 f"{_interval(summary['reward_gain'])} |")
    truth = summary.get("ground_truth")
    if truth:
        lines += ["", "Ground-truth metrics of the synthetic world (base -> final):", "",
                  "| task | metric | base | final |", "|---|---|---:|---:|"]
        for task, metrics in truth.get("final", {}).items():
            for name, value in metrics.items():
                base = truth.get("base", {}).get(task, {}).get(name)
                lines.append(f"| {task} | {name} | {'' if base is None else f'{base:.4f}'} | {value:.4f} |")
    return "\n".join(lines) + "\n"


def _usage_section(cfg: RunConfig, run_dir: Path) -> str:
    lines = ["## Loading\n"]
    if cfg.model.kind == "tiny" and cfg.model.lora is None:
        lines += ["A whole FluxFillPipeline directory (the toy works on 64x64 images, 16 T5 tokens):", "",
                  "```python", "from diffusers import FluxFillPipeline", "",
                  f'pipe = FluxFillPipeline.from_pretrained("{run_dir / "final"}")',
                  'image = pipe(prompt="a red circle", image=image, mask_image=mask, height=64, width=64,',
                  "             max_sequence_length=16, num_inference_steps=8, guidance_scale=30.0).images[0]",
                  "```", "", "Inside the library: `core.policies.flux_fill.FluxFillPolicy.from_pretrained(final)`.\n"]
    elif cfg.model.lora is not None:
        base = "core/assets/toy_flux" if cfg.model.kind == "tiny" and cfg.model.path is None else cfg.model.path
        lines += ["A LoRA adapter in diffusers' format:", "", "```python", "import torch",
                  "from diffusers import FluxFillPipeline", "",
                  f'pipe = FluxFillPipeline.from_pretrained("{base}", torch_dtype=torch.bfloat16)',
                  f'pipe.load_lora_weights("{run_dir / "final"}")', "```", ""]
    else:
        lines += ["The fine-tuned transformer (the rest of the pipeline is the base model's):", "",
                  "```python", "import torch", "from diffusers import FluxFillPipeline, FluxTransformer2DModel", "",
                  f'transformer = FluxTransformer2DModel.from_pretrained("{run_dir / "final" / "transformer"}", '
                  "torch_dtype=torch.bfloat16)",
                  f'pipe = FluxFillPipeline.from_pretrained("{cfg.model.path}", transformer=transformer, '
                  "torch_dtype=torch.bfloat16)", "```", ""]
    s = cfg.sampler
    shift = "" if s.shift is None else f", shift {s.shift:g}"
    method = "euler" if s.method == "sde" else s.method
    lines += ["## Editing\n", "```bash",
              f'python -m rl.edit --model {run_dir} --image in.png --mask mask.png --prompt "..." --out out.png',
              "```", "",
              f"By default this samples exactly as the held-out evaluation did (`{method}`, {s.eval_steps} steps"
              f"{shift}, the known region re-blended at every step); `--steps`, `--sampler`, `--shift`, "
              "`--seed` and `--keep-size` change that, and `--jsonl RECORDS --out-dir DIR` edits a batch. "
              "From Python: `rl.edit.load_editor(run_dir).edit(images, masks, prompts)`."
              + (" The toy's text encoders were trained only on the synthetic world's words "
                 "(`core.synthetic.world.VOCABULARY`)." if cfg.model.kind == "tiny" else "") + "\n"]
    return "\n".join(lines)


def _pipeline_class(cfg: RunConfig) -> str:
    return "QwenImageEditPipeline" if cfg.model.kind == "qwen_image_edit" else "FluxKontextPipeline"


def _kontext_guidance(cfg: RunConfig) -> float:
    """The distilled guidance the policy ran with: model.guidance, else FluxKontextPolicy's default."""
    if cfg.model.guidance is not None:
        return cfg.model.guidance
    from core.policies.flux_kontext import DEFAULT_GUIDANCE

    return DEFAULT_GUIDANCE


def _instruction_call(cfg: RunConfig, prompt: str, indent: str) -> list[str]:
    """The pipeline call that matches how the run sampled (lines of a Python snippet)."""
    s, size = cfg.sampler, cfg.data.image_size
    if cfg.model.kind == "qwen_image_edit":
        cfg_scale = cfg.model.true_cfg_scale
        return [f'{indent}image = pipe(image=image, prompt="{prompt}", height={size}, width={size},',
                f"{indent}             num_inference_steps={s.eval_steps}, true_cfg_scale={cfg_scale:g}).images[0]"]
    tokens = ", max_sequence_length=16" if cfg.model.kind == "tiny_kontext" else ""
    return [f'{indent}image = pipe(image=image, prompt="{prompt}", height={size}, width={size},',
            f"{indent}             max_area={size} * {size}, _auto_resize=False{tokens},",
            f"{indent}             num_inference_steps={s.eval_steps}, guidance_scale={_kontext_guidance(cfg):g}).images[0]"]


def _instruction_usage_section(cfg: RunConfig, run_dir: Path) -> str:
    m, final = cfg.model, run_dir / "final"
    pipe_class = _pipeline_class(cfg)
    prompt = "make the red circle blue"
    policy = ("core.policies.qwen_image_edit.QwenImageEditPolicy" if m.kind == "qwen_image_edit"
              else "core.policies.flux_kontext.FluxKontextPolicy")
    lines = ["## Loading\n"]
    if m.lora is not None:
        base = "core/assets/toy_kontext" if m.kind == "tiny_kontext" and m.path is None else m.path
        lines += ["A LoRA adapter in diffusers' format:", "", "```python", "import torch",
                  f"from diffusers import {pipe_class}", "",
                  f'pipe = {pipe_class}.from_pretrained("{base}", torch_dtype=torch.bfloat16)',
                  f'pipe.load_lora_weights("{final}")', *_instruction_call(cfg, prompt, ""), "```", ""]
    elif m.kind == "tiny_kontext":
        lines += [f"A whole {pipe_class} directory (the toy works on {cfg.data.image_size}x{cfg.data.image_size} "
                  "images, 16 T5 tokens):", "",
                  "```python", f"from diffusers import {pipe_class}", "",
                  f'pipe = {pipe_class}.from_pretrained("{final}")', *_instruction_call(cfg, prompt, ""),
                  "```", "", f"Inside the library: `{policy}.from_pretrained(final)`.\n"]
    else:
        lines += [f"A whole {pipe_class} directory with the fine-tuned transformer:", "",
                  "```python", "import torch", f"from diffusers import {pipe_class}", "",
                  f'pipe = {pipe_class}.from_pretrained("{final}", torch_dtype=torch.bfloat16).to("cuda")',
                  *_instruction_call(cfg, prompt, ""), "```", "",
                  f"Inside the library: `{policy}.from_pretrained(final)`.\n"]
    s = cfg.sampler
    shift = "" if s.shift is None else f", shift {s.shift:g}"
    method = "euler" if s.method == "sde" else s.method
    vocabulary = (" The toy's text encoders were trained only on the instruction world's words "
                  "(`core.synthetic.instruction_world.INSTRUCTION_VOCABULARY`)." if m.kind == "tiny_kontext" else "")
    lines += ["## Editing\n", "```bash",
              f'python -m rl.edit --model {run_dir} --image in.png --prompt "{prompt}" --out out.png',
              "```", "",
              "An instruction editor: no mask, the prompt says what to change and the whole image is generated. "
              f"By default this samples exactly as the held-out evaluation did (`{method}`, {s.eval_steps} steps"
              f"{shift}); `--steps`, `--sampler`, `--shift`, `--seed` and `--keep-size` (the output resized back "
              "to the input's size) change that, and `--jsonl RECORDS --out-dir DIR` edits a batch (records of "
              "image and prompt). From Python: `rl.edit.load_editor(run_dir).edit(images, None, prompts)`."
              + vocabulary + "\n"]
    return "\n".join(lines)


def _instruction_diffusers_section(cfg: RunConfig) -> str:
    pipe_class, s, size = _pipeline_class(cfg), cfg.sampler, cfg.data.image_size
    method = "euler" if s.method == "sde" else s.method
    sampler = (f"- sampler: the pipeline integrates with Euler, {50 if pipe_class == 'QwenImageEditPipeline' else 28} "
               f"steps by default; this run evaluated with `{method}` in {s.eval_steps} steps ('dpm2' is "
               "DPM-Solver++(2M) with data prediction). With Euler, no shift set and the same N, the step times "
               "are the pipeline's;")
    if pipe_class == "QwenImageEditPipeline":
        call = (f"`pipe(image=image, prompt=..., height=S, width=S, num_inference_steps=N, "
                f"true_cfg_scale={getattr(cfg.model, 'true_cfg_scale', 1.0):g})`")
        resize = ("- the pipeline resizes the source to about 1 MP (`calculate_dimensions`) before encoding it; "
                  "the policy encodes it at S x S: give it an S x S image;")
        extra = []
    else:
        call = (f"`pipe(image=image, prompt=..., height=S, width=S, max_area=S*S, _auto_resize=False, "
                f"num_inference_steps=N, guidance_scale={_kontext_guidance(cfg):g}"
                + (", max_sequence_length=16" if cfg.model.kind == "tiny_kontext" else "") + ")`")
        resize = ("- resizing: without `max_area=S*S` the pipeline scales the output to about 1 MP, and without "
                  "`_auto_resize=False` it resizes the source to the nearest Kontext training resolution "
                  "(`core.policies.flux_kontext.preferred_resolution`); the guidance is the distilled guidance the policy "
                  "ran with (the pipeline's argument defaults to 3.5);")
        extra = (["- the toy was trained with 16 T5 tokens: pass `max_sequence_length=16` (FLUX's joint attention "
                  "has no text mask, so other padding changes the edit);"] if cfg.model.kind == "tiny_kontext" else [])
    return f"## With diffusers' {pipe_class}\n" + "\n".join([
        "",
        f"{call} with S = {size} gives a similar edit, not the same one (there is no mask: the whole image is "
        "generated from the source and the instruction):",
        "",
        sampler,
        "- noise: the pipeline draws its own; pass rl.edit's packed noise as `latents=` to share it;",
        resize,
        *extra,
        "",
    ])


def _diffusers_section(cfg: RunConfig) -> str:
    head = "## With diffusers' FluxFillPipeline\n"
    s = cfg.sampler
    extra = (["- the toy was trained with 16 T5 tokens: pass `max_sequence_length=16` (FLUX's joint attention "
              "has no text mask, so other padding changes the edit);"] if cfg.model.kind == "tiny" else [])
    return head + "\n".join([
        "",
        "`pipe(prompt=..., image=..., mask_image=..., height=S, width=S, num_inference_steps=N, "
        f"guidance_scale=30.0)` with S = {cfg.data.image_size} gives a similar edit, not the same one:",
        "",
        "- blending: training and evaluation put the known region back on the re-noised source after every "
        "step; the pipeline only conditions on the masked image and never blends, so the kept region can "
        "drift (paste the source back outside the mask);",
        f"- sampler: the pipeline integrates with Euler, 50 steps by default; this run evaluated with "
        f"`{'euler' if s.method == 'sde' else s.method}` in {s.eval_steps} steps ('dpm2' is DPM-Solver++(2M) "
        "with data prediction). With Euler, no shift set and the same N, the step times are the pipeline's;",
        "- noise: the pipeline draws its own; pass rl.edit's packed noise as `latents=` to share it;",
        "- the pipeline samples the VAE posterior of the masked image, the training code takes its mode;",
        *extra,
        "",
    ])
