"""Mutation check: does the suite catch deliberate bugs? (Not run by CI; takes ~10 minutes.)

    python scripts/mutants.py [--only NAME ...] [--list]

Each mutant is one textual change to one file (the `old` text must occur exactly once). It is
applied to a scratch copy of the working tree, and the tests named for it are run there; the mutant
is killed when they fail. The script prints one line per mutant and the kill rate, and exits 1 if
any mutant survives. Every new algorithm or setting adds its own mutants here.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIP = {".git", ".venv", "runs", ".pytest_cache", ".hypothesis", "__pycache__", "build", "dist"}


@dataclasses.dataclass(frozen=True)
class Mutant:
    name: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]
    also: tuple[tuple[str, str, str], ...] = ()   # more (file, old, new) edits of the same mutant

    def edits(self) -> list[tuple[str, str, str]]:
        return [(self.file, self.old, self.new), *self.also]


UPD = "tests/rl/test_update_settings.py"
DIRECTION = "tests/rl/test_learning_direction.py"
SAFETY = "tests/rl/test_run_safety.py"
GRPO_AWM = "tests/rl/test_grpo_awm.py"
OVERLAP = "tests/rl/test_judge_overlap.py"

MUTANTS = [
    # the trainers
    Mutant("nft minimises the reward (1 - r)", "rl/algorithms/nft.py", "r = groups.r.reshape(N)[mine].float()",
           "r = 1 - groups.r.reshape(N)[mine].float()", (DIRECTION,)),
    Mutant("nft ignores the filter's keep", "rl/algorithms/nft.py", "loss = (per_sample * keep[c]).sum() * scale",
           "loss = per_sample.sum() * scale", (UPD + "::test_the_filter_keep_decides_which_groups_teach",)),
    Mutant("refl static and dynamic references swapped", "rl/algorithms/refl.py",
           'return self.ema if self.cfg.refl.reference == "dynamic" else self.ref',
           'return self.ref if self.cfg.refl.reference == "dynamic" else self.ema', (UPD,)),
    Mutant("nft.adaptive ignored", "rl/algorithms/nft.py", "adaptive=nft.adaptive", "adaptive=True", (UPD,)),
    Mutant("nft.beta ignored", "rl/algorithms/nft.py", "beta=nft.beta", "beta=1.0", (UPD,)),
    Mutant("nft.kl_coef's reference velocity dropped", "rl/algorithms/nft.py",
           "v_ref = self.policy.velocity(x_t, t, sub, weights=self.ref) if nft.kl_coef > 0 else None",
           "v_ref = None", (UPD,)),
    Mutant("nft.clip ignored", "rl/algorithms/nft.py", "std=nft.std, clip=nft.clip", "std=nft.std, clip=5.0", (UPD,)),
    Mutant("nft.std ignored", "rl/algorithms/nft.py", "std=nft.std, clip", 'std="group", clip', (UPD,)),
    Mutant("nft filter rule ignored", "rl/algorithms/nft.py", "rule=nft.filter_rule)", 'rule="paper")', (UPD,)),
    Mutant("nft.mask_loss ignored", "rl/algorithms/nft.py", "if nft.mask_loss:", "if False:", (UPD,)),
    Mutant("nft.shared_noise ignored", "rl/algorithms/nft.py", "n_draws, rep = (K, G) if nft.shared_noise else (N, 1)",
           "n_draws, rep = (N, 1)", (UPD,)),
    Mutant("nft.time_sampling ignored", "rl/algorithms/nft.py", "n_train, nft.time_sampling, gen)", 'n_train, "uniform", gen)',
           (UPD,)),
    Mutant("optim.micro_batch ignored", "rl/algorithms/nft.py", "micro = cfg.optim.micro_batch or n_local", "micro = n_local",
           (UPD,)),
    Mutant("rollout with the trained policy, not the sampling one", "rl/algorithms/nft.py",
           "x0 = self.generate(sub, noise[c], self.old,", "x0 = self.generate(sub, noise[c], None,", (UPD,)),
    Mutant("sampling policy never follows", "rl/algorithms/nft.py",
           "lerp_(self.old, self.params, old_policy_decay(step, nft.old_decay_rate, nft.old_decay_max))",
           "lerp_(self.old, self.params, 0.0)", (UPD,)),
    Mutant("EMA decay schedule ignored", "rl/algorithms/trainer.py",
           "lerp_(self.ema, self.params, ema_decay(step, self.cfg.train.ema_max_decay))",
           "lerp_(self.ema, self.params, self.cfg.train.ema_max_decay)", (UPD,)),
    Mutant("sampling-policy decay always at its cap", "rl/algorithms/weight_copies.py", "return min(rate * step, maximum)",
           "return maximum", (UPD,)),
    Mutant("EMA decay always at its cap", "rl/algorithms/weight_copies.py",
           "return min((1.0 + step) / (10.0 + step), maximum)", "return maximum", (UPD,)),
    Mutant("gradient clip ignored", "rl/algorithms/trainer.py",
           "clip_grad_norm_(params, self.cfg.optim.grad_clip)", 'clip_grad_norm_(params, float("inf"))', (UPD,)),
    Mutant("refl reward bound ignored", "rl/algorithms/refl.py", "loss = torch.relu(bound - reward).sum()",
           "loss = (1 - reward).sum()", (UPD,)),
    Mutant("refl minimises the reward", "rl/algorithms/refl.py", "loss = torch.relu(bound - reward).sum()",
           "loss = torch.relu(bound + reward).sum()", (DIRECTION,)),
    Mutant("DDP loss scale without the world size", "rl/algorithms/nft.py", "scale = ctx.world_size / (kept_total * n_train)",
           "scale = 1 / (kept_total * n_train)", ("tests/rl/test_distributed.py",)),
    Mutant("resume off by one step", "rl/train.py", 'start = state["step"] + 1', 'start = state["step"] + 2',
           ("tests/rl/test_train.py::test_resume_gives_identical_weights",)),
    Mutant("grpo minimises the reward (-A)", "rl/algorithms/grpo.py", "v, x_t, x_next, adv.advantage[c], logp_old,",
           "v, x_t, x_next, -adv.advantage[c], logp_old,", (DIRECTION,)),
    Mutant("grpo's log-probability counts the known region", "rl/algorithms/grpo.py", "mask=sub.blend_mask, clip_range",
           "mask=None, clip_range", (GRPO_AWM,)),
    Mutant("grpo's first mini-batch off-policy", "rl/algorithms/grpo.py",
           "logp_old = None if not applied_any else traj.logp[c, j]", "logp_old = traj.logp[c, j]", (GRPO_AWM,)),
    Mutant("grpo's KL not Flow-GRPO's (no step length)", "rl/algorithms/grpo.py",
           "kl_coef=g.kl_coef * (times[k] - times[k + 1])", "kl_coef=g.kl_coef", (GRPO_AWM,)),
    Mutant("grpo mini-batches contiguous per process", "rl/algorithms/grpo.py",
           "idx = [p for p in range(n) if (batch.mine.start + p) % U == u]",
           "idx = list(range(u * n // U, (u + 1) * n // U))", ("tests/rl/test_distributed.py",)),
    Mutant("grpo rollouts noisy at every step", "rl/algorithms/sde_rollout.py",
           "levels = [noise_level if (k in steps or not sde_only_trained) else 0.0",
           "levels = [noise_level if True else 0.0", (GRPO_AWM,)),
    Mutant("awm minimises the reward (-A)", "rl/algorithms/awm.py", "a_hat = adv.advantage * (",
           "a_hat = -adv.advantage * (", (DIRECTION,)),
    Mutant("awm's loss counts the known region", "rl/algorithms/awm.py",
           "m = mask.to(d.dtype).expand_as(d).reshape(d.shape[0], -1)", "m = torch.ones_like(d).reshape(d.shape[0], -1)",
           (GRPO_AWM,)),
    # the rollout in chunks, judged in a background thread (judge.overlap), and a judge on several endpoints
    Mutant("overlapped chunks scored out of order", "rl/algorithms/judge_pipeline.py",
           "answers = [f.result() for f in self._chunks]", "answers = [f.result() for f in self._chunks[::-1]]",
           (OVERLAP,)),
    Mutant("chunks draw their own SDE noise", "rl/algorithms/trainer.py",
           "torch.randn(noise.shape, generator=gen, dtype=dtype)[rows]",
           "torch.randn(noise[rows].shape, generator=gen, dtype=dtype)", (OVERLAP,)),
    Mutant("grpo chunks ignore the process's rows", "rl/algorithms/grpo.py",
           "rows = slice(mine.start + c.start, mine.start + c.stop)", "rows = c", (OVERLAP,)),
    Mutant("a judge failure in the overlap thread is dropped", "rl/algorithms/judge_pipeline.py",
           "                future.set_exception(err)", "                future.set_result(None)", (OVERLAP,)),
    Mutant("endpoints not balanced", "reward/judges/api_judge.py",
           "return min(fresh, key=lambda i: self.endpoints[i].in_flight), False", "return fresh[0] * 0, False",
           ("tests/reward/test_api_judge.py",)),
    Mutant("a failing endpoint's retry waits instead of moving on", "reward/judges/api_judge.py",
           "return min(fresh, key=lambda i: self.endpoints[i].in_flight), False",
           "return min(fresh, key=lambda i: self.endpoints[i].in_flight), bool(failed_here)",
           ("tests/reward/test_api_judge.py",)),
    # run safety
    Mutant("non-finite weights after a step unchecked", "rl/algorithms/trainer.py",
           "self.weights_nonfinite = float(self.ctx.all_reduce_sum(bad)) > 0", "self.weights_nonfinite = False",
           (SAFETY,)),
    Mutant("checkpoints of non-finite weights allowed", "rl/plumbing/checkpoint.py", "bad = nonfinite_copies(state)",
           "bad = []", (SAFETY,)),
    Mutant("a reused --out is not refused", "rl/plumbing/run_dir.py", "any(run_dir.iterdir()) and not fresh:",
           "any(run_dir.iterdir()) and False:",
           (SAFETY,)),
    Mutant("a resume may change anything", "rl/plumbing/run_dir.py", "if k not in RESUMABLE_KEYS}", "if False}", (SAFETY,)),
    Mutant("optim.grad_clip's range unchecked", "rl/plumbing/config_checks.py", '"optim.grad_clip": Range(0, open_lo=True,',
           '"optim.grad_clip": Range(None, open_lo=True,', ("tests/rl/test_config.py",)),
    # the reward-hacking monitor
    Mutant("monitor change is last minus first (not robust)", "rl/evaluation/monitor.py",
           "return statistics.median(slopes) * (pts[-1][0] - pts[0][0])", "return pts[-1][1] - pts[0][1]",
           ("tests/rl/test_hacking_monitor.py",)),
    Mutant("monitor warns without a rising judge", "rl/evaluation/monitor.py",
           "if judge is None or not judge > judge_rise:", "if judge is None:", ("tests/rl/test_hacking_monitor.py",)),
    Mutant("monitor state not checkpointed", "rl/train.py", '            state["monitor"] = monitor.state_dict()\n',
           "            pass\n", ("tests/rl/test_hacking_monitor.py",)),
    # judges
    Mutant("the judges' final score check disabled", "reward/judge.py", "    if bool(bad.any()):\n",
           "    if False:\n", ("tests/reward",)),
    # samplers and kernels
    Mutant("blend skipped on the last step", "core/sampling/samplers.py", "        if blend is not None:\n            v_step",
           "        if blend is not None and t_next > 0:\n            v_step", ("tests/core/test_samplers.py",)),
    Mutant("group std with ddof 1 (reference)", "kernels/reference.py",
           "sigma_g = ((s - mu[:, None]) ** 2).mean(1).sqrt()",
           "sigma_g = ((s - mu[:, None]) ** 2).sum(1).div(s.shape[1] - 1).sqrt()", ("tests/kernels",)),
    Mutant("filter rules swapped (reference)", "kernels/reference.py", 'elif rule == "paper":',
           'elif rule == "strict":', ("tests/kernels",)),
    Mutant("reward map 1/2 + A/c (reference)", "kernels/reference.py", "r = 0.5 + adv / (2 * clip)",
           "r = 0.5 + adv / clip", ("tests/kernels",)),
    # one consistent mistake in the Triton kernel and its reference alike: only the spec cases can see it
    Mutant("paper filter > becomes >= (kernel and reference)", "kernels/reference.py",
           "keep = ~((mu > tau_mean) & (sigma_g < tau_std))", "keep = ~((mu >= tau_mean) & (sigma_g < tau_std))",
           ("tests/kernels",), also=(("kernels/group_rewards.py", "keep = ~((mu > tau_mean) & (sigma < tau_std))",
                                      "keep = ~((mu >= tau_mean) & (sigma < tau_std))"),)),
    Mutant("reward map 0.6 + A/2c (kernel and reference)", "kernels/reference.py", "r = 0.5 + adv / (2 * clip)",
           "r = 0.6 + adv / (2 * clip)", ("tests/kernels",),
           also=(("kernels/group_rewards.py", "0.5 + a / (2.0 * clip)", "0.6 + a / (2.0 * clip)"),)),
    Mutant("grpo clip holds on the wrong side (kernel)", "kernels/grpo_loss.py",
           "held = ((adv > 0) & (rho > hi)) | ((adv < 0) & (rho < lo))",
           "held = ((adv > 0) & (rho < lo)) | ((adv < 0) & (rho > hi))", ("tests/kernels/test_grpo_loss.py",)),
    Mutant("grpo log-probability without its 1/2 (kernel and reference)", "kernels/reference.py",
           "return -quad / (2 * s**2 * _nonzero(count))", "return -quad / (s**2 * _nonzero(count))",
           ("tests/kernels/test_spec.py",),
           also=(("kernels/grpo_loss.py", "logp = -(q / (2.0 * s2.to(tl.float64) * count))",
                  "logp = -(q / (s2.to(tl.float64) * count))"),)),
    Mutant("blend re-noises at t, not t' (reference)", "kernels/reference.py",
           "renoised = (1 - tn) * x0_known.to(acc) + tn * noise.to(acc)",
           "renoised = (1 - tt) * x0_known.to(acc) + tt * noise.to(acc)", ("tests/kernels",)),
]


def copy_tree(dst: Path) -> None:
    def ignore(_dir, names):
        return [n for n in names if n in SKIP or n.endswith(".egg-info")]

    shutil.copytree(ROOT, dst, ignore=ignore, dirs_exist_ok=True)


def run_tests(tree: Path, tests: tuple[str, ...]) -> tuple[bool, float]:
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONDONTWRITEBYTECODE": "1"}
    tic = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
                          cwd=tree, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc.returncode == 0, time.perf_counter() - tic


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="*", help="run the mutants whose name contains one of these words")
    p.add_argument("--list", action="store_true", help="list the mutants and exit")
    args = p.parse_args(argv)
    chosen = [m for m in MUTANTS if not args.only or any(w in m.name for w in args.only)]
    if args.list:
        for m in chosen:
            print(f"{m.name:55s} {m.file:22s} {' '.join(m.tests)}")
        return 0
    with tempfile.TemporaryDirectory(prefix="mutants-") as tmp:
        tree = Path(tmp) / "tree"
        copy_tree(tree)
        # the scratch copy must be what the tests import, not the editable install
        probe = subprocess.run([sys.executable, "-c", "import rl, kernels; print(rl.__file__)"], cwd=tree,
                               env={**os.environ, "PYTHONPATH": str(tree)}, capture_output=True, text=True)
        if not probe.stdout.strip().startswith(str(tree)):
            print(f"the scratch copy is not imported first ({probe.stdout.strip() or probe.stderr.strip()})")
            return 2
        killed = 0
        for m in chosen:
            originals = {f: (tree / f).read_text() for f, _, _ in m.edits()}
            stale = [f for f, old, _ in m.edits() if originals[f].count(old) != 1]
            if stale:
                print(f"STALE    {m.name}: the text to mutate does not occur exactly once in {stale}")
                continue
            for f, old, new in m.edits():
                (tree / f).write_text((tree / f).read_text().replace(old, new))
            try:
                passed, seconds = run_tests(tree, m.tests)
            finally:
                for f, text in originals.items():
                    (tree / f).write_text(text)
            killed += not passed
            print(f"{'killed ' if not passed else 'SURVIVED'} {m.name:55s} {seconds:5.0f} s", flush=True)
        print(f"\nkill rate: {killed}/{len(chosen)} ({100 * killed / max(len(chosen), 1):.0f}%)")
        return 0 if killed == len(chosen) else 1


if __name__ == "__main__":
    sys.exit(main())
