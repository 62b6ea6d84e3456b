"""Training state of the toy model's pretraining on disk: core.io.tensor_store's format (tensors in
safetensors, the rest in JSON; loading never runs code), in a checkpoint directory that is replaced
only once the new state is complete, so an interrupted write leaves the previous one readable."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from core.io.tensor_store import has_tree, load_tree, save_tree

STATE = "state"


def save_state(value: Any, directory: str | Path) -> None:
    """Write `value` as state.json + state.safetensors into `directory` (created if needed)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_tree(value, directory, STATE)


def load_state(directory: str | Path) -> Any:
    """Read what `save_state` wrote."""
    directory = Path(directory)
    if not has_tree(directory, STATE):
        raise FileNotFoundError(f"{directory} holds no saved state ({STATE}.json and {STATE}.safetensors)")
    return load_tree(directory, STATE)


def save_checkpoint(value: Any, directory: str | Path) -> None:
    """`save_state` into `directory`, replacing it only once the new state is complete."""
    directory = Path(directory)
    fresh, old = directory.with_name(directory.name + ".new"), directory.with_name(directory.name + ".old")
    shutil.rmtree(fresh, ignore_errors=True)
    save_state(value, fresh)
    if directory.exists():
        shutil.rmtree(old, ignore_errors=True)
        directory.rename(old)
    fresh.rename(directory)
    shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(directory: str | Path) -> Path | None:
    """The checkpoint to resume from: `directory`, or the previous one if a save was cut short."""
    directory = Path(directory)
    for candidate in (directory, directory.with_name(directory.name + ".old")):
        if has_tree(candidate, STATE):
            return candidate
    return None
