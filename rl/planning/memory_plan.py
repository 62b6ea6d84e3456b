"""The per-GPU memory of a run config, row by row, as the code keeps it today.

- FluxFillPolicy moves the whole pipeline to the GPU in model.dtype: transformer, both text
  encoders and the VAE (core/policies/flux_fill.py);
- a full fine-tune trains the transformer in model.dtype; LoRA trains only peft adapters, kept in
  float32 (core/policies/policy.py `add_lora`);
- the Trainer clones the trainable weights three times, old, EMA and reference, for both
  algorithms (rl/algorithms/trainer.py), in the trainable weights' dtype;
- torch.optim.AdamW keeps exp_avg and exp_avg_sq in the parameters' dtype; gradients too;
  under DDP (more than one GPU) the reducer's buckets hold one more copy of the gradients;
- the step's peak is the update: gradients, the activations of one micro-batch
  (rl/planning/flux_activations.py) and the backward's working memory; the rollout (no gradients,
  all of the GPU's images at once, or sampler.rollout_chunk of them) is compared and the larger counts;
- an in-process judge (judge.kind=transformers) sits on the same GPU unless judge.device=cpu.
DDP replicates all of it on every GPU. FSDP2 (dist.strategy=fsdp2, rl/plumbing/fsdp.py) on N GPUs
divides the transformer's weights, the trainable weights, their three copies, AdamW's state and the
gradients by N (each GPU holds 1/N of every tensor); it adds the weights gathered for compute (the
root's own and two blocks: the one running and the next, prefetched) and one block's unsharded
gradients before their reduce-scatter. dist.cpu_offload moves the shards, gradients and AdamW state
to host memory, dist.copies=cpu the copies; the text encoders and the VAE stay whole on every GPU.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from rl.planning.architectures import (
    QWEN_TEXT_OVERHEAD,
    PipelineArchitecture,
    PlanError,
    pipeline_architecture,
    vlm_architecture,
)
from rl.planning.flux_activations import (
    Batch,
    FluxDims,
    Training,
    backward_working_bytes,
    no_grad_peak_bytes,
    saved_bytes,
)
from rl.planning.meta_models import (
    count_component,
    count_flux_blocks,
    count_lora,
    count_vlm,
)
from rl.plumbing.config import RunConfig
from rl.plumbing.model_kinds import KINDS

GIB = 1024**3
#: CUDA context, cuBLAS / NCCL workspaces and caching-allocator slack: a typical value, not computed
RUNTIME_OVERHEAD = 1 * GIB
#: a plan "fits" below this share of the GPU (allocator fragmentation needs the rest)
HEADROOM = 0.9
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_PART_LABELS = {"transformer": "transformer", "text_encoder": "text encoder",
                "text_encoder_2": "text encoder 2", "vae": "VAE"}


def human_bytes(n: float) -> str:
    """1.23 GiB / 45.6 MiB / 7.8 KiB / 12 B."""
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of the table: what it is, its bytes per GPU, and its parameters when it has some."""

    group: str          # weights | training | judge | step | runtime
    label: str
    bytes: int
    params: int | None = None
    dtype: str = ""


@dataclasses.dataclass
class MemoryPlan:
    """A run config's rows per GPU, their total against the GPU memory, and what was assumed."""

    gpus: int
    gpu_memory_gib: float
    header: list[str]
    rows: list[Row]
    notes: list[str]
    warnings: list[str] = dataclasses.field(default_factory=list)
    advice: list[str] = dataclasses.field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(r.bytes for r in self.rows)

    @property
    def gpu_bytes(self) -> float:
        return self.gpu_memory_gib * GIB

    @property
    def verdict(self) -> str:
        """fits (under HEADROOM of the GPU), tight (under all of it) or does not fit."""
        if self.total_bytes <= HEADROOM * self.gpu_bytes:
            return "fits"
        return "tight" if self.total_bytes <= self.gpu_bytes else "does not fit"

    def row(self, label_start: str) -> Row:
        return next(r for r in self.rows if r.label.startswith(label_start))


