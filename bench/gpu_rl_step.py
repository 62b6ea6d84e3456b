"""A real RL step of the FLUX.1 Fill config at reduced size: `rl.plan`'s memory prediction against a measured peak.

    python bench/gpu_rl_step.py [--double 4 --single 8 --heads 24 --head-dim 128] [--image-size 512]
                                [--groups 2 --group-size 4] [--steps 3] [--set KEY=VALUE ...] [--out FILE]
    python bench/gpu_rl_step.py --device cpu --tiny --out /tmp/r.json      (a dry run on CPU, seconds)

1. Builds a FLUX.1 Fill pipeline with random weights, locally (core/toy_flux/build.py: the classes
   FLUX.1 Fill [dev] uses, no download). By default its transformer has FLUX's own blocks (24 heads x 128
   = 3072 wide, 384 input / 64 output channels, rope axes 16/56/56), only fewer of them (4 double-stream +
   8 single-stream instead of 19 + 38: ~2.5 B parameters instead of 11.9 B), FLUX's VAE (4 levels, 16 latent
   channels) and a 2-layer T5 as wide as T5-XXL (4096) read at 512 tokens; so the per-block activations are
   the real model's. It is saved in --dtype to a temporary directory (built on the GPU when there is one:
   seconds; falls back to the CPU).
2. Plans the run with rl.plan's API (rl.planning.loading.load_for_plan + memory_plan.make_plan):
   configs/flux_fill_nft_qwen7b.yaml's training settings (NFT, bf16, LoRA r=32, gradient checkpointing,
   micro-batch 2, dpm2 x 10) with model.path = that directory, the rule judge on the synthetic world
   (data.image_size --image-size), a small group (--groups x --group-size), one GPU, no held-out evaluation.
3. Runs the same config with rl.train.run (train.steps --steps; the group filter off, so that every step
   back-propagates), and measures:
   - memory (CUDA only): the caching allocator's peak (torch.cuda.max_memory_allocated / _reserved) over
     the whole run, and per phase (build, rollout, encode, VAE decode, judge, update; nested phases count
     in their parents) with the growth above the phase's starting allocation; the memory outside the
     allocator (CUDA context, modules: total - free - reserved at the end); against the plan's total
     (ratio = measured / predicted; the allocator's peak is compared with the total less the plan's
     1 GiB runtime row, which stands for the memory outside the allocator);
   - the static rows, on every device: the parameters and bytes of each part of the loaded policy, the
     LoRA adapters, the trainer's three copies and AdamW's state, against the plan's rows;
   - the time split of each step from the run's metrics.jsonl (time_rollout / time_judge / time_update, as
     rl.train measures them; this script adds a torch.cuda.synchronize at the end of each phase so
     that the GPU work is charged to the phase that launched it), and the median over the steps after
     the first (warm-up).
4. Writes the results as JSON: on a GPU to bench/results/gpu_rl_step-<device-slug>-<date>.json unless
   --out names another file; on a CPU only to --out (CPU numbers do not belong in bench/results/).

With --device cpu there is no allocator peak to read: the memory comparison is skipped (memory.measured is
null and memory.skipped says why); the static rows and the time split are still measured. --tiny picks a
small model, 32 px images, 2 x 2 images and 2 sampler steps: a dry run of every code path in seconds.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import importlib.metadata
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runnable from a checkout without installing
    sys.path.insert(0, str(ROOT))

import torch

from bench import device as device_info

BASE_CONFIG = ROOT / "configs" / "flux_fill_nft_qwen7b.yaml"
GIB = 1024**3

# the model and run sizes: FLUX's blocks, fewer of them, 512 px (the config's); --tiny: a toy for a CPU dry run
DEFAULT_SIZE = {"double": 4, "single": 8, "heads": 24, "head_dim": 128, "t5_layers": 2, "image_size": 512,
                "groups": 2, "group_size": 4, "sampler_steps": None, "steps": 3}
TINY_SIZE = {"double": 1, "single": 1, "heads": 2, "head_dim": 16, "t5_layers": 1, "image_size": 32,
             "groups": 2, "group_size": 2, "sampler_steps": 2, "steps": 2}


def missing_diffusers_message() -> str:
    return ("diffusers is not installed, and the FLUX.1 Fill pipeline needs it. Install it from a wheel you "
            "carried to this machine (pure Python; the others it needs come with transformers):\n"
            "    python -m pip install --no-deps --no-index /path/to/diffusers-0.42.1-py3-none-any.whl\n"
            "(or with network access: python -m pip install 'diffusers==0.42.1', the version constraints.txt "
            "pins). bench/gpu_check.sh does it when DIFFUSERS_WHEEL names the wheel.")


# -- the model --------------------------------------------------------------------------------------
def model_spec(args: argparse.Namespace):
    """The ToyFluxSpec of the reduced FLUX.1 Fill (or of the tiny dry-run model)."""
    from core.toy_flux.build import (
        ClipSpec,
        T5Spec,
        ToyFluxSpec,
        TransformerSpec,
        VAESpec,
    )

    transformer = TransformerSpec(num_layers=args.double, num_single_layers=args.single,
                                  num_attention_heads=args.heads, attention_head_dim=args.head_dim)
    if args.tiny:
        return ToyFluxSpec(image_size=args.image_size, transformer=transformer,
                           vae=VAESpec(block_out_channels=(16, 32), latent_channels=4, norm_num_groups=8),
                           clip=ClipSpec(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64),
                           t5=T5Spec(d_model=32, num_layers=args.t5_layers, num_heads=2, d_ff=64))
    # FLUX.1's VAE (AutoencoderKL, 84 M parameters; its latent scaling), CLIP-L's width, T5-XXL's width and
    # feed-forward at 512 tokens but only t5_layers layers: the transformer reads what the real one does
    return ToyFluxSpec(
        image_size=args.image_size, transformer=transformer,
        vae=VAESpec(block_out_channels=(128, 256, 512, 512), latent_channels=16, layers_per_block=2,
                    norm_num_groups=32, mid_block_attention=True, scaling_factor=0.3611, shift_factor=0.1159),
        clip=ClipSpec(hidden_size=768, num_layers=2, num_heads=12, intermediate_size=3072, max_length=77),
        t5=T5Spec(d_model=4096, num_layers=args.t5_layers, num_heads=64, d_ff=10240,
                  relative_attention_num_buckets=32, max_length=512))


def build_model(spec, directory: Path, dtype: torch.dtype, device: torch.device, log) -> dict[str, Any]:
    """Build the pipeline with random weights (on `device` when it is a GPU: fast), cast it to `dtype`
    and save it to `directory`. Returns where it was built, the seconds and the parameter counts."""
    from core.toy_flux.build import (
        build_toy_pipeline,
        parameter_counts,
        save_toy_pipeline,
    )

    tic = time.perf_counter()
    where = device if device.type == "cuda" else torch.device("cpu")
    try:
        with torch.device(where):
            pipe = build_toy_pipeline(spec)
    except Exception as err:  # any failure on the GPU: the CPU builds it too, only slower
        if where.type == "cpu":
            raise
        log(f"  building on {where} failed ({type(err).__name__}: {err}); building on the CPU instead")
        gc.collect()
        torch.cuda.empty_cache()
        where = torch.device("cpu")
        pipe = build_toy_pipeline(spec)
    counts = parameter_counts(pipe)
    pipe.to("cpu", dtype)
    built = time.perf_counter() - tic
    tic = time.perf_counter()
    save_toy_pipeline(pipe, directory, spec)
    saved = time.perf_counter() - tic
    del pipe
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"built_on": str(where), "build_s": built, "save_s": saved, "params": counts,
            "transformer_params": counts["transformer"], "total_params": sum(counts.values())}


# -- the config and the plan ------------------------------------------------------------------------
def overrides(args: argparse.Namespace, model_dir: Path) -> list[str]:
    """The base config's training settings, with this model, the rule judge and a small group."""
    sets = [
        f"model.path={model_dir}", f"model.device={args.device}", f"model.dtype={args.dtype}",
        f"model.attention_backend={args.attention}",
        "data.source=world", "data.jsonl=null", f"data.image_size={args.image_size}",
        "judge.kind=rule", "judge.model=null",
        f"nft.groups_per_step={args.groups}", f"nft.group_size={args.group_size}",
        # random weights make near-constant scores: without this the group filter could drop every group,
        # and a step with nothing kept skips the backward whose memory is measured
        "nft.tau_mean=null", "nft.tau_std=null",
        f"train.steps={args.steps}", "train.eval_per_task=0", "train.eval_every=0", "train.sample_every=0",
        "train.checkpoint_every=0", "train.tensorboard=false", "train.progress=false",
    ]
    if args.sampler_steps is not None:
        sets.append(f"sampler.steps={args.sampler_steps}")
    if args.tiny:
        sets.append("model.lora.r=4")
    return sets + list(args.overrides or [])


