"""Every value check of a run config, in one place, before any work starts.

`NUMERIC_RANGES` gives the allowed range of every number in `RunConfig` (a test asserts that no
numeric key is missing from it, so a new key must declare its range; `Range` is shared with the
other entry points, core/config/schema.py); `validate` applies them and then the checks that relate
several keys (paths, algorithm / judge combinations). Each error names the key, the allowed range
and the value.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from core.config.loading import ConfigError
from core.config.schema import POSITIVE as _POSITIVE
from core.config.schema import UNIT as _UNIT
from core.config.schema import Range, numeric_values  # noqa: F401  (re-exported)
from core.config.schema import at_least as _at_least
from core.config.schema import check_ranges as _check_ranges
from core.tasks import ALL_TASKS, INSTRUCTION_TASKS, TASKS
from reward.vlm.vlm_parts import resolve_dtype
from rl.plumbing.model_kinds import BUILTIN_KINDS, INSTRUCTION_KINDS

_DECAY = Range(0, 1, open_hi=True, note="1 would freeze the copy")

#: allowed values of every numeric config key ("section.key"; a list's items share its range)
NUMERIC_RANGES: dict[str, Range] = {
    "model.guidance": _at_least(0),
    "model.true_cfg_scale": Range(1, 30, note="1 = off"),
    "model.lora.r": _at_least(1),
    "model.lora.alpha": _POSITIVE,
    "data.world_seed": _at_least(0),
    "data.image_size": Range(16, 4096, note="a multiple of 16"),
    "data.mixture": _at_least(0, "task weights; at least one > 0"),
    "judge.batch_size": _at_least(1),
    "judge.concurrency": Range(1, 1024),
    "judge.timeout": _POSITIVE,
    "judge.retries": Range(0, 100),
    "judge.top_logprobs": Range(1, 100),
    "judge.max_pixels": _at_least(28 * 28),
    "judge.max_floored_share": _UNIT,
    "sampler.steps": Range(1, 1000),
    "sampler.eval_steps": Range(1, 1000),
    "sampler.shift": _POSITIVE,
    "sampler.noise_level": Range(0, 2, note="SDE noise scale; ~0.7 in Flow-GRPO"),
    "sampler.rollout_chunk": _at_least(0, "0 = each process's whole share at once"),
    "nft.group_size": _at_least(2, "group statistics need two images"),
    "nft.groups_per_step": _at_least(1),
    "nft.beta": _POSITIVE,
    "nft.kl_coef": _at_least(0),
    "nft.timestep_fraction": Range(0, 1, open_lo=True),
    "nft.clip": _POSITIVE,
    "nft.std_eps": _POSITIVE,
    "nft.tau_mean": _UNIT,
    "nft.tau_std": _at_least(0),
    "nft.old_decay_rate": Range(0, 1),
    "nft.old_decay_max": _DECAY,
    "grpo.clip_range": Range(0, 1, open_hi=True, note="1e-4 in Flow-GRPO"),
    "grpo.kl_coef": _at_least(0),
    "grpo.trained_steps": _at_least(1, "and < sampler.steps"),
    "grpo.window_shift_every": _at_least(0, "0 = a fixed window"),
    "grpo.mini_batches": _at_least(1, "a divisor of the step's images"),
    "awm.train_times": _at_least(1),
    "awm.timestep_fraction": Range(0, 1, open_lo=True),
    "awm.ghuber_power": Range(0, 1, open_lo=True, note="AWM: 0.25"),
    "awm.advantage_max": _POSITIVE,
    "awm.kl_coef": _at_least(0),
    "awm.old_kl_coef": _at_least(0),
    "awm.old_decay_rate": Range(0, 1),
    "awm.old_decay_max": _DECAY,
    "refl.batch_size": _at_least(1),
    "refl.min_step": _at_least(1),
    "refl.max_step": _at_least(1),
    "refl.reward_upper_bound": Range(0, 1, open_lo=True),
    "optim.lr": Range(0, 1, open_lo=True),
    "optim.weight_decay": _UNIT,
    "optim.betas": Range(0, 1, open_hi=True),
    "optim.grad_clip": Range(0, open_lo=True, note="the largest gradient norm; a huge value turns clipping off"),
    "optim.micro_batch": _at_least(0, "0 = the whole batch"),
    "optim.warmup_steps": _at_least(0),
    "optim.min_lr_ratio": _UNIT,
    "train.steps": _at_least(1),
    "train.seed": _at_least(0),
    "train.time_budget_s": _at_least(0, "0 = off"),
    "train.eval_per_task": _at_least(0),
    "train.eval_every": _at_least(0, "0 = off"),
    "train.sample_every": _at_least(0, "0 = off"),
    "train.checkpoint_every": _at_least(0, "0 = only at the end"),
    "train.keep_checkpoints": _at_least(0, "0 = keep all"),
    "train.ema_max_decay": _DECAY,
    "train.max_bad_steps": _at_least(1),
    "train.threads": _at_least(0, "0 = torch's default"),
    "monitor.every": _at_least(0, "0 = off"),
    "monitor.per_task": _at_least(1),
    "monitor.window": _at_least(2, "evaluations; from 5 on one outlying evaluation cannot fire a warning"),
    "monitor.judge_rise": _at_least(0),
    "monitor.drop_fraction": _UNIT,
    "monitor.drop_db": _at_least(0),
    "monitor.drop_judge": _UNIT,
    "refresh.every": _at_least(0, "0 = off"),
    "refresh.lr": Range(0, 1, open_lo=True),
    "refresh.updates": _at_least(1),
    "refresh.batch_size": _at_least(1),
    "refresh.buffer": _at_least(1),
    "refresh.margin": _UNIT,
    "refresh.label_noise": Range(0, 0.5, note="0.5 = labels carry no signal"),
}
# the monitor's second judge (monitor.judge.*) and the refresh's annotator take the training judge's ranges
NUMERIC_RANGES.update({f"{section}.{k.removeprefix('judge.')}": r for k, r in list(NUMERIC_RANGES.items())
                       if k.startswith("judge.") for section in ("monitor.judge", "refresh.annotator")})




def check_ranges(cfg: Any) -> None:
    """Every number of the run config inside its NUMERIC_RANGES entry (ConfigError naming the key)."""
    _check_ranges(cfg, NUMERIC_RANGES, "rl/plumbing/config_checks.py NUMERIC_RANGES")


def validate(cfg) -> None:
    """Value checks that types cannot express; raises ConfigError naming the key and the fix."""
    check_ranges(cfg)
    if cfg.data.image_size % 16:
        raise ConfigError(f"data.image_size must be a multiple of 16 (packed latents), got {cfg.data.image_size}")
    if len(cfg.optim.betas) != 2:
        raise ConfigError(f"optim.betas must hold two numbers (beta1, beta2), got {cfg.optim.betas}")
    if cfg.train.eval_every and not cfg.train.eval_per_task:
        raise ConfigError("train.eval_every needs held-out conditions: set train.eval_per_task > 0")
    if (cfg.nft.tau_mean is None) != (cfg.nft.tau_std is None):
        raise ConfigError("the group filter needs both nft.tau_mean and nft.tau_std, or neither (null) to "
                          f"switch it off; got {cfg.nft.tau_mean} / {cfg.nft.tau_std}")
    if cfg.data.source == "jsonl":
        if not cfg.data.jsonl:
            raise ConfigError("data.source is 'jsonl' but data.jsonl is not set: give the JSONL file path")
        if not Path(cfg.data.jsonl).is_file():
            raise ConfigError(f"data.jsonl file not found: {cfg.data.jsonl}")
    if cfg.train.algorithm == "refl" and not 1 <= cfg.refl.min_step <= cfg.refl.max_step < cfg.sampler.steps:
        raise ConfigError(
            f"refl.min_step/max_step must satisfy 1 <= min <= max < sampler.steps ({cfg.sampler.steps}); "
            f"got {cfg.refl.min_step}/{cfg.refl.max_step}")
    if cfg.train.algorithm == "refl" and cfg.judge.mode != "pairwise":
        raise ConfigError("train.algorithm 'refl' compares against a reference image: set judge.mode=pairwise")
    _check_group_algorithms(cfg)
    _check_rollout_chunks(cfg)
    _check_device(cfg.model.device, "model.device")
    _check_judge(cfg.judge, "judge", cfg.data.source)
    if cfg.model.kind in ("flux_fill", "flux_kontext", "qwen_image_edit") and not cfg.model.path:
        raise ConfigError(f"model.kind {cfg.model.kind!r} needs model.path (a local directory or a cached Hub id)")
    if cfg.model.true_cfg_scale != 1 and cfg.model.kind != "qwen_image_edit":
        raise ConfigError(f"model.true_cfg_scale applies to model.kind qwen_image_edit (FLUX models are guidance-"
                          f"distilled: model.guidance); leave it at 1 for {cfg.model.kind!r}")
    if cfg.model.kind in BUILTIN_KINDS and cfg.model.path and not Path(cfg.model.path).exists():
        raise ConfigError(f"model.path not found: {cfg.model.path}")
    _check_tasks(cfg)
    _check_monitor(cfg)
    _check_refresh(cfg)
    _check_dist(cfg)


def _check_tasks(cfg) -> None:
    """data.mixture: known tasks, some weight, and tasks the model can do: a mask-guided editor
    (tiny, flux_fill) is told where to edit, an instruction editor (tiny_kontext, flux_kontext,
    qwen_image_edit) is not, so each trains on its own kind of task."""
    for task in cfg.data.mixture:
        if task not in ALL_TASKS:
            raise ConfigError(f"data.mixture: unknown task {task!r}; tasks are {list(ALL_TASKS)}")
    if sum(cfg.data.mixture.values()) <= 0:
        raise ConfigError("data.mixture gives every task zero weight")
    instruction = cfg.model.kind in INSTRUCTION_KINDS
    wanted = INSTRUCTION_TASKS if instruction else TASKS
    wrong = [t for t, w in cfg.data.mixture.items() if w > 0 and t not in wanted]
    if wrong:
        kind = ("an instruction editor (no mask: the edit is found from the words)" if instruction
                else "a mask-guided editor (it is given the region to edit)")
        raise ConfigError(f"data.mixture: model.kind {cfg.model.kind!r} is {kind} and cannot train on {wrong}; "
                          f"its tasks are {list(wanted)}"
                          + ("" if instruction else " (instruction tasks need model.kind tiny_kontext, flux_kontext "
                                                    "or qwen_image_edit)"))


def _check_dist(cfg) -> None:
    """dist.*: the FSDP2 keys need dist.strategy=fsdp2, and FSDP2 runs without the rank-0-only monitor."""
    d = cfg.dist
    if d.strategy == "ddp":
        used = [f"dist.{k}={v}" for k, v in (("param_dtype", d.param_dtype), ("reduce_dtype", d.reduce_dtype))
                if v is not None]
        used += ["dist.cpu_offload=true"] if d.cpu_offload else []
        used += ["dist.copies=cpu"] if d.copies == "cpu" else []
        if used:
            raise ConfigError(f"{', '.join(used)} only applies to sharded training: set dist.strategy=fsdp2, or leave "
                              "these keys at their defaults for DDP")
        return
    if cfg.monitor.every:
        raise ConfigError("monitor.every is not supported with dist.strategy=fsdp2 yet: the monitor evaluates and "
                          "exports on rank 0 alone, and every forward of a sharded model needs all processes; set "
                          "monitor.every=0 (train.eval_every still evaluates on held-out conditions), or use "
                          "dist.strategy=ddp")


def _check_refresh(cfg) -> None:
    """refresh.* (only when on): a judge that can learn (in-process), an algorithm that gives it pairs, an
    annotator that can label them."""
    r = cfg.refresh
    if not r.every:
        if r.annotator is not None:
            raise ConfigError("refresh.annotator is set but refresh.every is 0, so nothing would ask it: set "
                              "refresh.every=N, or remove refresh.annotator")
        return
    if cfg.judge.kind != "transformers":
        raise ConfigError(f"refresh.every fine-tunes the judge, which must run in-process: judge.kind is "
                          f"{cfg.judge.kind!r}; use judge.kind=transformers, or refresh.every=0")
    if cfg.train.algorithm != "refl":
        raise ConfigError(f"refresh.every labels the policy's edits against ReFL's reference edits: train.algorithm "
                          f"is {cfg.train.algorithm!r}; use train.algorithm=refl, or refresh.every=0")
    if cfg.dist.strategy == "fsdp2":
        raise ConfigError("refresh.every is not supported with dist.strategy=fsdp2 yet: use dist.strategy=ddp, or "
                          "refresh.every=0")
    if cfg.judge.eval_mode != "pairwise":
        # pairwise evaluations compare each edit with the base's by the judge of that moment; an absolute score
        # of the base, taken before the judge moved, would be compared with scores of a judge that has moved
        raise ConfigError(f"refresh.every teaches the judge the pairwise question, so held-out evaluations must ask it "
                          f"too: judge.eval_mode is {cfg.judge.eval_mode!r}; set judge.eval_mode=pairwise")
    if resolve_dtype(cfg.judge.dtype) not in (torch.float32, torch.float64):
        raise ConfigError(f"refresh.every trains the judge with AdamW on its own weights, and in {cfg.judge.dtype} "
                          "small updates round away: set judge.dtype=float32")
    if r.annotator is None:
        if cfg.data.source != "world":
            raise ConfigError(f"refresh.annotator null means the rule judge, which needs the built-in world's ground "
                              f"truth (data.source is {cfg.data.source!r}): name an annotator, e.g. --set "
                              "refresh.annotator.kind=openai --set refresh.annotator.base_url=URL --set "
                              "refresh.annotator.model=NAME")
        return
    _check_judge(r.annotator, "refresh.annotator", cfg.data.source)
    if r.annotator.mode == "pairwise" and r.margin >= 0.5:
        raise ConfigError(f"refresh.margin {r.margin} labels nothing with a pairwise annotator (its answer is within "
                          "0.5 of a tie): lower refresh.margin")
    if r.annotator.overlap:
        raise ConfigError("refresh.annotator.overlap is not used: the annotator labels a finished step's edits; "
                          "leave it unset")
    from rl.plumbing.config import (
        JudgeConfig,  # (config imports this module: a late import)
    )

    if r.annotator.eval_mode != JudgeConfig().eval_mode:
        raise ConfigError(f"refresh.annotator.eval_mode is not used (got {r.annotator.eval_mode!r}): the annotator "
                          "answers its refresh.annotator.mode question; leave eval_mode unset")


def _check_judge(judge, key: str, data_source: str) -> None:
    """A judge section (`judge`, or the monitor's `monitor.judge`) names everything its kind needs."""
    _check_device(judge.device, f"{key}.device")
    if judge.kind == "transformers" and not judge.model:
        raise ConfigError(f"{key}.kind 'transformers' needs {key}.model (a local directory or a cached Hub id)")
    if judge.kind == "openai" and not (judge.base_url and judge.model):
        raise ConfigError(f"{key}.kind 'openai' needs {key}.base_url and {key}.model")
    if judge.kind == "openai":
        _check_base_urls(judge.base_url, f"{key}.base_url")
    if judge.kind == "rule" and data_source != "world":
        raise ConfigError(f"the rule judge ({key}.kind 'rule') needs the synthetic world's ground truth: use "
                          "data.source=world")


def _check_monitor(cfg) -> None:
    """monitor.* (only when the monitor is on: its defaults must not refuse a JSONL run that does not use it)."""
    m = cfg.monitor
    if not m.every:
        return
    if m.signal == "truth":
        if cfg.data.source != "world":
            raise ConfigError(
                f"monitor.signal 'truth' needs ground truth, which only the built-in world has (data.source is "
                f"{cfg.data.source!r}): watch with a second judge instead, e.g. --set monitor.signal=judge "
                "--set monitor.judge.kind=openai --set monitor.judge.base_url=URL --set monitor.judge.model=NAME, "
                "or turn the monitor off with monitor.every=0")
        if m.judge is not None:
            raise ConfigError("monitor.judge is set but monitor.signal is 'truth', so nothing would ask it: set "
                              "monitor.signal=judge, or remove monitor.judge")
        return
    if m.judge is None:
        raise ConfigError("monitor.signal 'judge' needs a second judge: set monitor.judge.* (the keys of judge.*), "
                          "e.g. --set monitor.judge.kind=openai --set monitor.judge.base_url=URL "
                          "--set monitor.judge.model=NAME")
    if m.judge.overlap:
        raise ConfigError("monitor.judge.overlap is not used: the monitor scores a finished evaluation, there is no "
                          "rollout to overlap (judge.overlap is the training judge's); leave it unset")
    from rl.plumbing.config import (
        JudgeConfig,  # (config imports this module: a late import)
    )

    if m.judge.mode != JudgeConfig().mode:  # set by the user (the default is the training judge's default)
        # its question is monitor.judge.eval_mode, as for every held-out score; a second key would contradict it
        raise ConfigError(f"monitor.judge.mode is not used (got {m.judge.mode!r}): the monitor's judge asks its "
                          "monitor.judge.eval_mode question (score or yesno); leave monitor.judge.mode unset")
    _check_judge(m.judge, "monitor.judge", cfg.data.source)

def _check_group_algorithms(cfg) -> None:
    """GRPO's SDE rollouts and mini-batches, AWM's training times."""
    algo, steps, images = cfg.train.algorithm, cfg.sampler.steps, cfg.nft.groups_per_step * cfg.nft.group_size
    if algo == "grpo":
        if cfg.sampler.method != "sde" or cfg.sampler.noise_level <= 0:
            raise ConfigError("train.algorithm 'grpo' trains the log-probabilities of stochastic steps: set "
                              f"sampler.method=sde and sampler.noise_level > 0 (got {cfg.sampler.method!r}, "
                              f"{cfg.sampler.noise_level})")
        if cfg.grpo.trained_steps >= steps:
            raise ConfigError(f"grpo.trained_steps ({cfg.grpo.trained_steps}) must be < sampler.steps ({steps}): "
                              "the last step, to t = 0, is deterministic")
        if images % cfg.grpo.mini_batches:
            raise ConfigError(f"grpo.mini_batches ({cfg.grpo.mini_batches}) must divide the step's images "
                              f"(nft.groups_per_step x nft.group_size = {images})")
    if algo == "awm" and cfg.awm.train_times > int(steps * cfg.awm.timestep_fraction) - 1:
        raise ConfigError(f"awm.train_times ({cfg.awm.train_times}) is more than the rollout steps it draws from "
                          f"(1 .. int(sampler.steps x awm.timestep_fraction) - 1 = "
                          f"{int(steps * cfg.awm.timestep_fraction) - 1}): lower it or raise sampler.steps")


def _check_device(name: str, key: str) -> None:
    import torch

    if name == "auto":
        return
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"{key}: {name!r} is not a device name (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key} is {name!r} but this machine has no CUDA GPU: use {key}=cpu or auto")


