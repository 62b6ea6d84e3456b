"""Preference data for the reward-model demo, built the way OneReward built theirs, on the world.

For each synthetic-world condition the built-in toy FLUX.1 Fill makes four candidates with different
sampler settings (step count, solver, stochastic noise, guidance — as the paper varied its
generator), the rule judge plays the annotator: per dimension of the task it picks the best and
the worst candidate (best-of-N / worst-of-N), and with probability `label_noise` the annotator errs
and a training pair is flipped (held-out pairs keep the rule judge's labels). Dimensions that share the same (best, worst) pair become one multi-label
record. Conditions are split 80/20 into train and held-out records.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import NamedTuple

import torch

from core.io.image_io import save_image
from core.sampling.samplers import sample_policy
from core.synthetic.world import SyntheticWorld, collate
from core.tasks import dimensions_for
from reward.judge import JudgeRequest
from reward.judges.rule_judge import RuleJudge


class Candidate(NamedTuple):
    """One sampler setting of the editor."""

    steps: int
    method: str                 # core.sampling.samplers.METHODS
    noise_level: float = 0.0    # "sde" only
    cfg_scale: float = 1.0      # true CFG against the empty prompt; 1 = off, 0 = unconditional


CANDIDATE_SETTINGS: tuple[Candidate, ...] = (
    Candidate(8, "dpm2"), Candidate(8, "dpm2", cfg_scale=3.0), Candidate(8, "dpm2", cfg_scale=0.0),
    Candidate(8, "sde", noise_level=1.4))
DEMO_TASKS = ("fill", "extend", "removal", "text")
MIN_GAP = 0.03  # a best/worst pair closer than this in rule-judge quality is too ambiguous to label
NEGATIVE_PROMPT = ""


def _candidates(policy, samples, seed: int, settings=CANDIDATE_SETTINGS) -> torch.Tensor:
    """Images [N, K, 3, H, W]: each condition edited with every candidate setting."""
    batch = collate(samples)
    with torch.no_grad():
        cond = policy.encode(batch.images, batch.masks, batch.prompts)
        uncond = None
        out = []
        for k, c in enumerate(settings):
            if c.cfg_scale != 1.0 and uncond is None:
                uncond = policy.encode(batch.images, batch.masks, [NEGATIVE_PROMPT] * len(samples))
            g = torch.Generator().manual_seed(seed * 31 + k)
            noise = torch.randn(cond.x0_known.shape, generator=g)
            x0 = sample_policy(policy, cond, sigmas=policy.schedule(c.steps), method=c.method, noise=noise,
                               noise_level=c.noise_level, generator=g, cfg_scale=c.cfg_scale,
                               uncond=uncond if c.cfg_scale != 1.0 else None)
            out.append(policy.decode(x0, cond).clamp(0, 1))
    return torch.stack(out, 1)


FAILURES = ("unchanged", "ghost", "blotch")


def failure_candidates(samples, edits: torch.Tensor, seed: int) -> torch.Tensor:
    """[N, len(FAILURES), 3, H, W]: the editor's edit spoilt inside the mask in the ways RL against a
    judge trained only on sampler variations learned to please it (docs/results.md): the input left
    as it was (the object not removed, the canvas not extended), a ghost (half input, half edit), and
    dark smooth blotches over the edit."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for s, edit in zip(samples, edits):
        m = s.mask
        h, w = edit.shape[-2:]
        field = torch.rand(1, 3, 4, 4, generator=g) * 0.5
        field = torch.nn.functional.interpolate(field, size=(h, w), mode="bilinear", align_corners=False)[0]
        spoilt = (s.source, 0.5 * s.source + 0.5 * edit, 0.4 * edit + 0.6 * field)
        out.append(torch.stack([m * x + (1 - m) * edit for x in spoilt]))
    return torch.stack(out).clamp(0, 1)


#: four edits by the training rollout's sampler that differ only in their noise: a rollout group
GROUP_SETTINGS: tuple[Candidate, ...] = (Candidate(8, "dpm2"),) * 4