def row_dict(row) -> dict[str, Any]:
    return {"group": row.group, "label": row.label, "bytes": row.bytes, "params": row.params, "dtype": row.dtype}


def plan_run(cfg, gpu_memory_gib: float) -> dict[str, Any]:
    """rl.plan's memory plan of `cfg` on one GPU, and its two step estimates (update and rollout)."""
    from rl.planning.architectures import pipeline_architecture
    from rl.planning.flux_activations import (
        Batch,
        FluxDims,
        Training,
        backward_working_bytes,
        no_grad_peak_bytes,
        saved_bytes,
    )
    from rl.planning.memory_plan import (
        RUNTIME_OVERHEAD,
        compute_dtype,
        make_plan,
        step_shape,
    )
    from rl.planning.report import render

    tic = time.perf_counter()
    plan = make_plan(cfg, 1, gpu_memory_gib)
    seconds = time.perf_counter() - tic
    arch = pipeline_architecture(cfg.model.path, cfg.model.kind)
    shape, _ = step_shape(cfg, arch, 1)
    dims = FluxDims.from_config(arch.part("transformer").config, arch.part("transformer").class_name)
    lora = cfg.model.lora
    training = Training() if lora is None else Training(frozenset(lora.targets), lora.r, torch.float32)
    dtype = compute_dtype(cfg)
    batch = Batch(shape.micro_batch, shape.image_tokens, shape.text_tokens, dtype, cfg.model.gradient_checkpointing)
    trainable = plan.row("trainable").params
    grads = trainable * (4 if lora is not None else dtype.itemsize)
    activations, working = saved_bytes(dims, training, batch), backward_working_bytes(dims, training, batch)
    rollout = no_grad_peak_bytes(dims, shape.rollout or shape.per_gpu, shape.image_tokens, shape.text_tokens, dtype)
    static = sum(r.bytes for r in plan.rows if r.group in ("weights", "training", "judge"))
    runtime = sum(r.bytes for r in plan.rows if r.group == "runtime")
    step_rows = sum(r.bytes for r in plan.rows if r.group == "step")
    return {
        "text": render(plan, title=f"{BASE_CONFIG.name} at reduced size"),
        "rows": [row_dict(r) for r in plan.rows], "header": plan.header, "notes": plan.notes,
        "warnings": plan.warnings, "verdict": plan.verdict, "gpu_memory_gib": gpu_memory_gib, "plan_s": seconds,
        "total_bytes": plan.total_bytes, "runtime_bytes": runtime, "allocator_bytes": plan.total_bytes - runtime,
        "static_bytes": static, "step_bytes": step_rows,
        "update_bytes": grads + activations + working,
        "update_parts": {"gradients": grads, "activations": activations, "backward_working": working},
        "rollout_bytes": rollout,
        "consistent": step_rows == max(grads + activations + working, rollout) and runtime == RUNTIME_OVERHEAD,
        "shape": dataclasses.asdict(shape),
    }


