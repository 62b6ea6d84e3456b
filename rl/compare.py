"""`python -m rl.compare`: the algorithms side by side under one wall-clock training budget.

    python -m rl.compare --seconds S --out DIR [--algorithms nft,grpo,awm,refl] [--seeds N] [--points K]
                         [--per-task M] [--config ALG=FILE ...] [--set key=value ...]

Each algorithm trains from the same base model for S seconds of training (set-up and evaluation not
counted), N seeds each (train.seed = 0..N-1); its model is snapshotted at K equally spaced points
of its training clock (S/K, 2S/K, ..., S). Afterwards every snapshot, and the base model, edits the
same held-out conditions with the same noise and is scored by the judge and, on the synthetic world,
by the ground truth. DIR gets compare.md / compare.json (per algorithm and point: judge reward over
all tasks and per task, ground-truth metrics per task, means over seeds with 95% t-intervals; the
seconds each algorithm needs to reach GRPO's final reward), reward.png and truth.png.

Configs: configs/tiny_<alg>.yaml unless `--config ALG=FILE` (or a FILE whose train.algorithm says
which) names another; `--set` applies to all. Every run is a normal rl.train run directory,
DIR/runs/<alg>-seed<k>/, trained in K chunks (train.time_budget_s, then --resume: bit-exact), each
chunk's end kept as DIR/snapshots/<alg>-seed<k>/point-<j>/ (the EMA; `rl.eval --model` loads it).
Inside the budget nothing but training runs: the chunks set train.eval_per_task, eval_every,
sample_every and checkpoint_every (and the hacking monitor's monitor.every) to 0, and train.steps
out of reach; optim.decay must be constant (a time budget has no last step to decay towards).
Re-running the same command continues where it stopped and reuses what is done (snapshots and
evaluations); a run whose settings differ from its stored config is refused.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from core.config.loading import ConfigError, to_dict
from core.io.tensor_store import has_tree, save_tree
from rl.evaluation.compare_report import (
    PointResult,
    build_report,
    markdown,
    plot_reward,
    plot_truth,
)
from rl.evaluation.snapshot_eval import Snapshot, SnapshotEvaluator
from rl.plumbing.checkpoint import latest_checkpoint, load_checkpoint
from rl.plumbing.config import RunConfig, load_config
from rl.plumbing.run_dir import RunDirError, changed_keys
from rl.plumbing.run_log import read_metrics

ALGORITHMS = ("nft", "refl", "grpo", "awm")
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
PLAN_FILE = "compare_plan.json"
#: the held-out noise seed: rl.train's summary and rl.eval use train.seed + 12345, i.e. this for seed 0
NOISE_SEED = 12345
#: each chunk ends on its time budget; train.steps only has to be out of reach
UNREACHED_STEPS = 10**6
#: keys that may differ from a stored run's config: set per chunk here, or logging only
_FREE_KEYS = frozenset({"train.time_budget_s", "train.progress", "train.tensorboard", "train.tracker"})


class CompareError(ValueError):
    """The comparison cannot run as asked; the message names the problem and the fix."""


@dataclasses.dataclass
class Plan:
    """A validated comparison: what to train, for how long, and where."""

    algorithms: list[str]
    seconds: float
    seeds: int
    points: int
    per_task: int
    out: Path
    config_files: dict[str, str]
    overrides: list[str]
    configs: dict[str, RunConfig]    # per algorithm, seed 0, chunk keys set

    def config_of(self, alg: str, seed: int, budget: float | None = None) -> RunConfig:
        """The run config of (alg, seed); `budget`: this chunk's train.time_budget_s."""
        cfg = self.configs[alg]
        train = dataclasses.replace(cfg.train, seed=seed, time_budget_s=budget or self.seconds / self.points)
        return dataclasses.replace(cfg, train=train)

    def runs(self) -> list[tuple[str, int]]:
        return [(alg, seed) for alg in self.algorithms for seed in range(self.seeds)]


def run_name(alg: str, seed: int) -> str:
    return f"{alg}-seed{seed}"


# -- the plan: every check before any work ----------------------------------------------------

