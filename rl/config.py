"""The run configuration of `python -m rl.train`. Defaults are the built-in CPU job.

Sections: model, data, judge, sampler, nft, refl, optim, train. Load with `load_config(path,
overrides)`; every key is typed and checked (rl/config_io.py), and `validate` (rl/config_checks.py)
checks every value's range and the paths before any work starts.
"""
from __future__ import annotations

import dataclasses
from typing import Literal

from .config_checks import validate
from .config_io import ConfigError, load_yaml  # noqa: F401  (ConfigError re-exported)


@dataclasses.dataclass
class LoraConfig:
    r: int = 32
    alpha: int = 64
    init: str = "gaussian"
    targets: list[str] = dataclasses.field(default_factory=lambda: [
        "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"])


@dataclasses.dataclass
class ModelConfig:
    kind: Literal["tiny", "flux_fill"] = "tiny"
    path: str | None = None           # None = the shipped tiny model; FLUX: local dir or cached Hub id
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "auto"              # "auto" = cuda when available, else cpu
    lora: LoraConfig | None = None    # None = full fine-tune of the transformer
    gradient_checkpointing: bool = False
    attention_backend: str | None = None   # diffusers backend name: native, flash, xformers, ...
    guidance: float | None = None     # FLUX dev distilled guidance (None = the adapter's default)
    allow_download: bool = False


@dataclasses.dataclass
class DataConfig:
    source: Literal["world", "jsonl"] = "world"
    jsonl: str | None = None          # records of image / mask / prompt / task (source = jsonl)
    allow_absolute_paths: bool = False  # jsonl: records may name files outside the JSONL's folder
    world_seed: int = 0
    image_size: int = 64
    mixture: dict[str, float] = dataclasses.field(
        default_factory=lambda: {"fill": 0.4, "extend": 0.2, "removal": 0.2, "text": 0.2})


@dataclasses.dataclass
class JudgeConfig:
    kind: Literal["rule", "transformers", "openai"] = "rule"
    # the training reward's question: NFT asks "score" (expected 0-5 digit / 5, Edit-R1) or "yesno"
    # (P(Yes)); ReFL asks "pairwise" (P(policy's image better than the reference's), OneReward)
    mode: Literal["score", "yesno", "pairwise"] = "score"
    eval_mode: Literal["score", "yesno"] = "score"  # absolute scores of held-out evaluations (summary,
                                      # rl.eval); A-vs-B comparisons are always pairwise
    model: str | None = None          # transformers: local dir or cached Hub id; openai: served model name
    base_url: str | None = None       # openai: e.g. http://127.0.0.1:8000/v1
    api_key_env: str | None = None    # name of the env var holding the API key
    dtype: str = "bfloat16"
    device: str = "auto"
    attn_implementation: str = "sdpa"
    batch_size: int = 16
    both_orders: bool = True          # pairwise: the judge asks in both orders to cancel position bias
                                      # (the one place: training rewards and rl.eval's good/same/bad)
    show_crop: bool = False
    concurrency: int = 32
    timeout: float = 60.0
    retries: int = 5
    templates: str | None = None      # YAML file overriding prompt templates (reward/prompts.py)
    tokenizer: str | None = None      # openai: the judge's tokenizer, to send logprob_token_ids to vLLM
    top_logprobs: int = 20
    max_floored_share: float = 0.34   # openai: a request fails when more of its labels than this share are
                                      # missing from the top-k logprobs (floored); raise top_logprobs or set tokenizer
    max_pixels: int | None = None     # cap on image pixels the VLM sees


@dataclasses.dataclass
class SamplerConfig:
    method: Literal["euler", "dpm2", "sde"] = "dpm2"
    steps: int = 8                    # rollout steps (training)
    eval_steps: int = 8               # steps for evaluation and sample grids
    shift: float | None = None        # static time shift; None = the model's default
    noise_level: float = 0.7          # sde only
    # (no true-CFG keys: FLUX.1 Fill [dev] and the tiny model are guidance-distilled or trained
    # without it; core.samplers.sample_policy(cfg_scale=, uncond=) offers true CFG to callers)