# -- measuring ----------------------------------------------------------------------------------------
class PeakTracker:
    """Peaks of the CUDA caching allocator per phase, phases nested or not.

    At every phase boundary the peak since the last boundary (one segment) is read, credited to the
    whole run and to every phase open during the segment, and reset. A phase's `growth` is its peak
    less the allocation at its start. On a CPU it only counts calls."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.open: list[tuple[str, int]] = []
        self.phases: dict[str, dict[str, Any]] = {}
        self.peak_allocated = self.peak_reserved = self.outside_phases = self.start_allocated = 0

    def _segment(self) -> None:
        if not self.cuda:
            return
        allocated = torch.cuda.max_memory_allocated(self.device)
        reserved = torch.cuda.max_memory_reserved(self.device)
        self.peak_allocated = max(self.peak_allocated, allocated)
        self.peak_reserved = max(self.peak_reserved, reserved)
        if not self.open:
            self.outside_phases = max(self.outside_phases, allocated)
        for name, start in self.open:
            p = self.phases[name]
            p["peak_allocated"] = max(p["peak_allocated"], allocated)
            p["peak_reserved"] = max(p["peak_reserved"], reserved)
            p["growth"] = max(p["growth"], allocated - start)
        torch.cuda.reset_peak_memory_stats(self.device)

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_allocated = torch.cuda.memory_allocated(self.device)  # the model built before: freed

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        p = self.phases.setdefault(name, {"calls": 0, "peak_allocated": 0, "peak_reserved": 0, "growth": 0,
                                          "start_allocated": []})
        p["calls"] += 1
        self._segment()
        start = torch.cuda.memory_allocated(self.device) if self.cuda else 0
        p["start_allocated"].append(start)
        self.open.append((name, start))
        try:
            yield
        finally:
            if self.cuda:  # the GPU work of the phase is charged to it (the next phase would wait for it anyway)
                torch.cuda.synchronize(self.device)
            self._segment()
            self.open.pop()

    def finish(self) -> None:
        self._segment()

    def report(self) -> dict[str, Any]:
        phases = {}
        for name, p in self.phases.items():
            starts = p["start_allocated"]
            phases[name] = {"calls": p["calls"], **({k: p[k] for k in ("peak_allocated", "peak_reserved", "growth")}
                                                    if self.cuda else {}),
                            **({"start_allocated_max": max(starts)} if self.cuda and starts else {})}
        return phases


@contextlib.contextmanager
def instrumented(tracker: PeakTracker, captured: dict[str, Any]) -> Iterator[None]:
    """Wrap rl.train's make_trainer and the NFT step's parts in tracker phases (restored afterwards);
    `captured["trainer"]` is the run's trainer."""
    import rl.train
    from core.policies.flux_base import FluxPolicyBase
    from rl.algorithms.nft import NFTTrainer
    from rl.algorithms.trainer import Trainer

    # encode: the conditions through the VAE encoder and both text encoders; decode: the VAE decoder
    targets = [(NFTTrainer, "rollout", "rollout"), (Trainer, "encode", "encode"),
               (FluxPolicyBase, "decode", "decode"), (NFTTrainer, "score", "judge"), (NFTTrainer, "rewards", "judge"),
               (NFTTrainer, "update", "update")]
    saved = [(owner, name, owner.__dict__[name]) for owner, name, _ in targets]
    saved.append((rl.train, "make_trainer", rl.train.make_trainer))

    def wrap(fn, phase):
        def wrapper(*a, **kw):
            with tracker.phase(phase):
                return fn(*a, **kw)
        return wrapper

    def make_trainer(*a, **kw):
        with tracker.phase("build"):
            captured["trainer"] = trainer = saved[-1][2](*a, **kw)
        return trainer

    try:
        for owner, name, phase in targets:
            setattr(owner, name, wrap(owner.__dict__[name], phase))
        rl.train.make_trainer = make_trainer
        yield
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)


