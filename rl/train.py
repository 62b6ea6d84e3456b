"""`python -m rl.train`: multi-task RL of a mask-guided editor with one judge.

    python -m rl.train [--config FILE] [--set key=value ...] [--out DIR [--fresh]] [--resume DIR]
    torchrun --nproc_per_node=N -m rl.train ...       (many processes)

With no arguments it runs the built-in default on CPU: the shipped toy FLUX.1 Fill, the synthetic
world's four-task mixture, the rule judge asked pairwise and OneReward's ReFL against the policy's EMA
(configs/tiny_refl.yaml; train.algorithm: refl, nft, grpo, awm).
From Python: `rl.train.run(config)`.
`--help` lists every config key with its type, range, default and meaning.

A run directory belongs to one run (`--out` must be new or empty; `--fresh` moves an old one aside)
and holds: run.json (the run's id), config.yaml (resolved), metrics.jsonl (strict JSON),
tensorboard/, samples/*.png (labelled grids), ckpt-*/ + latest (atomic checkpoints, safetensors +
JSON; `--resume DIR` continues bit-exactly), eval_base.* (the cached base evaluation),
reward_curve.png, time_split.png, summary.json (held-out reward per task, base vs final, paired
intervals, ground truth), final/ (the trained policy, loadable with diffusers/transformers, and its
model card), and with train.tracker=wandb, wandb/ and wandb_id.txt. With monitor.every=N (the
reward-hacking monitor, rl/evaluation/monitor.py) also monitor.png, best/ (the best monitored EMA)
and best/best.json; `monitor/*` records in metrics.jsonl.
"""
from __future__ import annotations

import datetime
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from core.config.loading import ConfigError, to_dict
from reward.judge import JudgeError
from rl.evaluation.in_run import cached_base_eval, periodic_eval, sample_grid
from rl.evaluation.model_card import write_model_card
from rl.evaluation.monitor import HackingMonitor, reconcile_best
from rl.evaluation.run_summary import final_summary
from rl.plumbing.builders import build_data, build_judge, build_policy, rollout_sigmas
from rl.plumbing.checkpoint import (
    CheckpointError,
    disk_error,
    latest_checkpoint,
    load_checkpoint,
    restore_rng_states,
    save_checkpoint,
    save_sharded_checkpoint,
)
from rl.plumbing.config import RunConfig, load_config
from rl.plumbing.distributed import DistContext, init_distributed, shutdown
from rl.plumbing.run_dir import (
    RunDirError,
    check_run_dir,
    claim_run_dir,
    config_yaml,
    run_id_of,
)
from rl.plumbing.run_log import RunLog, require_tracker


class RunStopped(RuntimeError):
    """The run stopped on a fault (after saving a checkpoint); the message says why and how to resume.

    (A stop of the reward-hacking monitor, monitor.stop_on_hacking, is not a fault and not a RunStopped:
    the run ends like one that reached its time budget, with its summary, and exit status 0.)"""


def make_trainer(cfg: RunConfig, ctx: DistContext):
    from rl.algorithms.awm import AWMTrainer
    from rl.algorithms.grpo import GRPOTrainer
    from rl.algorithms.nft import NFTTrainer
    from rl.algorithms.refl import ReFLTrainer

    policy = build_policy(cfg.model, ctx.device, image_size=cfg.data.image_size)
    judge = build_judge(cfg.judge, ctx.device)
    data = build_data(cfg.data)
    sigmas = rollout_sigmas(policy, cfg.sampler.steps, cfg.sampler.shift)
    cls = {"nft": NFTTrainer, "refl": ReFLTrainer, "grpo": GRPOTrainer, "awm": AWMTrainer}[cfg.train.algorithm]
    return cls(cfg, policy, judge, data, ctx, sigmas)


def _default_out(cfg: RunConfig) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{cfg.train.algorithm}-{stamp}"


def _on_main(ctx: DistContext, run_dir: Path, fn):
    """fn() on rank 0; its result, or the same error, on every rank."""
    error, result = None, None
    if ctx.is_main:
        try:
            result = fn()
        except (RunDirError, ConfigError) as err:
            error = f"{type(err).__name__}: {err}"
        except OSError as err:
            error = f"OSError: {disk_error(err, run_dir)}"
    error, result = ctx.broadcast_object((error, result))
    if error is not None:
        kind, message = error.split(": ", 1)
        raise {"ConfigError": ConfigError, "OSError": CheckpointError}.get(kind, RunDirError)(message)
    return result


