"""One run per directory: a new run never writes into another's, a resume continues only its own.

A run directory is marked by `run.json` (a random run id and the time it was created); every
checkpoint records the id, so a resume cannot load another run's state. A new run refuses an
`--out` that already holds files unless the user asks for a fresh start, which moves the old
directory aside (`<out>.replaced-<time>`), never mixing or deleting it. A resume refuses settings
that would change what was trained on or how it is evaluated (`RESUMABLE_KEYS` may change).
"""
from __future__ import annotations

import datetime
import json
import uuid
from pathlib import Path
from typing import Any

from core.config.loading import ConfigError, to_dict
from rl.plumbing.checkpoint import remove_stale_temporaries
from rl.plumbing.config import load_config

RUN_FILE = "run.json"

#: keys a resume may change: how long, how often to save or log, where the judge is and whether it overlaps the
#: rollout (the same results), how fast
#: (the learning rate and clip too: lowering them is the fix for a diverged run)
RESUMABLE_KEYS = frozenset({
    "train.steps", "train.time_budget_s", "train.sample_every", "train.checkpoint_every",
    "train.keep_checkpoints", "train.max_bad_steps", "train.tensorboard", "train.tracker", "train.progress",
    "train.threads",
    "optim.lr", "optim.grad_clip",
    "judge.base_url", "judge.api_key_env", "judge.concurrency", "judge.timeout", "judge.retries",
    "judge.batch_size", "judge.device", "judge.overlap", "model.device", "model.attention_backend",
    "model.gradient_checkpointing",
    # where FSDP2 keeps shards and copies (host or device memory), not what is computed
    "dist.cpu_offload", "dist.copies",
    # what the monitor does about a warning, and where its second judge is (not what it measures)
    "monitor.stop_on_hacking", "monitor.keep_best",
    "monitor.judge.base_url", "monitor.judge.api_key_env", "monitor.judge.concurrency", "monitor.judge.timeout",
    "monitor.judge.retries", "monitor.judge.batch_size", "monitor.judge.device",
    # where the judge refresh's annotator is (not what it labels)
    "refresh.annotator.base_url", "refresh.annotator.api_key_env", "refresh.annotator.concurrency",
    "refresh.annotator.timeout", "refresh.annotator.retries", "refresh.annotator.batch_size",
    "refresh.annotator.device",
})


class RunDirError(ValueError):
    """--out / --resume names a directory that cannot be used as asked; the message says how."""


def check_new_run_dir(run_dir: Path, fresh: bool = False) -> None:
    """Refuse `run_dir` for a new run when it already holds anything (unless `fresh`); writes nothing."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"--out {run_dir} is a file, not a directory")
    if run_dir.is_dir() and any(run_dir.iterdir()) and not fresh:
        held = "a run" if (run_dir / "config.yaml").exists() or (run_dir / RUN_FILE).exists() else "files"
        raise RunDirError(
            f"--out {run_dir} already holds {held}: continue it with --resume {run_dir}, start over with "
            f"--fresh (moves it to {run_dir.name}.replaced-<time>), or choose another --out")


def new_run_dir(run_dir: Path, fresh: bool = False) -> str:
    """Claim `run_dir` for a new run (creating it); returns the new run id.

    An existing non-empty directory is refused, or with `fresh` moved aside first."""
    run_dir = Path(run_dir)
    check_new_run_dir(run_dir, fresh)
    if run_dir.is_dir() and any(run_dir.iterdir()):
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
        aside = run_dir.with_name(f"{run_dir.name}.replaced-{stamp}")
        run_dir.rename(aside)
        print(f"[rl.train] --fresh: moved the previous contents of {run_dir} to {aside}")
    run_dir.mkdir(parents=True, exist_ok=True)
    run_id = uuid.uuid4().hex
    created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    (run_dir / RUN_FILE).write_text(json.dumps({"run_id": run_id, "created": created}) + "\n")
    return run_id


def run_id_of(run_dir: Path) -> str | None:
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text()).get("run_id")


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and key != "data.mixture":  # the mixture is one value
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def changed_keys(stored, now) -> dict[str, tuple[Any, Any]]:
    """{"section.key": (stored value, new value)} for every key that differs between two configs."""
    a, b = _flat(to_dict(stored)), _flat(to_dict(now))
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def check_resume_config(stored, now) -> None:
    """Refuse a resume whose config changes anything outside RESUMABLE_KEYS, naming the keys."""
    bad = {k: v for k, v in changed_keys(stored, now).items() if k not in RESUMABLE_KEYS}
    if bad:
        listed = ", ".join(f"{k} ({old!r} -> {new!r})" for k, (old, new) in bad.items())
        raise ConfigError(
            f"a resume cannot change {listed}: these change what the run trained on or how it is evaluated. "
            f"Start a new run with --out NEW_DIR instead (keys a resume may change: {sorted(RESUMABLE_KEYS)})")


def config_yaml(cfg) -> str:
    """The resolved run config as YAML (config.yaml and every checkpoint's copy)."""
    import yaml

    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def check_run_dir(cfg, run_dir: Path, resume: bool, fresh: bool) -> None:
    """Before any work: may this run use the directory? (Nothing is written yet.)"""
    if resume:
        stored = run_dir / "config.yaml"
        if not stored.is_file():
            raise RunDirError(f"--resume {run_dir}: no config.yaml there; is it a run directory?")
        check_resume_config(load_config(str(stored)), cfg)
    else:
        check_new_run_dir(run_dir, fresh)


def claim_run_dir(cfg, run_dir: Path, resume: bool, fresh: bool) -> str | None:
    """Once the run's parts are built: take the directory (a failed start leaves nothing behind)."""
    if resume:
        remove_stale_temporaries(run_dir)
        run_id = run_id_of(run_dir)
    else:
        run_id = new_run_dir(run_dir, fresh=fresh)
    (run_dir / "config.yaml").write_text(config_yaml(cfg))
    return run_id