@dataclasses.dataclass(frozen=True)
class StepShape:
    """How many images a GPU handles at once in the rollout and in one backward pass."""

    images_per_step: int
    per_gpu: int
    micro_batch: int
    image_tokens: int
    text_tokens: int
    rollout: int = 0                  # images sampled at once (sampler.rollout_chunk); 0 = per_gpu


def dtype_of(name: str, key: str) -> torch.dtype:
    from reward.vlm.vlm_parts import resolve_dtype

    try:
        return resolve_dtype(name)
    except ValueError as err:
        raise PlanError(f"{key}: {err}") from None


def step_shape(cfg: RunConfig, arch: PipelineArchitecture, gpus: int) -> tuple[StepShape, list[str]]:
    """The per-GPU batch of the rollout and of the update (NFT micro-batches, ReFL does not)."""
    warnings = []
    if cfg.train.algorithm != "refl":  # nft, grpo, awm: K groups of G images
        images = cfg.nft.groups_per_step * cfg.nft.group_size
    else:
        images = cfg.refl.batch_size
    if images % gpus:
        warnings.append(f"rl.train would refuse this: {images} images per step cannot be split evenly over {gpus} "
                        "processes (the plan rounds the share up)")
    per_gpu = math.ceil(images / gpus)
    micro = min(cfg.optim.micro_batch or per_gpu, per_gpu) if cfg.train.algorithm != "refl" else per_gpu
    side = cfg.data.image_size // arch.latent_factor()
    rollout = min(cfg.sampler.rollout_chunk or per_gpu, per_gpu) if cfg.train.algorithm != "refl" else per_gpu
    # Kontext and Qwen-Image-Edit append the source image's tokens to the generated ones: every block sees both
    streams = 2 if KINDS[cfg.model.kind].appends_source else 1
    return (StepShape(images, per_gpu, micro, streams * side * side, arch.text_tokens_at(cfg.data.image_size), rollout),
            warnings)


def shards(cfg: RunConfig, gpus: int) -> int:
    """How many ways FSDP2 divides the sharded rows (1: not sharded, DDP or one GPU)."""
    return gpus if cfg.dist.strategy == "fsdp2" and gpus > 1 else 1