def run(config: RunConfig, out_dir: str | os.PathLike | None = None, resume: str | os.PathLike | None = None,
        ctx: DistContext | None = None, fresh: bool = False) -> dict[str, Any]:
    """Train with `config`; returns the run summary (also written to summary.json).

    `out_dir` must be new or empty (`fresh=True` moves an existing one aside); `resume` continues
    the run in that directory from its latest checkpoint, refusing config changes outside
    rl.plumbing.run_dir.RESUMABLE_KEYS."""
    cfg = config
    try:  # before any work: a missing tracker package should not surface after the model is built
        require_tracker(cfg.train.tracker)
    except ImportError as err:
        raise ConfigError(str(err)) from err
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    ctx = ctx or init_distributed(cfg.model.device)
    run_dir = Path(resume) if resume else Path(out_dir) if out_dir else _default_out(cfg)
    run_dir = Path(ctx.broadcast_object(str(run_dir)))
    state = None
    if resume:
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            raise RunDirError(f"--resume {run_dir}: no checkpoint there to continue from; "
                              f"start a new run with --out {run_dir} --fresh")
        state = load_checkpoint(ckpt, full=False)  # a sharded checkpoint: each process reads its own shards later
        if state["step"] + 1 >= cfg.train.steps:
            raise RunDirError(f"the run in {run_dir} already finished its {state['step'] + 1} steps; to train "
                              f"longer, resume with --set train.steps=N (N > {state['step'] + 1})")
    _on_main(ctx, run_dir, lambda: check_run_dir(cfg, run_dir, bool(resume), fresh))
    own_id = run_id_of(run_dir) if state is not None else None
    if state is not None and state.get("run_id") not in (None, own_id):
        raise RunDirError(f"{ckpt} belongs to another run ({state.get('run_id')}; this directory's is "
                          f"{own_id}): the directory was mixed; resume from the directory that wrote it")

    trainer = make_trainer(cfg, ctx)  # a missing model or an unreachable judge fails here, before the claim
    monitor = None
    if cfg.monitor.every:
        second_judge = _monitor_judge(cfg, ctx) if cfg.monitor.signal == "judge" else None
        monitor = HackingMonitor(cfg, run_dir, second_judge)
        monitor.check_data(trainer.data)
    run_id = _on_main(ctx, run_dir, lambda: claim_run_dir(cfg, run_dir, bool(resume), fresh))
    trainer.run_id = run_id
    trainer.hacking_monitor = monitor  # its state goes into every checkpoint (_save)
    start = 0
    if state is not None:
        trainer.load_state_dict(state)
        restore_rng_states(state["rng"])
        start = state["step"] + 1
        if monitor is not None:
            monitor.load_state_dict(state.get("monitor"))
            if ctx.is_main:
                reconcile_best(run_dir, state["step"])
    log = RunLog(run_dir, tensorboard=cfg.train.tensorboard, resume_step=start - 1, tracker=cfg.train.tracker,
                 config=to_dict(cfg)) if ctx.is_main else None

    base = None
    # FSDP2: every forward of the sharded model needs every process, so all of them run the evaluations
    # (rank 0 scores the images and writes the files; the others only take part in the forwards)
    evaluates = ctx.is_main or trainer.sharded
    if evaluates and cfg.train.eval_per_task > 0:
        base = cached_base_eval(trainer, run_dir)

    progress = _progress(cfg, ctx, start)
    stopped_at, stop_events, stop_checkpoint = None, [], None
    bad_in_a_row = 0
    t_start = time.perf_counter()
    step = start
    try:
        for step in range(start, cfg.train.steps):
            trainer.step_index = step
            trainer.updated = False
            try:
                metrics = trainer.train_step(step)
            except Exception as err:
                # a failure before the optimiser step leaves the state of the last step: save it
                saved = None if trainer.updated else _save(trainer, run_dir, step - 1, cfg, ctx)
                raise RunStopped(f"step {step} failed: {err}\n" + _continue_advice(run_dir, saved)) from err
            bad_in_a_row = bad_in_a_row + 1 if metrics.get("nonfinite") else 0
            metrics["wall_time"] = time.perf_counter() - t_start
            metrics["lr"] = trainer.optimizer.param_groups[0]["lr"]
            spent = sum(metrics.get(k, 0.0) for k in ("time_rollout", "time_judge", "time_update", "time_refresh"))
            metrics["images_per_second"] = metrics.get("images", 0) / max(spent, 1e-9)
            metrics["weights_nonfinite"] = trainer.weights_nonfinite
            events, monitored = [], None
            if monitor is not None and monitor.due(step) and not trainer.weights_nonfinite:
                events, monitored = _monitor_step(monitor, trainer, step, metrics, run_dir, ctx, progress)
            if (evaluates and cfg.train.eval_every and (step + 1) % cfg.train.eval_every == 0
                    and step < cfg.train.steps - 1 and not trainer.weights_nonfinite):
                # the monitor's evaluation of this step is the same evaluation when the sets are the same size
                same = monitored if cfg.monitor.per_task == cfg.train.eval_per_task else None
                metrics.update(periodic_eval(trainer, step, same))
            if log is not None:
                log.log(step, metrics)
            if progress is not None:
                progress.set_postfix(reward=f"{metrics['reward']:.3f}", loss=f"{metrics.get('loss', 0):.3g}")
                progress.update(1)
            if trainer.weights_nonfinite:  # never saved: the last checkpoint stays the newest
                raise RunStopped(
                    f"step {step}'s update made the weights non-finite (optim.lr {cfg.optim.lr:g} too high, or "
                    f"a non-finite gradient); no checkpoint was written from them.\n"
                    + _continue_advice(run_dir, latest_checkpoint(run_dir), "lower optim.lr"))
            if bad_in_a_row >= cfg.train.max_bad_steps:
                saved = _save(trainer, run_dir, step, cfg, ctx)
                raise RunStopped(
                    f"{bad_in_a_row} steps in a row had a non-finite loss or gradient (last: step {step}); "
                    f"stopped. Lower optim.lr or check the judge's scores.\n" + _continue_advice(run_dir, saved))
            last = step == cfg.train.steps - 1
            hacking_stop = bool(events) and cfg.monitor.stop_on_hacking
            over_budget = cfg.train.time_budget_s > 0 and ctx.broadcast_object(  # rank 0's clock decides for all
                time.perf_counter() - t_start > cfg.train.time_budget_s)
            if evaluates and cfg.train.sample_every and (step % cfg.train.sample_every == 0 or last):
                sample_grid(trainer, run_dir, step, base, log)
            if ((cfg.train.checkpoint_every and (step + 1) % cfg.train.checkpoint_every == 0) or last or over_budget
                    or hacking_stop):
                stop_checkpoint = _save(trainer, run_dir, step, cfg, ctx)
            if hacking_stop:  # a clean stop (the summary follows), not a fault: the monitor did its job
                stopped_at, stop_events = step, events
                break
            if over_budget:
                if ctx.is_main:
                    print(f"[rl.train] time budget of {cfg.train.time_budget_s:.0f} s reached at step {step}",
                          file=sys.stderr)
                break
    finally:
        if progress is not None:
            progress.close()
        if log is not None:
            log.close()

    summary: dict[str, Any] = {}
    final = None
    if evaluates and cfg.train.eval_per_task > 0:  # the final held-out evaluation (every process under FSDP2)
        from rl.evaluation.run_summary import evaluate_weights

        final = evaluate_weights(trainer, trainer.ema, "final")
    if trainer.sharded and not ctx.is_main:  # FSDP2: the export gathers the EMA from every process
        trainer.export(run_dir / "final")
    if ctx.is_main:
        extra = None if monitor is None else {"monitor": monitor.summary(stopped_at)}
        summary = final_summary(trainer, run_dir, base, steps_done=step + 1, extra=extra, final=final)
        trainer.export(run_dir / "final")
        write_model_card(run_dir / "final", cfg, summary)
        if getattr(trainer, "judge_refresh", None) is not None:
            trainer.judge_refresh.save(run_dir / "judge", cfg.judge, made_by=(
                f"refreshed for {step + 1} steps of rl.train run {run_id} (refresh.*, its config.yaml) from "
                f"{cfg.judge.model}"))
        if stopped_at is not None:  # last, so that it is the run's final word
            print(f"[rl.train] {monitor.stop_message(stopped_at, stop_events, stop_checkpoint)}", file=sys.stderr)
    ctx.barrier()
    return summary


