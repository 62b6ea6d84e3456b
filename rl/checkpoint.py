"""Atomic checkpoints: written to a temporary directory, then renamed into place.

A checkpoint directory `ckpt-<step>` holds `state.pt` (trainable weights, old policy, EMA,
reference, optimiser, RNG states, step, metrics so far) and `config.yaml`. `latest` names the
newest complete checkpoint; it is itself replaced atomically, so a crash at any moment leaves the
previous checkpoint usable. A resumed run restores everything and continues at the next step.
"""
from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch


def rng_states() -> dict[str, Any]:
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(run_dir: Path, step: int, state: dict[str, Any], config_yaml: str, keep: int = 2) -> Path:
    """Write ckpt-<step> atomically, point `latest` at it, and prune older checkpoints."""
    run_dir = Path(run_dir)
    final = run_dir / f"ckpt-{step:06d}"
    tmp = Path(tempfile.mkdtemp(dir=run_dir, prefix=f".tmp-ckpt-{step:06d}-"))
    try:
        torch.save({**state, "step": step, "rng": rng_states()}, tmp / "state.pt")
        (tmp / "config.yaml").write_text(config_yaml)
        if final.exists():  # a re-save of the same step (e.g. after resume): replace it whole
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _write_atomic(run_dir / "latest", final.name + "\n")
    if keep > 0:
        for old in sorted(run_dir.glob("ckpt-*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    run_dir = Path(run_dir)
    pointer = run_dir / "latest"
    if pointer.is_file():
        path = run_dir / pointer.read_text().strip()
        if (path / "state.pt").is_file():
            return path
    done = sorted(p for p in run_dir.glob("ckpt-*") if (p / "state.pt").is_file())
    return done[-1] if done else None


def load_checkpoint(path: Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir() and not (path / "state.pt").is_file():
        found = latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"no checkpoint in {path} (expected ckpt-*/state.pt or a 'latest' file)")
        path = found
    file = path / "state.pt" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"checkpoint not found: {file}")
    return torch.load(file, map_location="cpu", weights_only=False)
