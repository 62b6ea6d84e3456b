"""The run configuration of `python -m rl.train`. Defaults are the built-in CPU job.

Sections: model, data, judge, sampler, nft, refl, grpo, awm, optim, train, dist, monitor. Load with `load_config(path,
overrides)`; every key is typed and checked (core/config/loading.py), and `validate` (rl/plumbing/config_checks.py)
checks every value's range and the paths before any work starts. Each key's one-line meaning is
the second argument of `opt` (core/config/schema.py): `python -m rl.train --help` prints it.
"""
from __future__ import annotations

import dataclasses
from typing import Literal

from core.config.loading import ConfigError, load_yaml  # noqa: F401  (ConfigError re-exported)
from core.config.schema import opt, section
from rl.plumbing.config_checks import validate
from rl.plumbing.model_kinds import BUILTIN_KINDS, INSTRUCTION_KINDS  # noqa: F401  (re-exported)


@dataclasses.dataclass
class LoraConfig:
    """LoRA adapters on the transformer's attention projections."""

    r: int = opt(32, "adapter rank")
    alpha: int = opt(64, "adapter scale numerator: the update is (alpha / r) B A")
    init: str = opt("gaussian", "adapter initialisation: gaussian (A ~ N(0, 1/r), B = 0; DiffusionNFT's), "
                                "default (peft's), true or false (core/policies/lora.py)")
    targets: list[str] = opt(["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                              "to_add_out"], "names of the Linear layers that get adapters")


@dataclasses.dataclass
class ModelConfig:
    """The editing policy being trained."""

    kind: Literal["tiny", "tiny_kontext", "flux_fill", "flux_kontext", "qwen_image_edit"] = opt(
        "tiny", "tiny: the built-in toy FLUX.1 Fill; flux_fill: FLUX.1 Fill [dev] (mask-guided tasks); tiny_kontext: "
                "the built-in toy instruction editor (FLUX.1 Kontext-style); flux_kontext: FLUX.1 Kontext [dev]; "
                "qwen_image_edit: Qwen-Image-Edit (instruction tasks: masks are not used, the whole image is generated)")
    path: str | None = opt(None, "null = the shipped toy of kind tiny / tiny_kontext (core/assets/toy_flux, "
                                 "core/assets/toy_kontext); FLUX, Qwen: local dir or cached Hub id")
    dtype: Literal["float32", "bfloat16", "float16"] = opt("float32", "weights and compute dtype of the policy")
    device: str = opt("auto", '"auto" = cuda when available, else cpu')
    lora: LoraConfig | None = opt(None, "null = full fine-tune of the transformer; set (e.g. model.lora.r=32) "
                                        "to train LoRA adapters (keys model.lora.*)")
    gradient_checkpointing: bool = opt(False, "recompute activations in the backward pass (less memory, slower)")
    attention_backend: str | None = opt(None, "diffusers backend name: native, flash, xformers, ...")
    guidance: float | None = opt(None, "FLUX dev distilled guidance (null = the adapter's default)")
    allow_download: bool = opt(False, "let model.path name a Hub id that is not in the local cache yet")
    true_cfg_scale: float = opt(1.0, "qwen_image_edit: true CFG scale against a blank negative prompt (1 = off, one "
                                     "transformer call per step; the pipeline's default is 4, twice the compute)")


@dataclasses.dataclass
class DataConfig:
    """The editing conditions: the synthetic world or the user's JSONL records."""

    source: Literal["world", "jsonl"] = opt("world", "world: synthetic edits with ground truth; jsonl: data.jsonl")
    jsonl: str | None = opt(None, "records of image / mask / prompt / task (source = jsonl)")
    allow_absolute_paths: bool = opt(False, "jsonl: records may name files outside the JSONL's folder")
    world_seed: int = opt(0, "seed of the synthetic world (its scenes and held-out split)")
    image_size: int = opt(64, "side of the edited images in pixels")
    mixture: dict[str, float] = opt({"fill": 0.4, "extend": 0.2, "removal": 0.2, "text": 0.2},
                                    "sampling weight of each task in the training batches")
    balanced_tasks: bool = opt(False, "each step's conditions hold every task in proportion to data.mixture "
                                      "(rounded; the rest drawn by the fractions); false: drawn independently")


@dataclasses.dataclass
class JudgeConfig:
    """The reward: a rule, a local VLM or an OpenAI-compatible server."""

    kind: Literal["rule", "transformers", "openai"] = opt(
        "rule", "rule: the world's ground truth; transformers: a local VLM; openai: a served VLM")
    # the training reward's question: NFT asks "score" (expected 0-5 digit / 5, Edit-R1) or "yesno"
    # (P(Yes)); ReFL asks "pairwise" (P(policy's image better than the reference's), OneReward). A
    # group algorithm asked pairwise compares each image with one anchor edit of its condition
    # (Trainer.pairwise_anchors): for a judge trained on comparisons only
    mode: Literal["score", "yesno", "pairwise"] = opt(
        "pairwise", "the training reward's question (refl: pairwise, the default job's; nft, grpo, awm: score, yesno, "
                    "or pairwise against one anchor edit per condition, for a judge trained on comparisons only)")
    eval_mode: Literal["score", "yesno", "pairwise"] = opt(
        "score", "held-out evaluations' question (summary, monitor, rl.eval, rl.compare): score / yesno are absolute; "
                 "pairwise = P(the edit beats the base model's edit, same condition and noise), for a judge trained "
                 "on comparisons only (the base scores 0.5; rl.eval: against --against)")
    model: str | None = opt(None, "transformers: local dir, cached Hub id, or builtin:tiny-judge (the shipped "
                                  "pairwise judge of the toy, configs/tiny_onereward.yaml); openai: served model name")
    base_url: str | list[str] | None = opt(
        None, "openai: e.g. http://127.0.0.1:8000/v1, or a list of such URLs (several servers: requests spread over "
              "them, a failing one's retried on the others)")
    api_key_env: str | None = opt(None, "name of the env var holding the API key")
    dtype: str = opt("bfloat16", "transformers: weights dtype of the judge")
    device: str = opt("auto", 'transformers: "auto" = cuda when available, else cpu')
    attn_implementation: str = opt("sdpa", "transformers: attention implementation (sdpa, flash_attention_2, eager)")
    batch_size: int = opt(16, "transformers: queries per forward pass")
    both_orders: bool = opt(True, "pairwise: the judge asks in both orders to cancel position bias (the one "
                                  "place: training rewards and rl.eval's good/same/bad)")
    show_crop: bool = opt(False, "also show the judge a close-up crop around the mask")
    concurrency: int = opt(32, "openai: requests in flight per endpoint (judge.base_url)")
    timeout: float = opt(60.0, "openai: seconds per request")
    retries: int = opt(5, "openai: retries of a failed request")
    templates: str | None = opt(None, "YAML file overriding prompt templates (reward/vlm/prompts.py)")
    tokenizer: str | None = opt(None, "openai: the judge's tokenizer, to send logprob_token_ids to vLLM")
    top_logprobs: int = opt(20, "openai: logprobs per answer position the server returns")
    max_floored_share: float = opt(0.34, "openai: a request fails when more of its labels than this share are "
                                         "missing from the top-k logprobs (floored); raise top_logprobs or set "
                                         "tokenizer")
    max_pixels: int | None = opt(None, "cap on image pixels the VLM sees")
    overlap: bool = opt(False, "nft, grpo, awm: score each rollout chunk (sampler.rollout_chunk) in a background "
                               "thread while the next one is generated: the same results as false, less waiting for "
                               "a served judge or one on its own GPU (the rule judge: only a thread's overhead)")


@dataclasses.dataclass
class SamplerConfig:
    """How the policy samples: rollouts for training and images for evaluation."""

    method: Literal["euler", "dpm2", "sde"] = opt("dpm2", "ODE solver (euler, dpm2) or stochastic sampler (sde)")
    steps: int = opt(8, "rollout steps (training)")
    eval_steps: int = opt(8, "steps for evaluation and sample grids")
    shift: float | None = opt(None, "static time shift; null = the model's default")
    noise_level: float = opt(0.7, "sde only: noise scale of the stochastic steps")
    rollout_chunk: int = opt(0, "nft, grpo, awm: images per rollout batch on each process (0 = its whole share at "
                                "once); each chunk is scored as one judge call, overlapped with judge.overlap")
    # (no true-CFG keys: FLUX.1 Fill [dev] is guidance-distilled and the toy trained with its
    # constant guidance 30; core.sampling.samplers.sample_policy(cfg_scale=, uncond=) offers true CFG to callers)


@dataclasses.dataclass
class NFTConfig:
    """DiffusionNFT (train.algorithm = nft). The group keys (group_size .. filter_rule) also make the
    groups and advantages of grpo and awm."""

    group_size: int = opt(4, "images per condition")
    groups_per_step: int = opt(12, "conditions per step")
    beta: float = opt(1.0, "step of the implicit positive / negative policies, v_old +- beta (v - v_old)")
    adaptive: bool = opt(True, "adaptive (x0-space) weight; false = velocity form")
    kl_coef: float = opt(0.0, "weight of a velocity-space KL penalty to the initial model (0 = off)")
    timestep_fraction: float = opt(0.25, "training times per sample, as a share of the rollout's steps")
    time_sampling: Literal["rollout", "uniform"] = opt(
        "uniform", '"rollout": at the rollout\'s own step times (DiffusionNFT); "uniform": stratified uniform '
                   "times in (0, 1)")
    mask_loss: bool = opt(True, "train only the generated region (the known one is blended)")
    # common random numbers: the noise cancels in the group's gradient (rl/algorithms/nft.py)
    shared_noise: bool = opt(True, "a group's images share training timesteps and noise")
    std: Literal["group", "global"] = opt("group", "advantage scale: the group's score std, or the batch's "
                                                   '("global" = DiffusionNFT\'s code, one task per batch)')
    # DiffusionNFT's 5: with a group's std no advantage is clipped, so r sums to G/2 per group
    clip: float = opt(5.0, "c in r = 1/2 + clip(A, -c, c) / 2c")
    # raise std_eps (e.g. 0.05) so that a group whose scores barely differ gets a small advantage, not noise
    std_eps: float = opt(1e-4, "A = (s - mean) / (std + std_eps)")
    tau_mean: float | None = opt(0.9, "group filter: mean-score threshold (null, with tau_std, = no filter)")
    tau_std: float | None = opt(0.05, "group filter: score-std threshold (null, with tau_mean, = no filter)")
    filter_rule: Literal["paper", "strict"] = opt(
        "paper", "paper: drop a group when mean > tau_mean and std < tau_std; strict: keep it only when "
                 "mean < tau_mean and std > tau_std (the released Edit-R1 code)")
    # 0 (or max 0) = on-policy: the old policy's forward pass is skipped
    old_decay_rate: float = opt(0.003, "old <- d old + (1 - d) current, d = min(rate * step, max)")
    old_decay_max: float = opt(0.5, "the cap of the old policy's decay d")


@dataclasses.dataclass
class GRPOConfig:
    """Flow-GRPO (train.algorithm = grpo); its groups and advantages are nft's group keys."""

    clip_range: float = opt(1e-4, "PPO clip of each step's likelihood ratio to [1 - c, 1 + c] (Flow-GRPO's 1e-4)")
    kl_coef: float = opt(0.0, "weight of Flow-GRPO's KL to the initial model, mean (mu - mu_ref)^2 / (2 sigma_t^2) "
                              "per trained step (0 = off; Flow-GRPO: 0.01-0.04)")
    trained_steps: int = opt(2, "SDE steps trained per image and step (< sampler.steps: the step to t = 0 is "
                                "deterministic)")
    step_selection: Literal["random", "window"] = opt(
        "random", "random: a fresh random subset of the steps each step (Flow-GRPO-Fast); window: consecutive "
                  "steps (MixGRPO)")
    window_shift_every: int = opt(0, "window: move the window one step later every N steps (0 = fixed at the first "
                                     "steps)")
    sde_only_trained: bool = opt(True, "inject noise only at the trained steps, ODE elsewhere (Flow-GRPO-Fast, "
                                       "MixGRPO); false = at every step (Flow-GRPO)")
    mini_batches: int = opt(2, "optimiser steps per step: the images split into this many mini-batches; from the "
                               "second on the ratio is off-policy and clipped")


@dataclasses.dataclass
class AWMConfig:
    """Advantage Weighted Matching (train.algorithm = awm); its groups and advantages are nft's group keys."""

    train_times: int = opt(2, "training times per image, each with fresh noise: rollout step times, stratified")
    timestep_fraction: float = opt(0.9, "the times come from the rollout's steps 1 .. fraction x steps - 1 (AWM's "
                                        "discrete_wo_init)")
    weighting: Literal["uniform", "ghuber"] = opt("ghuber", "per-sample loss: uniform = the flow-matching MSE; "
                                                            "ghuber = t MSE^p / p, AWM's robust weighting")
    ghuber_power: float = opt(0.25, "p of the ghuber weighting")
    advantage_max: float = opt(1.0, "advantages (clipped at nft.clip) are rescaled to [-max, max]")
    kl_coef: float = opt(0.003, "weight of the velocity-space KL to the initial model, mean (v - v_ref)^2 (0 = off)")
    old_kl_coef: float = opt(1.0, "weight of the velocity-space KL to a lagging copy of the policy (AWM's KL-EMA, a "
                                  "trust region; 0 = off)")
    old_decay_rate: float = opt(0.001, "lagging copy: old <- d old + (1 - d) current, d = min(rate * step, max)")
    old_decay_max: float = opt(0.3, "the cap of the lagging copy's decay d")


@dataclasses.dataclass
class ReFLConfig:
    """ReFL with a pairwise judge, OneReward style (train.algorithm = refl)."""

    batch_size: int = opt(16, "conditions per step")
    # Alg. 1 "static": the frozen initial model; Alg. 2 "dynamic": the policy's EMA (the evaluation
    # EMA, train.ema_max_decay), so no separate reference copy is kept
    reference: Literal["static", "dynamic"] = opt("dynamic", "the reference image's model: static = the frozen "
                                                             "initial model, dynamic = the policy's EMA")
    min_step: int = opt(3, "the policy denoises to a random step in [min_step, max_step]")
    max_step: int = opt(6, "the last step the policy may denoise to (< sampler.steps)")
    reward_upper_bound: float = opt(0.9, "loss = relu(bound - P(policy better)); no push beyond it")


@dataclasses.dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule."""

    lr: float = opt(5e-5, "full fine-tune rate of the toy model with ReFL (the default job; NFT, GRPO, AWM: 1e-4); "
                           "LoRA configs use ~3e-4")
    weight_decay: float = opt(1e-4, "AdamW decoupled weight decay")
    betas: list[float] = opt([0.9, 0.999], "AdamW (beta1, beta2)")
    grad_clip: float = opt(1.0, "largest gradient norm; larger gradients are scaled down to it")
    micro_batch: int = opt(0, "samples per forward/backward (0 = the whole batch)")
    warmup_steps: int = opt(0, "linear warm-up steps of the learning rate")
    # a resume that changes train.steps changes the schedule
    decay: Literal["constant", "cosine", "linear"] = opt("constant", "after the warm-up, to min_lr_ratio at the "
                                                                     "last of train.steps")
    min_lr_ratio: float = opt(0.0, "the decayed rate at the last step, as a share of lr")


@dataclasses.dataclass
class TrainConfig:
    """The training loop: algorithm, length, evaluation, checkpoints and logging."""

    algorithm: Literal["nft", "refl", "grpo", "awm"] = opt(
        "refl", "refl: ReFL with a pairwise judge (OneReward; the default job); nft: DiffusionNFT (Edit-R1); grpo: "
                "Flow-GRPO; awm: Advantage Weighted Matching")
    steps: int = opt(300, "optimiser steps")
    seed: int = opt(0, "seed of initialisation, data order and noise")
    time_budget_s: float = opt(0.0, "stop early (with a checkpoint) after this many seconds; 0 = off")
    eval_per_task: int = opt(24, "held-out conditions per task for the base/final summary")
    eval_every: int = opt(0, "held-out evaluation of the EMA every N steps (judge and ground truth into "
                             "metrics.jsonl as heldout/*; 0 = only base and final)")
    sample_every: int = opt(20, "PNG sample grid every N steps")
    checkpoint_every: int = opt(20, "checkpoint every N steps (0 = only at the end)")
    keep_checkpoints: int = opt(2, "the newest checkpoints kept (0 = keep all)")
    ema_max_decay: float = opt(0.9, "evaluation EMA: decay = min((1 + s) / (10 + s), max)")
    max_bad_steps: int = opt(3, "consecutive non-finite losses before the run stops")
    tensorboard: bool = opt(True, "write TensorBoard logs under the run directory")
    # WANDB_MODE=offline works without a network
    tracker: Literal["none", "wandb"] = opt("none", "also log metrics and sample grids to Weights & Biases")
    progress: bool = opt(True, "show a progress bar")
    threads: int = opt(0, "torch CPU threads (0 = torch's default)")


@dataclasses.dataclass
class DistConfig:
    """Many processes under torchrun: how the trained model is spread over them (rl/plumbing/fsdp.py)."""

    strategy: Literal["ddp", "fsdp2"] = opt(
        "ddp", "ddp: every process holds the whole model (DistributedDataParallel); fsdp2: weights, gradients, AdamW "
               "state and the old / EMA / reference copies sharded over the processes (fully_shard on every "
               "transformer block, then the root; sharded checkpoints)")
    param_dtype: Literal["float32", "bfloat16", "float16"] | None = opt(
        None, "fsdp2: dtype the gathered weights compute in (MixedPrecisionPolicy; the shards keep model.dtype); "
              "null = model.dtype")
    reduce_dtype: Literal["float32", "bfloat16", "float16"] | None = opt(
        None, "fsdp2: dtype of the gradients' reduce-scatter; null = the compute dtype")
    cpu_offload: bool = opt(False, "fsdp2: keep weight shards, gradients and AdamW state in CPU memory (CPUOffloadPolicy; "
                                   "AdamW steps on the CPU; the copies then live there too)")
    copies: Literal["device", "cpu"] = opt(
        "device", "fsdp2: where the old / EMA / reference shards live: device (sharded like the weights) or cpu (host "
                  "memory, copied into the weights' shards for each forward that uses them)")


@dataclasses.dataclass
class MonitorConfig:
    """Watching for reward hacking while training (rl/evaluation/monitor.py): the EMA on a fixed held-out
    set, scored by the training judge and by an independent signal; warnings, best model, optional stop."""

    every: int = opt(0, "evaluate the EMA on the monitor's held-out set after every N steps (0 = off); "
                        "independent of train.eval_every")
    # measured on the default run: at 16 per task (32 glyphs) two glyphs flipping read as -0.06 glyph accuracy
    # and, with a 0.05 tolerance, warned twice on text while the full evaluation showed glyphs +0.30
    per_task: int = opt(32, "held-out conditions per task in the monitor's set (the same conditions and noise "
                            "at every evaluation)")
    signal: Literal["truth", "judge"] = opt(
        "truth", "the independent signal: truth = the built-in world's ground truth (fill shape_acc and "
                 "object_iou, extend and removal psnr_mask, text glyph_acc); judge = a second judge, monitor.judge")
    # a JudgeConfig of its own, so any judge (another kind, template, model) can watch the training one
    judge: JudgeConfig | None = opt(None, "signal = judge: the second judge (keys monitor.judge.*, as judge.*); it "
                                          "asks its eval_mode question, like every held-out evaluation")
    window: int = opt(5, "evaluations (the base model's included) over which judge and signal changes are "
                         "measured; from 5 on, one outlying evaluation cannot fire a warning")
    judge_rise: float = opt(0.01, "a warning needs the training judge's held-out reward of a task to rise by more "
                                  "than this over the window")
    drop_fraction: float = opt(0.1, "... and an accuracy / IoU signal of that task (shape_acc, object_iou, "
                                     "glyph_acc) to fall by more than this")
    drop_db: float = opt(0.5, "... or a PSNR signal of that task (psnr_mask) to fall by more than this many dB")
    drop_judge: float = opt(0.01, "... or the second judge's reward of that task (signal = judge) to fall by more "
                                  "than this")
    keep_best: bool = opt(True, "export the EMA to RUN/best/ (with best/best.json) whenever the monitor's score is "
                                "the best so far")
    stop_on_hacking: bool = opt(False, "stop the run (checkpoint saved, exit status 0) at the first warning")


@dataclasses.dataclass
class RefreshConfig:
    """Fine-tuning a learned judge on the policy's own edits while RL runs (rl/algorithms/judge_refresh.py):
    an annotator labels (policy edit, reference edit) pairs per dimension and the judge learns them."""

    # measured (docs/results.md): a judge trained offline ranks the policy's later edits at chance and ReFL
    # games it within tens of steps; OneReward's annotators labelled the model's own outputs
    every: int = opt(0, "refl with a transformers judge: fine-tune the judge every N steps on the newest labelled "
                        "pairs of the policy's edits against the reference's (0 = off)")
    annotator: JudgeConfig | None = opt(None, "who labels the pairs: null = the rule judge (the built-in world's "
                                              "ground truth); or any judge (keys refresh.annotator.*, as judge.*), "
                                              "asked its mode question (score / yesno: both edits, pairwise: the "
                                              "policy's against the reference's)")
    lr: float = opt(5e-4, "AdamW learning rate of the judge's fine-tuning")
    updates: int = opt(2, "optimiser steps of the judge per refresh")
    batch_size: int = opt(8, "labelled pairs per optimiser step (each asked in both orders)")
    buffer: int = opt(256, "the newest labelled (pair, dimension)s kept to draw from (all processes' together)")
    margin: float = opt(0.02, "pairs whose annotator scores differ by less than this are ties, not labelled")
    label_noise: float = opt(0.0, "probability that a label is flipped (a simulated annotator's errors)")


@dataclasses.dataclass
class RunConfig:
    """Everything `python -m rl.train` reads: one YAML file, or defaults plus --set overrides."""

    model: ModelConfig = section(ModelConfig, "the editing policy being trained")
    data: DataConfig = section(DataConfig, "the editing conditions")
    judge: JudgeConfig = section(JudgeConfig, "the reward model")
    sampler: SamplerConfig = section(SamplerConfig, "rollouts and evaluation images")
    nft: NFTConfig = section(NFTConfig, "DiffusionNFT (train.algorithm = nft); its group keys also make grpo's and "
                                        "awm's groups")
    refl: ReFLConfig = section(ReFLConfig, "ReFL (train.algorithm = refl)")
    grpo: GRPOConfig = section(GRPOConfig, "Flow-GRPO (train.algorithm = grpo)")
    awm: AWMConfig = section(AWMConfig, "Advantage Weighted Matching (train.algorithm = awm)")
    optim: OptimConfig = section(OptimConfig, "AdamW and its learning-rate schedule")
    train: TrainConfig = section(TrainConfig, "the training loop")
    dist: DistConfig = section(DistConfig, "many processes under torchrun: DDP or FSDP2")
    monitor: MonitorConfig = section(MonitorConfig, "watching for reward hacking: training judge vs an independent "
                                                    "signal on held-out conditions")
    refresh: RefreshConfig = section(RefreshConfig, "fine-tuning the learned judge on the policy's own edits, labelled "
                                                    "by an annotator, while RL runs")


def load_config(path: str | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Defaults, updated by the YAML file at `path` (if any) and the overrides, then validated."""
    cfg = load_yaml(RunConfig, path, overrides)
    validate(cfg)
    return cfg