def _monitor_judge(cfg: RunConfig, ctx: DistContext):
    """The monitor's second judge, on rank 0 (the only one that evaluates); a judge that cannot be
    built refuses the run on every rank, before any work."""
    error, judge = None, None
    if ctx.is_main:
        try:
            judge = build_judge(cfg.monitor.judge, ctx.device)
        except (JudgeError, OSError, ValueError, ImportError) as err:
            error = f"monitor.judge: {err}"
    error = ctx.broadcast_object(error)
    if error is not None:
        raise ConfigError(error)
    return judge


def _monitor_step(monitor: HackingMonitor, trainer, step: int, metrics: dict[str, Any], run_dir: Path,
                  ctx: DistContext, progress) -> tuple[list, Any]:
    """The monitor's evaluation after `step` on rank 0 (its numbers into `metrics`, its warnings to
    stderr); returns the warnings (on every rank: the stop is decided together) and the evaluation."""
    error, events, result = None, [], None
    if ctx.is_main:
        try:
            report = monitor.observe(trainer, step)
        except Exception as err:  # noqa: BLE001 (any failure of the evaluation stops the run the same way)
            error = f"{type(err).__name__}: {err}"
        else:
            metrics.update(report.metrics)
            events, result = report.events, report.result
            for event in events:
                _say(progress, f"[rl.train] {event.message()}")
    error, events = ctx.broadcast_object((error, events))
    if error is not None:
        # the monitor state is checkpointed with the weights: resuming the last checkpoint redoes this step whole
        raise RunStopped(f"the monitor's evaluation after step {step} failed: {error}\n"
                         + _continue_advice(run_dir, latest_checkpoint(run_dir)))
    return events, result