def _chunk_overrides(alg: str, seconds: float, points: int) -> list[str]:
    # no evaluation, sample grid or mid-chunk checkpoint may spend the training budget
    keys = [f"train.algorithm={alg}", f"train.steps={UNREACHED_STEPS}", f"train.time_budget_s={seconds / points}",
            "train.eval_per_task=0", "train.eval_every=0", "train.sample_every=0", "train.checkpoint_every=0",
            "train.progress=false"]
    if "monitor" in {f.name for f in dataclasses.fields(RunConfig)}:  # the reward-hacking monitor evaluates in the loop
        keys.append("monitor.every=0")
    return keys


def _config_files(entries: list[str], algorithms: list[str]) -> dict[str, str]:
    """--config entries (ALG=FILE, or FILE whose train.algorithm names its algorithm) -> {alg: file}."""
    files: dict[str, str] = {}
    for entry in entries:
        alg, sep, path = entry.partition("=")
        if not sep:
            path = entry
            stated = _stated_algorithm(path)
            if stated is None:
                raise CompareError(f"--config {path}: its train.algorithm is not set, so it is unclear which "
                                   f"algorithm it configures; write --config ALG={path}")
            alg = stated
        elif alg not in ALGORITHMS:
            raise CompareError(f"--config {entry}: unknown algorithm {alg!r}; write --config ALG=FILE with ALG one of "
                               f"{', '.join(ALGORITHMS)}")
        if alg not in algorithms:
            raise CompareError(f"--config {entry} configures {alg}, which is not in --algorithms "
                               f"{','.join(algorithms)}: add it there or drop the --config")
        if alg in files:
            raise CompareError(f"--config names two files for {alg} ({files[alg]}, {path}): give one")
        stated = _stated_algorithm(path)
        if stated not in (None, alg):
            raise CompareError(f"--config {entry}: the file trains {stated} (train.algorithm), not {alg}")
        files[alg] = path
    for alg in algorithms:
        files.setdefault(alg, str(CONFIG_DIR / f"tiny_{alg}.yaml"))
        if not Path(files[alg]).is_file():
            raise CompareError(f"config of {alg} not found: {files[alg]}; pass --config {alg}=FILE")
    return files


def _stated_algorithm(path: str) -> str | None:
    if not Path(path).is_file():
        raise CompareError(f"--config {path}: no such file")
    data = yaml.safe_load(Path(path).read_text()) or {}
    return (data.get("train") or {}).get("algorithm") if isinstance(data, dict) else None


def make_plan(algorithms: str | list[str], seconds: float, out: str | os.PathLike, *, seeds: int = 1,
              points: int = 4, per_task: int = 24, configs: list[str] | None = None,
              overrides: list[str] | None = None) -> Plan:
    """Check the arguments and load every algorithm's config; raises CompareError (naming the
    problem and the fix) before any work."""
    algs = [a.strip() for a in algorithms.split(",")] if isinstance(algorithms, str) else list(algorithms)
    unknown = [a for a in algs if a not in ALGORITHMS]
    if unknown or not algs:
        raise CompareError(f"--algorithms: unknown algorithm(s) {unknown or algs}; choose from {', '.join(ALGORITHMS)}, "
                           "comma-separated (e.g. --algorithms nft,grpo)")
    if len(set(algs)) != len(algs):
        raise CompareError(f"--algorithms {','.join(algs)} names an algorithm twice; name each once")
    for name, value, least, what in (("--seeds", seeds, 1, "seeds per algorithm"),
                                     ("--points", points, 1, "snapshots per run"),
                                     ("--per-task", per_task, 1, "held-out conditions per task")):
        if value < least:
            raise CompareError(f"{name} must be at least {least} ({what}), got {value}")
    if not (seconds > 0 and math.isfinite(seconds)):
        raise CompareError(f"--seconds must be a finite number > 0 (each run's training time in seconds), got {seconds}")
    overrides = list(overrides or [])
    files = _config_files(list(configs or []), algs)
    loaded = {}
    for alg in algs:
        try:
            loaded[alg] = load_config(files[alg], overrides + _chunk_overrides(alg, seconds, points))
        except (ConfigError, FileNotFoundError) as err:
            raise CompareError(f"config of {alg} ({files[alg]}): {err}") from err
        if loaded[alg].optim.decay != "constant":
            # a time budget has no last step for a step-based schedule to decay towards
            raise CompareError(f"config of {alg} ({files[alg]}): optim.decay is {loaded[alg].optim.decay!r}, but "
                               "a wall-clock budget has no known last step to decay towards; set optim.decay=constant")
    _check_same_start(loaded, files)
    return Plan(algs, float(seconds), seeds, points, per_task, Path(out), files, overrides, loaded)