def _per_gpu(n: int, ways: int) -> int:
    return -(-n // ways)  # FSDP2 pads every tensor's shards to equal size: the ceiling


def compute_dtype(cfg: RunConfig) -> torch.dtype:
    """The dtype the transformer computes in: dist.param_dtype under FSDP2 when set, else model.dtype."""
    d = cfg.dist
    return _DTYPES[d.param_dtype] if d.strategy == "fsdp2" and d.param_dtype else _DTYPES[cfg.model.dtype]


def _training(cfg: RunConfig) -> Training:
    lora = cfg.model.lora
    return Training() if lora is None else Training(frozenset(lora.targets), lora.r, torch.float32)


def _weights_and_training_rows(cfg: RunConfig, arch: PipelineArchitecture, dtype: torch.dtype,
                               gpus: int) -> tuple[list[Row], int, torch.dtype]:
    """The pipeline's weights, then the trainable weights, their copies, AdamW state and DDP
    buckets (FSDP2: the sharded rows divided by the GPUs, and the weights gathered for compute).
    Returns the rows, the trainable count and its dtype."""
    rows = []
    ways, d = shards(cfg, gpus), cfg.dist
    host = ways > 1 and d.cpu_offload  # the shards, gradients and AdamW state live in host memory
    for part in arch.components:
        count = count_component(part, dtype)
        label = f"{_PART_LABELS[part.name]} ({count.class_name})"
        params, size = count.params, count.bytes
        if part.name == "transformer" and ways > 1:
            label += " in host memory (dist.cpu_offload)" if host else f", 1/{ways} shard"
            params, size = _per_gpu(params, ways), 0 if host else _per_gpu(size, ways)
        rows.append(Row("weights", label, size, params, str(dtype).removeprefix("torch.")))
    if ways > 1:
        blocks = count_flux_blocks(arch.part("transformer"))
        gathered = blocks.root_own + 2 * blocks.largest_block
        cdt = compute_dtype(cfg)
        rows.append(Row("weights", "FSDP2: gathered for compute (root's own + 2 blocks)", gathered * cdt.itemsize,
                        gathered, str(cdt).removeprefix("torch.")))
    lora = cfg.model.lora
    if lora is None:
        trainable = count_component(arch.part("transformer"), dtype).params
        train_dtype = dtype
        rows.append(Row("training", "trainable: the whole transformer (its weights above)", 0, trainable,
                        str(dtype).removeprefix("torch.")))
    else:
        adapters = count_lora(arch.part("transformer"), lora.r, lora.alpha, tuple(lora.targets), lora.init)
        trainable, train_dtype = adapters.params, torch.float32
        rows.append(Row("training", f"trainable: LoRA r={lora.r} on {adapters.layers} Linears", trainable * 4,
                        trainable, "float32"))
    size, name = train_dtype.itemsize, str(train_dtype).removeprefix("torch.")
    if ways > 1 and lora is not None:  # the adapters are sharded like the rest (the row above is whole)
        rows[-1] = dataclasses.replace(rows[-1], label=rows[-1].label + (" in host memory" if host else
                                                                         f", 1/{ways} shard"),
                                       params=_per_gpu(trainable, ways),
                                       bytes=0 if host else _per_gpu(trainable * 4, ways))
    copies_host = ways > 1 and (host or d.copies == "cpu")
    copies, adam = _per_gpu(3 * trainable, ways), _per_gpu(2 * trainable, ways)
    shard = "" if ways == 1 else f", 1/{ways} shard"
    rows += [Row("training", "copies: old, EMA, reference (3 x trainable)" + (" in host memory" if copies_host
                                                                              else shard),
                 0 if copies_host else copies * size, copies, name),
             Row("training", "AdamW exp_avg + exp_avg_sq (2 x trainable)" + (" in host memory" if host else shard),
                 0 if host else adam * size, adam, name)]
    if gpus > 1 and ways == 1:
        rows.append(Row("training", "DDP gradient buckets (1 x trainable)", trainable * size, trainable, name))
    return rows, trainable, train_dtype


def _judge_rows(cfg: RunConfig, gpus: int) -> tuple[list[Row], list[str], list[str]]:
    """The in-process judge's weights on this GPU; header and warning lines about where it runs."""
    j = cfg.judge
    if j.kind == "rule":
        return [], ["judge    rule (the synthetic world's ground truth): no GPU memory"], []
    if j.kind == "openai":
        return [], [f"judge    {j.model} served at {j.base_url}: on its own GPUs, not these"], []
    dtype = dtype_of(j.dtype, "judge.dtype")
    arch = vlm_architecture(j.model)
    count = count_vlm(arch, dtype)
    name = str(dtype).removeprefix("torch.")
    header = [f"judge    {j.model} in-process, {name}; architecture from {arch.source}"]
    if j.device == "cpu":
        return [Row("judge", f"judge ({count.class_name}) on the CPU", 0, count.params, name)], header, []
    warnings = []
    if j.device not in ("auto", "cuda") and gpus > 1:
        warnings.append(f"judge.device={j.device}: every one of the {gpus} processes loads its judge on that one GPU "
                        "(use auto: each process's own GPU)")
    return [Row("judge", f"judge ({count.class_name})", count.bytes, count.params, name)], header, warnings


def _step_rows(cfg: RunConfig, dims: FluxDims, shape: StepShape, dtype: torch.dtype, trainable: int,
               train_dtype: torch.dtype, arch: PipelineArchitecture, gpus: int) -> tuple[list[Row], str]:
    """The step's peak: the update (gradients, activations, backward working memory) or the
    rollout (no gradients, all of the GPU's images at once or sampler.rollout_chunk of them), whichever is
    larger; and a note on the other."""
    m = cfg.model
    batch = Batch(shape.micro_batch, shape.image_tokens, shape.text_tokens, dtype, m.gradient_checkpointing)
    activations = saved_bytes(dims, _training(cfg), batch)
    working = backward_working_bytes(dims, _training(cfg), batch)
    ways = shards(cfg, gpus)
    grads = 0 if ways > 1 and cfg.dist.cpu_offload else _per_gpu(trainable, ways) * train_dtype.itemsize
    block_grads = 0
    if ways > 1:  # one block's gradients, whole, between its backward and its reduce-scatter
        blocks = count_flux_blocks(arch.part("transformer"))
        total = blocks.root_own + blocks.blocks * blocks.largest_block
        block_grads = -(-trainable * blocks.largest_block // max(total, 1)) * train_dtype.itemsize
    update = grads + block_grads + activations + working
    at_once = shape.rollout or shape.per_gpu
    rollout = no_grad_peak_bytes(dims, at_once, shape.image_tokens, shape.text_tokens, dtype)
    name, train_name = str(dtype).removeprefix("torch."), str(train_dtype).removeprefix("torch.")
    if update >= rollout:
        kind = "micro-batch" if cfg.train.algorithm != "refl" else "batch"
        ckpt = "checkpointed" if m.gradient_checkpointing else "not checkpointed"
        shard = "" if ways == 1 else (" in host memory" if cfg.dist.cpu_offload else f", 1/{ways} shard")
        rows = [Row("step", f"gradients (1 x trainable){shard}", grads, _per_gpu(trainable, ways), train_name)]
        if ways > 1:
            rows.append(Row("step", "FSDP2: one block's gradients before its reduce-scatter", block_grads, None,
                            train_name))
        rows += [Row("step", f"activations: {kind} {shape.micro_batch}, {ckpt}", activations, None, name),
                 Row("step", "backward working memory (estimate)", working, None, name)]
        return rows, (f"the step's peak is the update; the rollout (no gradients, {at_once} images at once) "
                      f"needs {human_bytes(rollout)} at its peak instead")
    rows = [Row("step", f"rollout peak: {at_once} images at once, no gradients (estimate)", rollout, None,
                name)]
    what = (f"all {shape.per_gpu} images of the GPU at once (optim.micro_batch splits only the update; "
            "sampler.rollout_chunk splits the rollout)" if at_once == shape.per_gpu
            else f"{at_once} of the GPU's {shape.per_gpu} images at once (sampler.rollout_chunk)")
    return rows, (f"the step's peak is the rollout, which samples {what}; the update (gradients, activations of "
                  f"micro-batch {shape.micro_batch}, backward) needs {human_bytes(update)} instead")


def _header(cfg: RunConfig, arch: PipelineArchitecture, shape: StepShape, gpus: int) -> list[str]:
    """What is planned: the policy, then (added by the caller) the judge, then the step's split."""
    m, algo = cfg.model, cfg.train.algorithm
    split = (f"{cfg.nft.groups_per_step} x {cfg.nft.group_size}" if algo != "refl" else "refl.batch_size") + \
        f" = {shape.images_per_step} images / {gpus} GPU{'s' if gpus > 1 else ''} = {shape.per_gpu} per GPU"
    lora = "full fine-tune" if m.lora is None else f"LoRA r={m.lora.r}"
    checkpointing = "on" if m.gradient_checkpointing else "off"
    d = cfg.dist
    fsdp = "" if shards(cfg, gpus) == 1 else (
        f", FSDP2 over {gpus} GPUs (compute {str(compute_dtype(cfg)).removeprefix('torch.')}"
        f"{', CPU offload' if d.cpu_offload else ''}{', copies in host memory' if d.copies == 'cpu' else ''})")
    name = {"kontext": "FLUX.1 Kontext", "qwen": "Qwen-Image-Edit"}.get(KINDS[m.kind].family, "FLUX.1 Fill")
    return [(f"policy   {name}, {m.dtype}, {lora}, gradient checkpointing {checkpointing}{fsdp}; "
             f"architecture from {arch.source}"),
            (f"step     {algo}: {split}; backward on {shape.micro_batch} x ({shape.image_tokens} image + "
             f"{shape.text_tokens} text tokens)" + ("" if algo != "refl" else " (ReFL has no micro-batches)"))]


def _notes(cfg: RunConfig, gpus: int, step_note: str) -> list[str]:
    every = f"each of the {gpus} GPUs" if gpus > 1 else "under torchrun, every GPU"
    if shards(cfg, gpus) > 1:
        split = (f"FSDP2 (dist.strategy=fsdp2) divides the rows marked 1/{gpus} over the {gpus} GPUs and gathers "
                 "the weights one block at a time for compute; the text encoders, the VAE and the activations "
                 "are per GPU. A forward with a weight copy (old policy, reference, EMA) stashes the trained "
                 "weights' shards meanwhile: one more set of trainable shards during rollouts and evaluations.")
    elif cfg.dist.strategy == "fsdp2":
        split = "dist.strategy=fsdp2 on one GPU has nothing to shard: every row is whole, as under DDP."
    else:
        split = (f"DDP replicates everything: {every} holds every row (more GPUs add throughput; they shrink only "
                 "the per-GPU batch). dist.strategy=fsdp2 shards the transformer and the training state.")
    notes = [
        split,
        step_note + ".",
        ("activations: rl/planning/flux_activations.py, checked against a measured forward in "
         "tests/rl/test_plan.py; flash / memory-efficient attention assumed (eager attention adds "
         "batch x heads x tokens^2)."),
        ("not counted: VAE encode / decode and the judge's forward (judge.batch_size queries), "
         "optimiser-step temporaries."),
    ]
    if KINDS[cfg.model.kind].family == "qwen":
        notes.append(f"Qwen-Image-Edit's text tokens: Qwen2.5-VL reads the source image ((side / 28)^2 tokens at "
                     f"data.image_size) with the instruction; {QWEN_TEXT_OVERHEAD} more are assumed for the template's "
                     "tail and an instruction of up to ~50 tokens. The text encoder's own forward is not counted.")
    if cfg.train.algorithm == "refl":
        notes.append("ReFL back-propagates through the VAE decoder and the judge: their activations are "
                     "not counted, so this total is a lower bound.")
    return notes


def make_plan(cfg: RunConfig, gpus: int = 1, gpu_memory_gib: float = 80.0) -> MemoryPlan:
    """The plan of `cfg` on `gpus` GPUs of `gpu_memory_gib` GiB each (no advice: planning.advice)."""
    if gpus < 1 or gpu_memory_gib <= 0:
        raise PlanError(f"need at least one GPU with some memory, got {gpus} x {gpu_memory_gib} GiB")
    m = cfg.model
    dtype = _DTYPES[m.dtype]
    arch = pipeline_architecture(m.path, m.kind)
    shape, warnings = step_shape(cfg, arch, gpus)
    rows, trainable, train_dtype = _weights_and_training_rows(cfg, arch, dtype, gpus)
    judge_rows, judge_header, judge_warnings = _judge_rows(cfg, gpus)
    dims = FluxDims.from_config(arch.part("transformer").config, arch.part("transformer").class_name)
    step_rows, step_note = _step_rows(cfg, dims, shape, compute_dtype(cfg), trainable, train_dtype, arch, gpus)
    rows += judge_rows + step_rows
    rows.append(Row("runtime", "CUDA context, cuBLAS / NCCL workspaces (typical)", RUNTIME_OVERHEAD))
    warnings += judge_warnings
    if m.device == "cpu":
        warnings.append("model.device=cpu: this plan is for CUDA GPUs")
    header = _header(cfg, arch, shape, gpus)
    header[1:1] = judge_header
    return MemoryPlan(gpus, gpu_memory_gib, header, rows, _notes(cfg, gpus, step_note), warnings)
