"""Held-out evaluation of many snapshots of many runs against one base model (`rl.compare`).

One base policy, one judge, one set of held-out conditions and one noise seed for every snapshot,
so that two snapshots' numbers differ only by their weights. A snapshot is a checkpoint-shaped
directory holding the EMA weights (what rl.train evaluates and exports); each result is cached as
JSON with everything it depends on, so a re-run evaluates only what changed.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from core.config.loading import to_dict
from core.io.tensor_store import load_tree
from core.tasks import ALL_TASKS
from rl.evaluation.compare_report import PointResult
from rl.plumbing.config import RunConfig


@dataclasses.dataclass
class Snapshot:
    """A run's EMA at one wall-clock point."""

    point: int
    step: int           # the last optimiser step before it
    seconds: float      # measured training seconds
    path: Path          # the directory (state.safetensors + state.json + config.yaml)


class SnapshotEvaluator:
    """Edits and scores the held-out conditions with the base model or a snapshot.

    `configs`: every compared run's config; the first one's data, judge and sampler evaluate all (they
    must share the base model and the data, which rl.compare checks). The tasks are every task any of
    them trains on."""

    def __init__(self, configs: dict[str, RunConfig], per_task: int, source: str, noise_seed: int):
        self.cfg = next(iter(configs.values()))
        trained = {t for cfg in configs.values() for t, w in cfg.data.mixture.items() if w > 0}
        self.tasks = [t for t in ALL_TASKS if t in trained]
        self.per_task, self.noise_seed = per_task, noise_seed
        s, j = self.cfg.sampler, self.cfg.judge
        self.method = "euler" if s.method == "sde" else s.method  # the SDE without its noise, as rl.eval
        self.description = (f"{source}: judge {j.kind} ({j.eval_mode}), sampler {self.method} with {s.eval_steps} "
                            f"steps, tasks {', '.join(self.tasks)}")
        self.fingerprint = {"model": to_dict(self.cfg.model), "data": to_dict(self.cfg.data), "tasks": self.tasks,
                            "judge": [j.kind, j.model, j.eval_mode], "sampler": [self.method, s.eval_steps, s.shift],
                            "seed": noise_seed, "per_task": per_task}
        self._built: dict[str, Any] | None = None

    def _build(self) -> dict[str, Any]:
        # on first need only: a re-run whose evaluations are all cached loads no model
        if self._built is None:
            from rl.evaluation.heldout import held_out_samples
            from rl.plumbing.builders import build_data, build_judge, rollout_sigmas
            from rl.plumbing.distributed import resolve_device
            from rl.plumbing.model_ref import resolve_model

            device = resolve_device(self.cfg.model.device)
            # once for all snapshots (a snapshot differs only in its trainable weights), where
            # resolve_model(snapshot) would load the whole base model again for each
            policy, _, _ = resolve_model("base", device, self.cfg.model, self.cfg.data.image_size)
            data = build_data(self.cfg.data)
            self._built = {"device": device, "policy": policy, "judge": build_judge(self.cfg.judge, device),
                           "samples": held_out_samples(data, self.tasks, self.per_task), "truth": data.has_truth,
                           "sigmas": rollout_sigmas(policy, self.cfg.sampler.eval_steps, self.cfg.sampler.shift)}
        return self._built

    def evaluate(self, snapshot: Snapshot | None, cache: Path) -> PointResult:
        """The base model (None) or a snapshot on the held-out conditions, from `cache` when it holds
        the result of the same evaluation."""
        key = {**self.fingerprint, "snapshot": None if snapshot is None else [snapshot.step, snapshot.seconds]}
        if cache.is_file():
            stored = json.loads(cache.read_text())
            if stored.get("fingerprint") == key:
                return PointResult(**stored["result"])
        from rl.evaluation.heldout import generate_images, score_images

        b = self._build()
        weights = None
        if snapshot is not None:
            weights = {k: v.to(b["device"]) for k, v in load_tree(snapshot.path)["ema"].items()}
            missing = set(b["policy"].trainable_parameters()) - set(weights)
            if missing:
                raise ValueError(f"{snapshot.path} does not match the base model: {len(missing)} weights missing, "
                                 f"e.g. {sorted(missing)[:3]}")
        images = generate_images(b["policy"], b["samples"], weights=weights, sigmas=b["sigmas"], method=self.method,
                                 seed=self.noise_seed, device=b["device"])
        others = None
        if self.cfg.judge.eval_mode == "pairwise":  # against the base model's edits, made once
            if "base_images" not in b:
                b["base_images"] = images if weights is None else generate_images(
                    b["policy"], b["samples"], weights=None, sigmas=b["sigmas"], method=self.method,
                    seed=self.noise_seed, device=b["device"])
            others = b["base_images"]
        r = score_images(b["judge"], b["samples"], images, with_truth=b["truth"], mode=self.cfg.judge.eval_mode,
                         others=others)
        result = PointResult(0.0 if snapshot is None else snapshot.seconds, -1 if snapshot is None else snapshot.step,
                             float(r.reward.mean()), r.reward_by_task(), r.ground_truth_means())
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({"fingerprint": key, "result": dataclasses.asdict(result),
                                     "per_image": [{"key": s.key, "task": s.task, "reward": float(v)}
                                                   for s, v in zip(r.samples, r.reward.tolist())]}) + "\n")
        return result