def _say(progress, message: str) -> None:
    """A line on stderr that does not tear the progress bar."""
    if progress is not None:
        progress.write(message, file=sys.stderr)
    else:
        print(message, file=sys.stderr)


def _continue_advice(run_dir: Path, checkpoint: Path | None, fix: str = "fix the cause") -> str:
    """How to go on: resume only when there is a checkpoint to resume from."""
    if checkpoint is None:
        return f"No checkpoint exists yet in {run_dir}: {fix}, then start again with --out {run_dir} --fresh."
    return (f"The newest checkpoint is {checkpoint}; {fix}, then continue with: "
            f"python -m rl.train --resume {run_dir}")


def _save(trainer, run_dir: Path, step: int, cfg: RunConfig, ctx: DistContext) -> Path | None:
    """Checkpoint `step` (nothing before step 0); returns the checkpoint written."""
    if step < 0:
        return None
    if trainer.sharded_checkpoints:  # FSDP2: every process writes its shards, rank 0 the rest
        from rl.plumbing.fsdp import sharded_state

        trees, rest = sharded_state(trainer)
        monitor = getattr(trainer, "hacking_monitor", None)
        rest.update(run_id=getattr(trainer, "run_id", None), **({} if monitor is None else
                                                               {"monitor": monitor.state_dict()}))
        return save_sharded_checkpoint(run_dir, step, trees, rest, config_yaml(cfg), ctx, keep=cfg.train.keep_checkpoints)
    path = None
    if ctx.is_main:
        state = {**trainer.state_dict(), "run_id": getattr(trainer, "run_id", None)}
        monitor = getattr(trainer, "hacking_monitor", None)
        if monitor is not None:
            state["monitor"] = monitor.state_dict()
        path = save_checkpoint(run_dir, step, state, config_yaml(cfg), keep=cfg.train.keep_checkpoints)
    ctx.barrier()
    return path


def _progress(cfg: RunConfig, ctx: DistContext, start: int):
    if not (cfg.train.progress and ctx.is_main):
        return None
    from tqdm import tqdm

    return tqdm(total=cfg.train.steps, initial=start, desc=f"rl.train [{cfg.train.algorithm}]",
                unit="step", dynamic_ncols=True)


def main(argv: list[str] | None = None) -> int:
    """The command line (see the module docstring); returns the exit status."""
    from core.config.cli import config_parser
    from rl.plumbing.config_checks import NUMERIC_RANGES

    parser = config_parser("python -m rl.train", __doc__, RunConfig, ranges=NUMERIC_RANGES, example="optim.lr=1e-4",
                           config_help="YAML config (default: the built-in tiny NFT job; with --resume: "
                                       "the run's config.yaml)")
    parser.add_argument("--out", help="run directory (default: runs/<algorithm>-<time>); must be new or empty")
    parser.add_argument("--fresh", action="store_true",
                        help="--out holds an earlier run: move it to <out>.replaced-<time> and start over")
    parser.add_argument("--resume", help="continue the run in this directory from its latest checkpoint")
    args = parser.parse_args(argv)
    try:
        if args.resume:
            stored = Path(args.resume) / "config.yaml"
            if not stored.is_file():
                raise ConfigError(f"--resume {args.resume}: no config.yaml there; is it a run directory?")
            cfg = load_config(args.config or str(stored), args.overrides)
        else:
            cfg = load_config(args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    ctx = None
    try:
        ctx = init_distributed(cfg.model.device)
        summary = run(cfg, out_dir=args.out, resume=args.resume, ctx=ctx, fresh=args.fresh)
    except (RunDirError, ConfigError) as e:
        print(f"[rl.train] refused: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full or read-only disk, say: one line, not a traceback
        print(f"[rl.train] stopped: {disk_error(e, Path(args.resume or args.out or 'runs'))}", file=sys.stderr)
        return 1
    except (RunStopped, CheckpointError, JudgeError, FileNotFoundError, ValueError) as e:
        print(f"[rl.train] stopped: {e}", file=sys.stderr)
        return 1
    finally:
        if ctx is not None:
            shutdown(ctx)
    if ctx.is_main and summary:
        print(json.dumps({k: summary[k] for k in ("run_dir", "reward_base", "reward_final", "reward_gain")
                          if k in summary}, indent=2))
    if ctx.enabled:
        # gloo can abort at interpreter exit; the work is saved, leave without running finalizers
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
