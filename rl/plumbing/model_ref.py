"""Resolve what a user names as a model: `base`, a run directory, a checkpoint, or a model directory.

Returns the policy and, when the weights live in a checkpoint rather than the model directory, the
dict of trainable weights to evaluate with (`policy.velocity(..., weights=...)`).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from torch import Tensor

from core.io.tensor_store import has_tree
from core.policies.policy import Policy
from rl.plumbing.builders import build_policy
from rl.plumbing.checkpoint import latest_checkpoint, load_checkpoint
from rl.plumbing.config import ModelConfig, RunConfig, load_config
from rl.plumbing.model_kinds import KINDS, kind_of_pipeline


def resolve_model(spec: str, device: torch.device, default: ModelConfig | None = None,
                  image_size: int | None = None) -> tuple[Policy, dict[str, Tensor] | None, str]:
    """(policy, weights or None, description) for `spec`.

    - "base": the configured base model (the shipped toy FLUX.1 Fill by default);
    - a run directory (config.yaml + final/ or ckpt-*): its exported final model, else the EMA
      weights of its latest checkpoint on its own base model;
    - a checkpoint directory (ckpt-*/state.safetensors + state.json): the EMA weights on the base model of its config;
    - a model directory: a pipeline directory (`save_pretrained`, what a toy run exports), loaded
      as its pipeline class says (`model_config_for`: FluxFillPipeline, FluxKontextPipeline,
      QwenImageEditPipeline).
    """
    model_cfg = default or ModelConfig()
    if spec == "base":
        return build_policy(model_cfg, device, image_size), None, "base model"
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"model {spec!r} not found: give 'base', a run directory, a checkpoint or a model directory")
    if (path / "config.yaml").is_file() and not has_tree(path):  # a run directory
        cfg: RunConfig = load_config(str(path / "config.yaml"))
        final = path / "final"
        if final.is_dir():
            if (final / "model_index.json").is_file():  # a whole pipeline (the toy's export)
                return build_policy(_with_path(cfg.model, final), device, cfg.data.image_size), None, f"run {path} (final)"
            policy = build_policy(cfg.model, device, cfg.data.image_size)
            if policy.has_lora:  # the export is a LoRA adapter in diffusers' format
                policy.load_lora_weights(final)
                return policy, None, f"run {path} (final LoRA)"
            raise ValueError(f"{final}: load a fully fine-tuned FLUX transformer with "
                             "FluxFillPolicy.from_pretrained(base, transformer=final/'transformer')")
        ckpt = latest_checkpoint(path)
        if ckpt is None:
            raise FileNotFoundError(f"run directory {path} has neither final/ nor a checkpoint")
        return _from_checkpoint(ckpt, cfg.model, device, cfg.data.image_size)
    if has_tree(path):
        cfg = load_config(str(path / "config.yaml")) if (path / "config.yaml").is_file() else None
        return _from_checkpoint(path, cfg.model if cfg else model_cfg, device,
                                cfg.data.image_size if cfg else image_size)
    return (build_policy(_with_path(model_config_for(path, model_cfg), path), device, image_size), None,
            f"model directory {path}")


def _with_path(cfg: ModelConfig, path: Path) -> ModelConfig:
    return dataclasses.replace(cfg, path=str(path))


def pipeline_kind(directory: Path) -> str | None:
    """The model.kind of a diffusers pipeline directory, by model_index.json's class (tiny /
    tiny_kontext when toy_flux.json says it is a toy); None when it is not one we know."""
    try:
        name = json.loads((directory / "model_index.json").read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None
    return kind_of_pipeline(name, toy=(directory / "toy_flux.json").is_file())


def model_config_for(directory: Path, cfg: ModelConfig) -> ModelConfig:
    """`cfg` with the kind of the pipeline in `directory` when the configured kind would load it with
    another policy class (a Kontext directory is an instruction editor whatever the default says)."""
    kind = pipeline_kind(directory)
    if kind is None or KINDS[kind].family == KINDS[cfg.kind].family:
        return cfg
    return dataclasses.replace(cfg, kind=kind)


def _from_checkpoint(ckpt: Path, model_cfg: ModelConfig, device: torch.device, image_size: int | None = None):
    state = load_checkpoint(ckpt)
    policy = build_policy(model_cfg, device, image_size)
    weights = {k: v.to(device) for k, v in state["ema"].items()}
    missing = set(policy.trainable_parameters()) - set(weights)
    if missing:
        raise ValueError(f"checkpoint {ckpt} does not match the model: {len(missing)} weights missing, "
                         f"e.g. {sorted(missing)[:3]}")
    return policy, weights, f"checkpoint {ckpt} (EMA, step {state['step']})"