@dataclasses.dataclass
class NFTConfig:
    group_size: int = 4               # images per condition
    groups_per_step: int = 12         # conditions per step
    beta: float = 1.0
    adaptive: bool = True             # adaptive (x0-space) weight; False = velocity form
    kl_coef: float = 0.0
    timestep_fraction: float = 0.25   # training times per sample, as a share of the rollout's steps
    time_sampling: Literal["rollout", "uniform"] = "uniform"  # "rollout": at the rollout's own step
                                      # times (DiffusionNFT); "uniform": stratified uniform times in (0, 1)
    mask_loss: bool = True            # train only the generated region (the known one is blended)
    shared_noise: bool = True         # a group's images share training timesteps and noise: common
                                      # random numbers, the noise cancels in the group's gradient (rl/nft.py)
    std: Literal["group", "global"] = "group"  # "global" = DiffusionNFT's code (one task per batch)
    clip: float = 5.0                 # c in r = 1/2 + clip(A, -c, c) / 2c (DiffusionNFT's 5: with a
                                      # group's std no advantage is clipped, so r sums to G/2 per group)
    std_eps: float = 1e-4             # A = (s - mean) / (std + std_eps); raise it (e.g. 0.05) so that a
                                      # group whose scores barely differ gets a small advantage, not noise
    tau_mean: float | None = 0.9
    tau_std: float | None = 0.05
    filter_rule: Literal["paper", "strict"] = "paper"
    old_decay_rate: float = 0.003     # old <- d old + (1 - d) current, d = min(rate * step, max);
                                      # 0 (or max 0) = on-policy: the old policy's forward pass is skipped
    old_decay_max: float = 0.5


@dataclasses.dataclass
class ReFLConfig:
    batch_size: int = 8               # conditions per step
    # Alg. 1 "static": the frozen initial model; Alg. 2 "dynamic": the policy's EMA (the evaluation
    # EMA, train.ema_max_decay), so no separate reference copy is kept
    reference: Literal["static", "dynamic"] = "dynamic"
    min_step: int = 3                 # the policy denoises to a random step in [min_step, max_step]
    max_step: int = 6
    reward_upper_bound: float = 0.9   # loss = relu(bound - P(policy better)); no push beyond it


@dataclasses.dataclass
class OptimConfig:
    lr: float = 1e-4                  # full fine-tune rate of the tiny model; LoRA configs use ~3e-4
    weight_decay: float = 1e-4
    betas: list[float] = dataclasses.field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 1.0
    micro_batch: int = 0              # samples per forward/backward (0 = the whole batch)
    warmup_steps: int = 0
    decay: Literal["constant", "cosine", "linear"] = "constant"  # after the warm-up, to min_lr_ratio
                                      # at the last of train.steps (a resume that changes train.steps
                                      # changes the schedule)
    min_lr_ratio: float = 0.0         # the decayed rate at the last step, as a share of lr


@dataclasses.dataclass
class TrainConfig:
    algorithm: Literal["nft", "refl"] = "nft"
    steps: int = 220
    seed: int = 0
    time_budget_s: float = 0.0        # stop early (with a checkpoint) after this many seconds; 0 = off
    eval_per_task: int = 24           # held-out conditions per task for the base/final summary
    eval_every: int = 0               # held-out evaluation of the EMA every N steps (judge and ground
                                      # truth into metrics.jsonl as heldout/*; 0 = only base and final)
    sample_every: int = 20            # PNG sample grid every N steps
    checkpoint_every: int = 20
    keep_checkpoints: int = 2
    ema_max_decay: float = 0.9        # evaluation EMA: decay = min((1 + s) / (10 + s), max)
    max_bad_steps: int = 3            # consecutive non-finite losses before the run stops
    tensorboard: bool = True
    tracker: Literal["none", "wandb"] = "none"  # also log metrics and sample grids to Weights & Biases
                                      # (WANDB_MODE=offline works without a network)
    progress: bool = True
    threads: int = 0                  # torch CPU threads (0 = torch's default)


@dataclasses.dataclass
class RunConfig:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    judge: JudgeConfig = dataclasses.field(default_factory=JudgeConfig)
    sampler: SamplerConfig = dataclasses.field(default_factory=SamplerConfig)
    nft: NFTConfig = dataclasses.field(default_factory=NFTConfig)
    refl: ReFLConfig = dataclasses.field(default_factory=ReFLConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)


def load_config(path: str | None = None, overrides: list[str] | None = None) -> RunConfig:
    cfg = load_yaml(RunConfig, path, overrides)
    validate(cfg)
    return cfg