def _nbytes(tensors) -> tuple[int, int]:
    ts = list(tensors)
    return sum(t.numel() for t in ts), sum(t.numel() * t.element_size() for t in ts)


def static_rows(trainer, plan: dict[str, Any]) -> list[dict[str, Any]]:
    """The loaded policy's parts, the adapters, the copies and AdamW's state, against the plan's rows."""
    pipe = trainer.policy.pipe
    trainable_ids = {id(p) for p in trainer.params.values()}
    measured = {
        "transformer": _nbytes(p for p in pipe.transformer.parameters() if id(p) not in trainable_ids),
        "text encoder (": _nbytes(pipe.text_encoder.parameters()),
        "text encoder 2": _nbytes(pipe.text_encoder_2.parameters()),
        "VAE": _nbytes(pipe.vae.parameters()),
        "trainable": _nbytes(trainer.params.values()),
        "copies": _nbytes([*trainer.old.values(), *trainer.ema.values(), *trainer.ref.values()]),
        "AdamW": _nbytes(t for state in trainer.optimizer.state.values() for k, t in state.items()
                         if k != "step" and isinstance(t, torch.Tensor)),
    }
    rows = []
    for prefix, (params, size) in measured.items():
        row = next((r for r in plan["rows"] if r["label"].startswith(prefix)), None)
        rows.append({"row": prefix.rstrip(" ("), "plan_label": None if row is None else row["label"],
                     "plan_params": None if row is None else row["params"],
                     "plan_bytes": None if row is None else row["bytes"], "measured_params": params,
                     "measured_bytes": size})
    return rows