def _check_base_urls(base_url, key: str) -> None:
    """One http(s) URL, or a list of distinct ones (several servers of the same judge)."""
    urls = [base_url] if isinstance(base_url, str) else list(base_url)
    for url in urls:
        if not url.startswith(("http://", "https://")) or "," in url or any(c.isspace() for c in url):
            raise ConfigError(f"{key}: {url!r} is not an http(s) URL such as http://127.0.0.1:8000/v1 (several "
                              f"servers: a YAML list, or on the command line --set '{key}=[http://a:8000/v1,"
                              "http://b:8000/v1]')")
    if len({u.rstrip("/") for u in urls}) != len(urls):
        raise ConfigError(f"{key} names a server twice: {urls}")


def _check_rollout_chunks(cfg) -> None:
    """sampler.rollout_chunk and judge.overlap: the rollout-based algorithms only, and overlap needs chunks."""
    chunk, overlap, algo = cfg.sampler.rollout_chunk, cfg.judge.overlap, cfg.train.algorithm
    if algo == "refl" and (chunk or overlap):
        raise ConfigError("sampler.rollout_chunk and judge.overlap are for the rollout-based algorithms (nft, grpo, "
                          "awm): ReFL's judge scores with gradients inside the update, there is nothing to overlap; "
                          "leave them at 0 / false")
    if overlap and not chunk:
        raise ConfigError("judge.overlap scores one rollout chunk while the next is generated, but "
                          "sampler.rollout_chunk is 0 (one chunk: nothing to overlap). Set sampler.rollout_chunk to "
                          "the images per chunk, e.g. a quarter of each process's share of nft.groups_per_step x "
                          "nft.group_size")