def _check_same_start(configs: dict[str, RunConfig], files: dict[str, str]) -> None:
    """Same base model, held-out conditions and machine settings for every algorithm."""
    def shared(cfg: RunConfig) -> dict[str, Any]:
        d = cfg.data
        return {"model": to_dict(cfg.model), "data.source": d.source, "data.jsonl": d.jsonl,
                "data.world_seed": d.world_seed, "data.image_size": d.image_size, "train.threads": cfg.train.threads}

    first = next(iter(configs))
    ref = shared(configs[first])
    for alg, cfg in configs.items():
        diff = [k for k, v in shared(cfg).items() if v != ref[k]]
        if diff:
            raise CompareError(f"{alg} ({files[alg]}) and {first} ({files[first]}) differ in {', '.join(diff)}: every "
                               "algorithm must start from the same model and data on the same settings; make them "
                               "equal (e.g. --set model.path=...)")


def check_out_dir(plan: Plan) -> None:
    """May --out hold this comparison? New, empty, or an earlier run of the same comparison whose
    runs were made with the same configs."""
    out = plan.out
    if out.exists() and not out.is_dir():
        raise CompareError(f"--out {out} is a file; choose a directory")
    if out.is_dir() and any(out.iterdir()):
        marker = out / PLAN_FILE
        if not marker.is_file():
            raise CompareError(f"--out {out} holds other files (it is not an rl.compare directory: no {PLAN_FILE}); "
                               "choose a new or empty --out")
        stored = json.loads(marker.read_text())
        if (stored.get("seconds"), stored.get("points")) != (plan.seconds, plan.points):
            raise CompareError(f"--out {out} holds a comparison of --seconds {stored.get('seconds'):g} --points "
                               f"{stored.get('points')}; its snapshots were taken at those times: re-run with these "
                               "values to continue it, or choose a new --out")
    for alg, seed in plan.runs():
        name = run_name(alg, seed)
        for stored in (out / "runs" / name / "config.yaml", out / "snapshots" / name / "point-01" / "config.yaml"):
            if stored.is_file():
                diff = {k: v for k, v in changed_keys(load_config(str(stored)), plan.config_of(alg, seed)).items()
                        if k not in _FREE_KEYS}
                if diff:
                    listed = ", ".join(f"{k} ({a!r} -> {b!r})" for k, (a, b) in diff.items())
                    raise CompareError(f"{stored.parent} was made with other settings: {listed}. Re-run with the "
                                       f"arguments it was made with, or choose a new --out")


# -- training in chunks ----------------------------------------------------------------------

def _snapshots(root: Path, points: int) -> list[Snapshot]:
    """The complete snapshots point-01, point-02, ... (stopping at the first missing one)."""
    done = []
    for point in range(1, points + 1):
        path = root / f"point-{point:02d}"
        if not (has_tree(path) and (path / "meta.json").is_file()):
            break
        meta = json.loads((path / "meta.json").read_text())
        done.append(Snapshot(point, meta["step"], meta["seconds"], path))
    return done


def _wall_time(run_dir: Path, step: int) -> float:
    """Seconds from the start of the invocation that trained `step` to the end of that step."""
    records = [m for m in read_metrics(run_dir / "metrics.jsonl") if m.get("step") == step]
    if not records:
        raise CompareError(f"{run_dir}/metrics.jsonl has no record of step {step}: the run's log is incomplete; "
                           "choose a new --out")
    return float(records[-1]["wall_time"])


def _checkpoint_step(ckpt: Path) -> int:
    """The step of a checkpoint, from its JSON part (the step is a plain number there)."""
    return int(json.loads((ckpt / "state.json").read_text())["step"])


def _trained(run_dir: Path, root: Path, step: int, elapsed: float) -> tuple[int, float]:
    """(last step, training seconds) of the run now: the last snapshot's, or beyond it when an
    interrupted invocation (recorded in pending.json before it started) checkpointed further."""
    ckpt = latest_checkpoint(run_dir) if run_dir.is_dir() else None
    if ckpt is None:
        if step >= 0:
            raise CompareError(f"{run_dir} has no checkpoint but {root} has snapshots: the run cannot continue; "
                               f"move {root} aside or choose a new --out")
        return step, elapsed
    ck_step = _checkpoint_step(ckpt)
    if ck_step == step:
        return step, elapsed
    pending = json.loads((root / "pending.json").read_text()) if (root / "pending.json").is_file() else None
    if pending is None or ck_step < step:
        raise CompareError(f"{run_dir} (step {ck_step}) does not continue its snapshots in {root} (step {step}); "
                           "choose a new --out")
    if ck_step < pending["from_step"]:  # the pending invocation stopped before its first checkpoint
        return ck_step, pending["elapsed"]
    return ck_step, pending["elapsed"] + _wall_time(run_dir, ck_step)