def time_split(metrics: list[dict[str, Any]]) -> dict[str, Any]:
    """Per step: rollout / judge / update seconds (rl.train's metrics.jsonl); medians after the first step."""
    keys = ("time_rollout", "time_judge", "time_update")
    steps = [{"step": m.get("step"), **{k: m.get(k) for k in keys}, "images": m.get("images"),
              "skipped": m.get("skipped"), "kept_groups": m.get("kept_groups"), "loss": m.get("loss"),
              "reward": m.get("reward"), "images_per_second": m.get("images_per_second")} for m in metrics]
    later = [s for s in steps[1:] if all(s[k] is not None for k in keys)] or steps
    median = {k.removeprefix("time_") + "_s": statistics.median(s[k] for s in later) for k in keys} if later else {}
    total = sum(median.values())
    share = {k.removesuffix("_s"): v / total for k, v in median.items()} if total > 0 else {}
    return {"steps": steps, "median_over": "steps after the first" if len(steps) > 1 else "the only step",
            "median": {**median, "step_s": total}, "share": share}


def versions() -> dict[str, Any]:
    out = device_info.versions()
    for name in ("diffusers", "transformers", "peft", "safetensors"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def _gib(n: float | None) -> str:
    return "n/a" if n is None else f"{n / GIB:.2f} GiB"


# -- the command -------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cuda (default when there is a GPU) or cpu")
    parser.add_argument("--tiny", action="store_true", help="a tiny model and run: a dry run of every path (CPU: seconds)")
    size = parser.add_argument_group("model and run size (defaults: FLUX's blocks, fewer of them; --tiny: a toy)")
    size.add_argument("--double", type=int, help="double-stream blocks (default 4; FLUX.1: 19)")
    size.add_argument("--single", type=int, help="single-stream blocks (default 8; FLUX.1: 38)")
    size.add_argument("--heads", type=int, help="attention heads (default 24, FLUX.1's)")
    size.add_argument("--head-dim", type=int, help="width of a head (default 128, FLUX.1's)")
    size.add_argument("--t5-layers", type=int, help="T5 encoder layers, 4096 wide (default 2; T5-XXL: 24)")
    size.add_argument("--image-size", type=int, help="data.image_size, a multiple of 16, >= 32 (default 512, the config's)")
    size.add_argument("--groups", type=int, help="nft.groups_per_step (default 2; the config: 4)")
    size.add_argument("--group-size", type=int, help="nft.group_size (default 4; the config: 12)")
    size.add_argument("--sampler-steps", type=int, help="sampler.steps (default: the config's 10)")
    size.add_argument("--steps", type=int, help="train.steps, the first a warm-up (default 3)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"],
                        help="model.dtype, also of the saved weights (default: the config's bfloat16)")
    parser.add_argument("--attention", default="native",
                        help="model.attention_backend (default native: PyTorch SDPA; the config's flash needs flash-attn)")
    parser.add_argument("--set", dest="overrides", action="append", metavar="KEY=VALUE",
                        help="more config overrides, for the plan and the run alike")
    parser.add_argument("--gpu-memory", type=float, help="GiB for the plan's verdict (default: this GPU's; CPU: 80)")
    parser.add_argument("--workdir", type=Path, help="where the model and the run go (default: a new temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the model and the run directory")
    parser.add_argument("--out", type=Path, help="the JSON (default on a GPU: bench/results/gpu_rl_step-<slug>-<date>.json)")
    args = parser.parse_args(argv)
    for key, value in (TINY_SIZE if args.tiny else DEFAULT_SIZE).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.image_size < 32 or args.image_size % 16:
        parser.error(f"--image-size must be a multiple of 16 and >= 32 (the synthetic world), got {args.image_size}")
    args.device_obj = torch.device(args.device)
    if args.device_obj.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU (use --device cpu --tiny for a dry run)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import diffusers  # noqa: F401
    except ImportError:
        print(missing_diffusers_message(), file=sys.stderr)
        return 2
    import rl.train
    from rl.planning.loading import load_for_plan
    from rl.plumbing.config import load_config
    from rl.plumbing.run_log import read_metrics

    device = args.device_obj

    def log(line: str) -> None:
        print(line, flush=True)

    info = device_info.describe(device)
    gpu_memory = args.gpu_memory or info.get("memory_gb") or 80.0
    report: dict[str, Any] = {"schema": 1, "kind": "gpu_rl_step", "device": info, "versions": versions(),
                              "command": ["bench/gpu_rl_step.py", *(argv if argv is not None else sys.argv[1:])]}
    log(f"# {info['name']}  {report['versions']}")
    work = Path(tempfile.mkdtemp(prefix="gpu_rl_step-")) if args.workdir is None else args.workdir
    work.mkdir(parents=True, exist_ok=True)
    model_dir, run_dir = work / "model", work / "run"
    try:
        spec = model_spec(args)
        log(f"\n## model: {args.double} double + {args.single} single blocks, {args.heads} x {args.head_dim}, "
            f"{args.image_size} px -> {model_dir}")
        model = build_model(spec, model_dir, getattr(torch, args.dtype), device, log)
        report["model"] = {"spec": spec.to_dict(), "dtype": args.dtype, "dir_bytes": sum(
            f.stat().st_size for f in model_dir.rglob("*") if f.is_file()), **model}
        log(f"  {model['total_params'] / 1e9:.3f} B parameters (transformer {model['transformer_params'] / 1e9:.3f} B), "
            f"built on {model['built_on']} in {model['build_s']:.1f} s, saved in {model['save_s']:.1f} s")

        sets = overrides(args, model_dir)
        report["config"] = {"base": str(BASE_CONFIG.relative_to(ROOT)), "overrides": sets}
        plan_cfg, issues = load_for_plan(str(BASE_CONFIG), sets)
        plan = plan_run(plan_cfg, gpu_memory)
        plan["warnings"] = issues + plan["warnings"]
        log("\n## rl.plan\n" + plan.pop("text"))
        report["plan"] = plan

        cfg = load_config(str(BASE_CONFIG), sets)
        log(f"\n## rl.train: {args.steps} NFT steps of {args.groups} x {args.group_size} images, "
            f"{cfg.sampler.method} x {cfg.sampler.steps}, micro-batch {cfg.optim.micro_batch}")
        tracker, captured = PeakTracker(device), {}
        tracker.start()
        tic = time.perf_counter()
        with instrumented(tracker, captured):
            rl.train.run(cfg, out_dir=run_dir)
        run_s = time.perf_counter() - tic
        tracker.finish()
        trainer = captured["trainer"]
        metrics = read_metrics(run_dir / "metrics.jsonl")
        report["time"] = {"run_s": run_s, **time_split(metrics)}
        report["static"] = static_rows(trainer, plan)
        memory: dict[str, Any] = {"phases": tracker.report()}
        if device.type == "cuda":
            free, total = torch.cuda.mem_get_info(device)
            outside = (total - free) - torch.cuda.memory_reserved(device)
            measured = {"allocated_at_start": tracker.start_allocated, "peak_allocated": tracker.peak_allocated, "peak_reserved": tracker.peak_reserved,
                        "peak_outside_phases": tracker.outside_phases, "outside_allocator_at_end": outside,
                        "device_used_at_peak_estimate": tracker.peak_reserved + outside}
            phases = memory["phases"]
            memory.update(
                measured=measured,
                predicted={"total": plan["total_bytes"], "allocator": plan["allocator_bytes"],
                           "runtime_row": plan["runtime_bytes"], "static": plan["static_bytes"],
                           "update_step": plan["update_bytes"], "rollout_step": plan["rollout_bytes"]},
                ratio={"allocated_vs_plan_without_runtime": tracker.peak_allocated / plan["allocator_bytes"],
                       "reserved_vs_plan_without_runtime": tracker.peak_reserved / plan["allocator_bytes"],
                       "device_vs_plan_total": (tracker.peak_reserved + outside) / plan["total_bytes"],
                       "outside_allocator_vs_runtime_row": outside / plan["runtime_bytes"]},
                step_growth={  # what a phase adds to what was allocated when it began, vs the plan's step rows
                    "update": {"measured": phases.get("update", {}).get("growth"), "plan": plan["update_bytes"]},
                    "rollout": {"measured": phases.get("rollout", {}).get("growth"), "plan": plan["rollout_bytes"]},
                    "decode": {"measured": phases.get("decode", {}).get("growth"), "plan": None},
                },
                notes=["growth = a phase's allocator peak less the allocation at its start, the maximum over steps",
                       ("update's growth includes AdamW's state, made at the first optimiser step (the plan's "
                       "static rows count it), and the optimiser step's temporaries (not in the plan)"),
                       "rollout's growth includes its VAE encode and decode (decode: the plan does not count it)"])
        else:
            memory.update(measured=None, skipped=(
                "no CUDA device: a CPU has no allocator peak to read (torch.cuda.max_memory_allocated); only the "
                "static rows (parameters, adapters, copies, AdamW state) are compared with the plan"))
        report["memory"] = memory
        del trainer, captured
    finally:
        if not args.keep:
            shutil.rmtree(work if args.workdir is None else model_dir, ignore_errors=True)
            if args.workdir is not None:
                shutil.rmtree(run_dir, ignore_errors=True)

    summarize(report, log)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    out = args.out or (ROOT / "bench" / "results" / f"gpu_rl_step-{info['slug']}-{date}.json"
                       if device.type == "cuda" else None)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1) + "\n")
        log(f"\nwrote {out}")
    return 0


