"""Build the run's parts from its config: policy, judge, data source, rollout schedule.

Missing weights fail here, before any work, with the path named.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from core.policies.policy import Policy
from reward.judge import Judge
from rl.plumbing.config import (
    BUILTIN_KINDS,
    DataConfig,
    JudgeConfig,
    ModelConfig,
    RefreshConfig,
)
from rl.plumbing.data import JsonlData, WorldData
from rl.plumbing.distributed import resolve_device
from rl.plumbing.model_kinds import KINDS

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_policy(cfg: ModelConfig, device: torch.device, image_size: int | None = None) -> Policy:
    """The policy of `cfg`: the built-in toy FLUX.1 Fill (kind tiny) or FLUX.1 Fill [dev], both
    through core.policies.flux_fill.FluxFillPolicy, or the built-in toy instruction editor (tiny_kontext) or
    FLUX.1 Kontext [dev] (kind flux_kontext), both through core.policies.flux_kontext.FluxKontextPolicy, or Qwen-Image-Edit (kind qwen_image_edit,
    core.policies.qwen_image_edit.QwenImageEditPolicy). `image_size`: the resolution FLUX's shift is computed
    for (None: the VAE's native size, 64 for the toy)."""
    family = KINDS[cfg.kind].family
    if family == "kontext":
        from core.policies.flux_kontext import FluxKontextPolicy as policy_class
    elif family == "qwen":
        from core.policies.qwen_image_edit import QwenImageEditPolicy as policy_class
    else:
        from core.policies.flux_fill import FluxFillPolicy as policy_class

    path = cfg.path
    if cfg.kind in BUILTIN_KINDS:
        from core.toy_flux import shipped_kontext_dir, shipped_model_dir

        if path is not None and not Path(path).exists():
            raise FileNotFoundError(f"model.path not found: {path}")
        path = path if path is not None else (shipped_model_dir() if cfg.kind == "tiny" else shipped_kontext_dir())
        image_size = None  # the toy's VAE knows its size; data.image_size only resizes the inputs
    lora = None if cfg.lora is None else {"r": cfg.lora.r, "alpha": cfg.lora.alpha,
                                          "targets": cfg.lora.targets, "init": cfg.lora.init}
    return policy_class.from_pretrained(
        path, device=device, dtype=_DTYPES[cfg.dtype], lora=lora, gradient_checkpointing=cfg.gradient_checkpointing,
        attention_backend=cfg.attention_backend, guidance=cfg.guidance,
        local_files_only=cfg.kind in BUILTIN_KINDS or not cfg.allow_download, image_size=image_size,
        **({"true_cfg_scale": cfg.true_cfg_scale} if family == "qwen" else {}))


def build_judge(cfg: JudgeConfig, device: torch.device) -> Judge:
    if cfg.kind == "rule":
        from reward.judges.rule_judge import RuleJudge

        return RuleJudge()
    if cfg.kind == "transformers":
        from reward.judges.vlm_judge import TransformersJudge

        judge_device = device if cfg.device == "auto" else resolve_device(cfg.device)
        judge = TransformersJudge(cfg.model, dtype=_DTYPES.get(cfg.dtype, cfg.dtype), device=judge_device,
                                  attn_implementation=cfg.attn_implementation, batch_size=cfg.batch_size,
                                  both_orders=cfg.both_orders, show_crop=cfg.show_crop,
                                  templates=cfg.templates, max_pixels=cfg.max_pixels)
        judge.require_modes([cfg.mode, cfg.eval_mode])  # a judge trained on one question answers only it
        return judge
    from reward.judges.api_judge import OpenAIJudge

    api_key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
    if cfg.api_key_env and not api_key:
        raise ValueError(f"judge.api_key_env names {cfg.api_key_env!r}, but that environment variable is empty")
    label_ids = None
    if cfg.tokenizer:
        from transformers import AutoTokenizer

        from reward.vlm.labels import label_token_id_map

        label_ids = label_token_id_map(AutoTokenizer.from_pretrained(cfg.tokenizer, local_files_only=True))
    judge = OpenAIJudge(cfg.base_url, cfg.model, api_key=api_key, concurrency=cfg.concurrency,
                        timeout=cfg.timeout, retries=cfg.retries, both_orders=cfg.both_orders,
                        show_crop=cfg.show_crop, top_logprobs=cfg.top_logprobs, label_token_ids=label_ids,
                        max_floored_share=cfg.max_floored_share,
                        templates=cfg.templates)
    judge.ping()  # an unreachable judge fails here, before any work, with the URL and the fix
    return judge


def build_annotator(cfg: RefreshConfig, device: torch.device) -> tuple[Judge, str]:
    """The refresh's annotator and its question: refresh.annotator, or (null) the rule judge asked for scores."""
    if cfg.annotator is None:
        return build_judge(JudgeConfig(kind="rule"), device), "score"
    # the annotator answers one question, its mode (eval_mode is refused by the config checks): a judge
    # trained on pairwise questions only must not be required to answer scores
    return build_judge(dataclasses.replace(cfg.annotator, eval_mode=cfg.annotator.mode), device), cfg.annotator.mode


def build_data(cfg: DataConfig):
    if cfg.source == "world":
        return WorldData(cfg.mixture, world_seed=cfg.world_seed, image_size=cfg.image_size,
                         balanced=cfg.balanced_tasks)
    return JsonlData(cfg.jsonl, cfg.mixture, size=cfg.image_size, allow_outside=cfg.allow_absolute_paths,
                     balanced=cfg.balanced_tasks)


def rollout_sigmas(policy: Policy, steps: int, shift: float | None) -> torch.Tensor:
    """The sampler's step times for this policy: its default shift unless the config sets one."""
    if shift is not None:
        from core.sampling.schedules import flux_sigmas

        return flux_sigmas(steps, shift=shift)
    return policy.schedule(steps)
