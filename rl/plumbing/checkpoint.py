"""Atomic checkpoints: written to a temporary directory, then renamed into place.

A checkpoint directory `ckpt-<step>` holds `state.safetensors` + `state.json` (trainable weights,
old policy, EMA, reference, optimiser, RNG states, step, run id; no pickle, see core/io/tensor_store.py)
and `config.yaml`. `latest` names the newest complete checkpoint; it is itself replaced
atomically, so a crash at any moment leaves the previous checkpoint usable. A resumed run restores
everything and continues at the next step. A checkpoint is never written with a non-finite weight
in any copy, and temporary directories left by a killed writer are removed at the next start.

A sharded (FSDP2, dist.strategy=fsdp2) checkpoint has the same layout plus `shards/`: every process
writes its shards of the trainable weights, AdamW state and the three copies there as safetensors
(rl/plumbing/fsdp.py), while `state.*` holds the rest; `load_checkpoint` assembles whole copies from
the shards for readers outside training (rl.edit, rl.eval, rl.compare), a resume reads its own shards.
"""
from __future__ import annotations

import errno
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.io.tensor_store import has_tree, load_tree, save_tree

_COPIES = ("weights", "old", "ema", "ref")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read; the message names the cause and the fix."""


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


def nonfinite_copies(state: dict[str, Any]) -> list[str]:
    """Names "copy/param" of every weight tensor in `state` holding a NaN or an infinity."""
    bad = []
    for copy in _COPIES:
        for name, t in (state.get(copy) or {}).items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                bad.append(f"{copy}/{name}")
    return bad


def disk_error(err: OSError, where: Path) -> CheckpointError:
    """A one-line explanation of a failed write (full disk, read-only, no permission)."""
    reason = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
              errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied"}.get(
        err.errno, err.strerror or str(err))
    return CheckpointError(f"cannot write to {where}: {reason}; free space or choose another --out")


def save_checkpoint(run_dir: Path, step: int, state: dict[str, Any], config_yaml: str, keep: int = 2) -> Path:
    """Write ckpt-<step> atomically, point `latest` at it, and prune older checkpoints."""
    run_dir = Path(run_dir)
    bad = nonfinite_copies(state)
    if bad:
        raise CheckpointError(f"refusing to checkpoint step {step}: non-finite weights in {bad[:4]}"
                              f"{' ...' if len(bad) > 4 else ''}")
    final = run_dir / f"ckpt-{step:06d}"
    try:
        tmp = Path(tempfile.mkdtemp(dir=run_dir, prefix=f".tmp-ckpt-{step:06d}-"))
        _install(tmp, final, {**state, "step": step, "rng": rng_states()}, config_yaml, keep)
    except OSError as err:
        raise disk_error(err, run_dir) from err
    return final


def _install(tmp: Path, final: Path, state: dict[str, Any], config_yaml: str, keep: int) -> None:
    """Complete the temporary checkpoint `tmp` (state, config), rename it to `final`, point `latest`
    at it and prune all but the `keep` newest; `tmp` is removed if anything before the rename fails."""
    try:
        save_tree(state, tmp)
        (tmp / "config.yaml").write_text(config_yaml)
        if final.exists():  # a re-save of the same step (e.g. after resume): replace it whole
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _write_atomic(final.parent / "latest", final.name + "\n")
    if keep > 0:
        for old in sorted(final.parent.glob("ckpt-*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


def save_sharded_checkpoint(run_dir: Path, step: int, trees: dict[str, Any], state: dict[str, Any] | None,
                            config_yaml: str, ctx, keep: int = 2) -> Path:
    """Write a sharded ckpt-<step> atomically (every process calls it): every process writes its shards of
    `trees` (rl.plumbing.fsdp.sharded_state) into one temporary directory, rank 0 `state` (the rest),
    renames it into place, points `latest` at it and prunes older checkpoints. A failure on any process
    is a CheckpointError on every process."""
    from rl.plumbing.fsdp import SHARDS_DIR, nonfinite_shards, write_shards

    run_dir = Path(run_dir)
    bad = nonfinite_shards(trees)
    if float(ctx.all_reduce_sum(torch.tensor([float(len(bad))], device=ctx.device))) > 0:
        where = f"{bad[:4]}{' ...' if len(bad) > 4 else ''}" if bad else "another process's shards"
        raise CheckpointError(f"refusing to checkpoint step {step}: non-finite weights in {where}")
    final = run_dir / f"ckpt-{step:06d}"
    error, tmp = None, None
    if ctx.is_main:
        try:
            tmp = tempfile.mkdtemp(dir=run_dir, prefix=f".tmp-ckpt-{step:06d}-")
        except OSError as err:
            error = str(disk_error(err, run_dir))
    error, tmp = ctx.broadcast_object((error, tmp))
    if error is not None:
        raise CheckpointError(error)
    tmp = Path(tmp)
    try:
        write_shards(trees, tmp / SHARDS_DIR)
    except Exception as err:  # DCP reports a failure on any process to every process
        if ctx.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"cannot write the shards of step {step} into {run_dir}: {err}") from err
    if ctx.is_main:
        try:
            _install(tmp, final, {**(state or {}), "step": step, "rng": rng_states()}, config_yaml, keep)
        except Exception as err:  # noqa: BLE001 (the other processes wait for the word: send it)
            error = str(disk_error(err, run_dir)) if isinstance(err, OSError) else f"{type(err).__name__}: {err}"
    error = ctx.broadcast_object(error)
    if error is not None:
        raise CheckpointError(error)
    return final


def remove_stale_temporaries(run_dir: Path) -> list[Path]:
    """Delete `.tmp-ckpt-*` directories a killed writer left behind; returns what was removed."""
    stale = sorted(Path(run_dir).glob(".tmp-ckpt-*"))
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


def _complete(path: Path) -> bool:
    return has_tree(path)


def latest_checkpoint(run_dir: Path) -> Path | None:
    run_dir = Path(run_dir)
    pointer = run_dir / "latest"
    if pointer.is_file():
        path = run_dir / pointer.read_text().strip()
        if _complete(path):
            return path
    done = sorted(p for p in run_dir.glob("ckpt-*") if _complete(p))
    return done[-1] if done else None


def load_checkpoint(path: Path, full: bool = True) -> dict[str, Any]:
    """The state of a checkpoint directory, or of a run directory's latest checkpoint. A sharded
    checkpoint's state names its directory ("checkpoint_dir"); with `full` its weights and copies are
    assembled from the shards as whole CPU tensors (a resume reads its own shards instead: full=False)."""
    path = Path(path)
    if path.is_dir() and not _complete(path):
        found = latest_checkpoint(path)
        if found is None:
            legacy = " (it holds a pickled state.pt from an older version, which is no longer loaded: " \
                     "pickles can execute code)" if list(path.glob("**/state.pt")) else ""
            raise FileNotFoundError(f"no checkpoint in {path} (expected ckpt-*/state.safetensors){legacy}")
        path = found
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    state = load_tree(path)
    if "sharded" in state:
        state["checkpoint_dir"] = str(path)
        if full:
            from rl.plumbing.fsdp import read_full

            state.update(read_full(path))
    return state