def summarize(report: dict[str, Any], log) -> None:
    log("\n## static rows: plan vs measured")
    for r in report["static"]:
        log(f"  {r['row']:<15} plan {r['plan_params'] or 0:>14,} params {_gib(r['plan_bytes']):>11}   "
            f"measured {r['measured_params']:>14,} params {_gib(r['measured_bytes']):>11}")
    t = report["time"]
    m = t["median"]
    if m:
        log(f"\n## time split ({t['median_over']}): rollout {m['rollout_s']:.2f} s, judge {m['judge_s']:.2f} s, "
            f"update {m['update_s']:.2f} s = {m['step_s']:.2f} s per step; whole run {t['run_s']:.1f} s")
    mem = report["memory"]
    if mem.get("measured") is None:
        log(f"\n## memory: skipped ({mem['skipped']})")
        return
    ms, pr, ratio = mem["measured"], mem["predicted"], mem["ratio"]
    log(f"\n## memory: peak allocated {_gib(ms['peak_allocated'])}, reserved {_gib(ms['peak_reserved'])}, outside the "
        f"allocator {_gib(ms['outside_allocator_at_end'])}")
    log(f"  plan {_gib(pr['total'])} ({_gib(pr['allocator'])} without its runtime row): allocated / plan = "
        f"{ratio['allocated_vs_plan_without_runtime']:.2f}, device / plan = {ratio['device_vs_plan_total']:.2f}")
    for name, g in mem["step_growth"].items():
        plan = "not in the plan" if g["plan"] is None else _gib(g["plan"])
        log(f"  {name:<8} grows {_gib(g['measured'])} above its start (plan: {plan})")


if __name__ == "__main__":
    sys.exit(main())
