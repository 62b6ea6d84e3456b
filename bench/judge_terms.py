"""The rule judge's identity content terms (reward/judges/content_terms.py): seconds for a step's batch.

A default step judges 48 images; the terms must stay a small share of the step (~1.8 s on 2 cores).
"""
from __future__ import annotations

import statistics
import time

import torch

COLUMNS = [("term", "term", "{}"), ("images", "images", "{}"), ("forward ms", "forward_ms", "{:.1f}"),
           ("fwd+bwd ms", "backward_ms", "{:.1f}")]


def run(device: torch.device, quick: bool, log) -> list[dict]:
    from core.synthetic.world import SyntheticWorld
    from reward.judges.content_terms import fill_alignment_term
    from reward.judges.extend_terms import extend_alignment_term
    from reward.judges.rule_judge import RuleJudge
    from reward.judges.text_terms import text_accuracy_term

    repeats = 3 if quick else 10
    rows = []
    world = SyntheticWorld(seed=0)
    # extend: only conditions whose prompt describes an object in the new area have this term
    described = [s for s in world.held_out("extend", 160) if RuleJudge._creates_content("extend", s)][:48]
    for name, term, samples in (("text_accuracy", text_accuracy_term, world.held_out("text", 48)),
                                ("fill_alignment", fill_alignment_term, world.held_out("fill", 48)),
                                ("extend_alignment", extend_alignment_term, described)):
        edited = torch.stack([s.target for s in samples]).to(device)
        term(edited, samples)  # warm-up
        fwd, bwd = [], []
        for _ in range(repeats):
            tic = time.perf_counter()
            term(edited, samples)
            fwd.append(time.perf_counter() - tic)
            x = edited.clone().requires_grad_(True)
            tic = time.perf_counter()
            term(x, samples).sum().backward()
            bwd.append(time.perf_counter() - tic)
        rows.append({"term": name, "images": len(samples), "forward_ms": 1e3 * statistics.median(fwd),
                     "backward_ms": 1e3 * statistics.median(bwd)})
        log(f"{name}: {rows[-1]['forward_ms']:.1f} ms forward")
    return rows