def _train_chunk(plan: Plan, alg: str, seed: int, step: int, elapsed: float, budget: float) -> tuple[int, float]:
    """Train `budget` more seconds (one rl.train invocation); returns (last step, training seconds)."""
    import rl.train

    name = run_name(alg, seed)
    run_dir, root = plan.out / "runs" / name, plan.out / "snapshots" / name
    root.mkdir(parents=True, exist_ok=True)
    (root / "pending.json").write_text(json.dumps({"from_step": step + 1, "elapsed": elapsed}) + "\n")
    log = plan.out / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    cfg = plan.config_of(alg, seed, budget)
    resume = run_dir.is_dir() and latest_checkpoint(run_dir) is not None
    with open(log, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        print(f"\n[rl.compare] {name}: {budget:.2f} s more from step {step + 1} ({elapsed:.2f} s trained)", flush=True)
        try:
            if resume:
                rl.train.run(cfg, resume=run_dir)
            else:  # a first chunk that stopped before its first checkpoint is moved aside, not mixed in
                rl.train.run(cfg, out_dir=run_dir, fresh=run_dir.is_dir() and any(run_dir.iterdir()))
        except Exception as err:
            print(f"[rl.compare] stopped: {err}", flush=True)
            raise
    ck_step = _checkpoint_step(latest_checkpoint(run_dir))
    return ck_step, elapsed + _wall_time(run_dir, ck_step)


def _write_snapshot(run_dir: Path, root: Path, point: int, seconds: float, target: float) -> Snapshot:
    """point-<j>/: the latest checkpoint's EMA (the model rl.train evaluates and exports) as a
    checkpoint-shaped directory that rl.plumbing.model_ref.resolve_model loads; written atomically."""
    ckpt = latest_checkpoint(run_dir)
    state = load_checkpoint(ckpt)
    final = root / f"point-{point:02d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".tmp-point-{point:02d}-"))
    meta = {"point": point, "step": int(state["step"]), "seconds": seconds, "target_seconds": target}
    save_tree({"ema": state["ema"], **meta}, tmp)
    (tmp / "meta.json").write_text(json.dumps(meta) + "\n")
    shutil.copy(ckpt / "config.yaml", tmp / "config.yaml")
    if final.exists():  # a later point left from before an earlier one went missing: rewritten in order
        shutil.rmtree(final)
    os.replace(tmp, final)
    return Snapshot(point, meta["step"], seconds, final)


def train_run(plan: Plan, alg: str, seed: int, bar=None) -> list[Snapshot]:
    """Train (alg, seed) through its K points, reusing the snapshots already taken.

    Chunk j's budget is j S/K minus the seconds already trained, so the overshoot of a chunk (it
    ends after the first step past its budget) does not accumulate over the points."""
    name = run_name(alg, seed)
    run_dir, root = plan.out / "runs" / name, plan.out / "snapshots" / name
    for stale in root.glob(".tmp-point-*"):  # a writer killed mid-snapshot
        shutil.rmtree(stale, ignore_errors=True)
    done = _snapshots(root, plan.points)
    if bar is not None:
        bar.update(len(done))
    if len(done) == plan.points:
        return done
    step, elapsed = (done[-1].step, done[-1].seconds) if done else (-1, 0.0)
    step, elapsed = _trained(run_dir, root, step, elapsed)
    for point in range(len(done) + 1, plan.points + 1):
        target = point * plan.seconds / plan.points
        if bar is not None:
            bar.set_postfix_str(f"{name} point {point}/{plan.points}")
        if elapsed < target:  # else the previous chunk's last step already ran past this point
            step, elapsed = _train_chunk(plan, alg, seed, step, elapsed, target - elapsed)
        done.append(_write_snapshot(run_dir, root, point, elapsed, target))
        if bar is not None:
            bar.update(1)
    return done


# -- the whole comparison --------------------------------------------------------------------

def run_compare(plan: Plan, progress: bool = True) -> dict[str, Any]:
    """Train every (algorithm, seed) in chunks, evaluate every snapshot, write the report into
    plan.out; returns compare.json's content."""
    from tqdm import tqdm

    check_out_dir(plan)
    plan.out.mkdir(parents=True, exist_ok=True)
    (plan.out / PLAN_FILE).write_text(json.dumps({"tool": "rl.compare", "seconds": plan.seconds,
                                                  "points": plan.points}) + "\n")
    snapshots: dict[tuple[str, int], list[Snapshot]] = {}
    with tqdm(total=len(plan.runs()) * plan.points, desc="rl.compare training", unit="point",
              disable=not progress, dynamic_ncols=True) as bar:
        for alg, seed in plan.runs():
            snapshots[alg, seed] = train_run(plan, alg, seed, bar)
    first = plan.algorithms[0]
    evaluator = SnapshotEvaluator(plan.configs, plan.per_task, f"{first}'s config ({plan.config_files[first]})",
                                  noise_seed=NOISE_SEED)
    results: dict[str, list[list[PointResult]]] = {alg: [] for alg in plan.algorithms}
    with tqdm(total=1 + len(plan.runs()) * plan.points, desc="rl.compare held-out evaluation", unit="model",
              disable=not progress, dynamic_ncols=True) as bar:
        base = evaluator.evaluate(None, plan.out / "evals" / "base.json")
        bar.update(1)
        for alg, seed in plan.runs():
            curve = []
            for snap in snapshots[alg, seed]:
                cache = plan.out / "evals" / run_name(alg, seed) / f"point-{snap.point:02d}.json"
                curve.append(evaluator.evaluate(snap, cache))
                bar.update(1)
            results[alg].append(curve)
    settings = {"algorithms": plan.algorithms, "seconds": plan.seconds, "points": plan.points, "seeds": plan.seeds,
                "per_task": plan.per_task, "configs": plan.config_files, "overrides": plan.overrides,
                "evaluation": evaluator.description, "noise_seed": NOISE_SEED}
    report = build_report(base, results, evaluator.tasks, settings)
    (plan.out / "compare.json").write_text(json.dumps(report, indent=2) + "\n")
    (plan.out / "compare.md").write_text(markdown(report))
    plot_reward(report, plan.out / "reward.png")
    plot_truth(report, plan.out / "truth.png")
    return report


def main(argv: list[str] | None = None) -> int:
    """The command line (see the module docstring); returns the exit status."""
    p = argparse.ArgumentParser(prog="python -m rl.compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--algorithms", default="nft,grpo,awm,refl", help="comma-separated, of nft, refl, grpo, awm")
    p.add_argument("--seconds", type=float, required=True, help="training seconds per run (set-up, evaluation excluded)")
    p.add_argument("--seeds", type=int, default=1, help="runs per algorithm, train.seed = 0..N-1 (default 1)")
    p.add_argument("--points", type=int, default=4, help="snapshots per run, equally spaced in time (default 4)")
    p.add_argument("--per-task", type=int, default=24, help="held-out conditions per task (default 24)")
    p.add_argument("--config", action="append", default=[], metavar="ALG=FILE",
                   help="an algorithm's config (default configs/tiny_<alg>.yaml); FILE alone: its train.algorithm's")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every algorithm")
    p.add_argument("--out", required=True, help="the comparison's directory (new, empty, or this comparison's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    try:
        plan = make_plan(args.algorithms, args.seconds, args.out, seeds=args.seeds, points=args.points,
                         per_task=args.per_task, configs=args.config, overrides=args.overrides)
        report = run_compare(plan, progress=not args.no_progress)
    except (CompareError, ConfigError, RunDirError) as e:
        print(f"[rl.compare] refused: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"[rl.compare] interrupted; run the same command again to continue in {args.out}", file=sys.stderr)
        return 130
    except (RuntimeError, OSError, ValueError) as e:  # RunStopped, JudgeError, CheckpointError, a full disk
        print(f"[rl.compare] stopped: {e}\n(the run's log is under {args.out}/logs; run the same command again "
              f"to continue)", file=sys.stderr)
        return 1
    print(markdown(report))
    print(f"written to {args.out}/compare.md (and compare.json, reward.png, truth.png)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