def build_group_data(out_dir: str | Path, **kwargs) -> Path:
    """`build_demo_data` whose candidates are a rollout group's near-ties (`GROUP_SETTINGS`) instead of
    sampler variations: what a group algorithm's judge must rank (bench/judge_agreement.py)
    (demo_builder "reward.training.demo_data:build_group_data")."""
    return build_demo_data(out_dir, settings=GROUP_SETTINGS, **kwargs)


def build_demo_data_with_failures(out_dir: str | Path, **kwargs) -> Path:
    """`build_demo_data` plus, per condition and dimension, a pair of the best candidate against the
    worst of `failure_candidates` (demo_builder "reward.training.demo_data:build_demo_data_with_failures")."""
    return build_demo_data(out_dir, failures=True, **kwargs)


def build_demo_data(out_dir: str | Path, *, n_pairs: int = 240, seed: int = 0, label_noise: float = 0.1,
                    policy=None, world: SyntheticWorld | None = None, batch: int = 32,
                    settings=CANDIDATE_SETTINGS, min_gap: float = MIN_GAP, failures: bool = False) -> Path:
    """Write images and `preferences.jsonl` (reward/training/preference_data.py format) into `out_dir`.
    `failures`: also pair the best candidate with the worst spoilt edit (`failure_candidates`)."""
    from core.policies.flux_fill import FluxFillPolicy
    from core.toy_flux import shipped_model_dir

    settings = tuple(Candidate(*c) for c in settings)
    out = Path(out_dir)
    (out / "img").mkdir(parents=True, exist_ok=True)
    policy = policy or FluxFillPolicy.from_pretrained(shipped_model_dir())
    world = world or SyntheticWorld(seed=seed + 101)
    judge = RuleJudge()
    rng = random.Random(seed)
    records: list[dict] = []
    index = 0
    while len(records) < n_pairs:
        samples = [world.sample(DEMO_TASKS[(index + i) % len(DEMO_TASKS)], index + i) for i in range(batch)]
        images = _candidates(policy, samples, seed + index, settings)
        k = len(settings)
        if failures:
            images = torch.cat([images, failure_candidates(samples, images[:, 0], seed + index)], 1)
        for i, s in enumerate(samples):
            n = index + i
            split = "heldout" if n % 5 == 4 else "train"
            dims = dimensions_for(s.task, has_prompt=s.truth.get("has_prompt", True))
            reqs = [JudgeRequest(s.task, d, s.source, images[i, c], s.mask, s.prompt, truth=s)
                    for d in dims for c in range(images.shape[1])]
            with torch.no_grad():
                q = torch.stack([judge.quality(r.task, r.dimension, r.edited, s) for r in reqs])
            q = q.view(len(dims), images.shape[1])
            pairs: dict[tuple[int, int], list[str]] = {}
            for d, dim in enumerate(dims):
                best, worst = int(q[d, :k].argmax()), int(q[d, :k].argmin())
                choices = [(best, worst)]
                if failures:
                    choices.append((best, k + int(q[d, k:].argmin())))
                for best, worst in choices:
                    if float(q[d, best] - q[d, worst]) < min_gap:
                        continue
                    # the annotator errs on training pairs; held-out labels are the rule judge's own, so
                    # held-out accuracy measures the judge rather than the simulated annotator's slips
                    if split == "train" and rng.random() < label_noise:
                        best, worst = worst, best
                    pairs.setdefault((best, worst), []).append(dim)
            if not pairs:
                continue
            stem = f"img/{n:05d}"
            save_image(s.source, out / f"{stem}_source.png")
            save_image(s.mask, out / f"{stem}_mask.png")
            for c in {c for pair in pairs for c in pair}:
                save_image(images[i, c], out / f"{stem}_cand{c}.png")
            for (best, worst), dim_list in pairs.items():
                records.append({"source": f"{stem}_source.png", "mask": f"{stem}_mask.png", "prompt": s.prompt,
                                "task": s.task, "dimensions": dim_list, "winner": f"{stem}_cand{best}.png",
                                "loser": f"{stem}_cand{worst}.png", "split": split, "id": s.key})
        index += batch
    path = out / "preferences.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path
