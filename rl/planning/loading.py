"""Load a run config for planning: every check of `rl.train`, except those about this machine.

A plan is made before launch, often elsewhere: the data file and a CUDA device need not exist
here. Those two checks become warnings (rl.train would still refuse them on a machine that lacks
them); every other check of rl/plumbing/config_checks.py `validate` applies as usual.
"""
from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import torch

from core.config.loading import load_yaml
from rl.plumbing.config import RunConfig
from rl.plumbing.config_checks import validate


def _machine_issues(cfg: RunConfig) -> list[str]:
    issues = []
    d = cfg.data
    if d.source == "jsonl" and d.jsonl and not Path(d.jsonl).is_file():
        issues.append(f"data.jsonl {d.jsonl} is not on this machine (the plan does not read data; rl.train needs it)")
    if not torch.cuda.is_available():
        for key, name in (("model.device", cfg.model.device), ("judge.device", cfg.judge.device)):
            if name.startswith("cuda"):
                issues.append(f"{key}={name}: this machine has no CUDA GPU (the plan does not need one)")
    return issues


def load_for_plan(path: str | None, overrides: list[str] | None = None) -> tuple[RunConfig, list[str]]:
    """The config of `path` + `overrides`, checked like rl.train's, and the machine-only issues."""
    cfg = load_yaml(RunConfig, path, overrides)
    issues = _machine_issues(cfg)
    no_cuda = not torch.cuda.is_available()

    def here(name: str) -> str:  # a CUDA device this machine lacks: checked as "auto"; a bad name stays bad
        return "auto" if no_cuda and name.startswith("cuda") else name

    missing_data = cfg.data.source == "jsonl" and bool(cfg.data.jsonl) and not Path(cfg.data.jsonl).is_file()
    with tempfile.NamedTemporaryFile(suffix=".jsonl") as stand_in:
        portable = dataclasses.replace(
            cfg,
            data=dataclasses.replace(cfg.data, jsonl=stand_in.name) if missing_data else cfg.data,
            model=dataclasses.replace(cfg.model, device=here(cfg.model.device)),
            judge=dataclasses.replace(cfg.judge, device=here(cfg.judge.device)))
        validate(portable)  # what remains is wrong on every machine
    return cfg, issues
