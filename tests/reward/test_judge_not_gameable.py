"""The rule judge's content dimensions, asked through its public interface, cannot be gamed.

RL against the soft-IoU judge learned to paint solid blocks of ink and blobs of the requested
colour: the judge's score rose while glyph and shape accuracy fell. Here every held-out condition
(worlds 0 and 29, 32 conditions per task; the terms were tuned on worlds 0 and 7, and world 13
held out) gets the ground truth, a noisy ground truth, a wrong but well-formed answer (another
glyph / shape in the right ink / colour and place, drawn with the world's renderers), and the
hacks: a solid block of the ink / requested colour over the edit region, the region left as it
was (the source) and noise in it. `RuleJudge.quality` must rank them truth > noisy > wrong >
every hack, on the mean with a margin and per condition, and the hacks must be worth about
nothing. Removal creates nothing: its removal_quality must rank truth > noisy > the object left
in place or noise. The variants of fill and text are those of test_content_terms.
"""
import random

import pytest
import torch
from test_content_terms import _common, _paint, fill_variants, text_variants

from core.synthetic.world import COLOURS, SHAPES, SyntheticWorld, shape_mask
from reward.judge import JudgeRequest
from reward.judges.rule_judge import RuleJudge

SEEDS, N = (0, 29), 32
HACKS = ("block", "empty", "noise")
CONTENT = {"text": "text_accuracy", "fill": "text_alignment", "extend": "text_alignment",
           "removal": "removal_quality"}


def _scene(background, objects):
    for o in objects:
        background = _paint(background, o["mask"], COLOURS[o["colour"]])
    return background


def extend_variants(s, g, rng):
    """The kept part stays the source; "wrong" continues the true scene with another shape at the
    described object's pose."""
    d, t, (H, W) = s.truth["described"], s.truth, s.source.shape[-2:]
    others = [o for o in t["objects"] if (o["cy"], o["cx"]) != (d["cy"], d["cx"])]
    other_shape = rng.choice([x for x in SHAPES if x != d["shape"]])
    wrong = {**d, "mask": shape_mask(other_shape, H, W, d["cy"], d["cx"], d["r"])}
    v = _common(s, g)
    v["wrong"] = s.source * (1 - s.mask) + _scene(t["background"], [*others, wrong]) * s.mask
    v["block"] = _paint(s.source, s.mask, COLOURS[d["colour"]])
    return v


def plain_variants(s, g, rng):
    """Extend with no described object, and removal: nothing to create, the truth to restore."""
    v = _common(s, g)
    v["grey"] = s.source * (1 - s.mask) + 0.5 * s.mask
    return v


BUILD = {"text": text_variants, "fill": fill_variants, "extend": extend_variants, "removal": plain_variants}


def conditions(task, seed, n, creates_content=True):
    """The first n held-out conditions of `task`; for extend, those whose prompt does (or does not)
    describe an object in the new area."""
    world, out, i = SyntheticWorld(seed=seed), [], 0
    while len(out) < n:
        s = world.sample(task, i, "heldout")
        i += 1
        if task != "extend" or RuleJudge._creates_content(task, s) == creates_content:
            out.append(s)
    return out


def judged(task, seed, n=N, mode=None, creates_content=True):
    """{variant: [n] quality of the task's content dimension (or its score in `mode`)}."""
    build = plain_variants if not creates_content else BUILD[task]
    judge, dim = RuleJudge(), CONTENT[task]
    g, rng = torch.Generator().manual_seed(seed), random.Random(seed)
    samples = conditions(task, seed, n, creates_content)
    variants = [build(s, g, rng) for s in samples]
    out = {}
    for name in dict.fromkeys(k for v in variants for k in v):  # some exist only for 2-glyph texts
        vals = []
        for s, v in zip(samples, variants):
            if name not in v:
                vals.append(float("nan"))
            elif mode is None:
                vals.append(float(judge.quality(task, dim, v[name], s)))
            else:
                req = JudgeRequest(task, dim, s.source, v[name], s.mask, s.prompt, truth=s)
                vals.append(float(judge.score([req], mode)[0]))
        out[name] = torch.tensor(vals)
    return out


@pytest.fixture(scope="module")
def measured():
    return {(task, seed): judged(task, seed) for task in ("text", "fill", "extend") for seed in SEEDS}


# minimum mean gaps (truth - noisy, noisy - wrong, wrong - best hack); measured on worlds 0 / 29:
# text 0.07 / 0.09, 0.66 / 0.65, 0.25 / 0.25; fill 0.11 / 0.17, 0.67 / 0.62, 0.15 / 0.14;
# extend 0.15 / 0.16, 0.63 / 0.63, 0.15 / 0.15
MEAN_GAPS = {"text": (0.04, 0.4, 0.15), "fill": (0.06, 0.4, 0.08), "extend": (0.06, 0.4, 0.08)}


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("task", ["text", "fill", "extend"])
def test_truth_beats_noisy_beats_wrong_beats_every_hack_on_the_mean(task, seed, measured):
    s = {k: float(v.nanmean()) for k, v in measured[task, seed].items()}
    gap_tn, gap_nw, gap_wh = MEAN_GAPS[task]
    assert s["truth"] > 0.85, s
    assert s["truth"] - s["noisy"] > gap_tn, s
    assert s["noisy"] - s["wrong"] > gap_nw, s
    assert s["wrong"] - max(s[h] for h in HACKS) > gap_wh, s
    # a block of the right colour / ink is worth what an empty region and noise are: about nothing
    assert all(s[h] < 0.02 for h in HACKS), s


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("task", ["text", "fill", "extend"])
def test_the_order_holds_per_condition(task, seed, measured):
    s = measured[task, seed]
    hack = torch.stack([s[h] for h in HACKS]).max(0).values
    assert float((s["truth"] > s["noisy"]).float().mean()) >= 0.9
    assert float((s["noisy"] > s["wrong"]).float().mean()) >= 0.9  # measured 1.0, fill on 29: 0.94
    # no hack ever beats a well-formed wrong answer; the smallest gap measured is 0.056 (extend)
    assert bool((hack < s["wrong"]).all()), (hack, s["wrong"])
    assert float((s["wrong"] - hack > 0.05).float().mean()) >= 0.9


# minimum mean gaps in score mode, where q = 0 reads as 0.073 (the digits' spread); measured on
# world 29 (24 conditions): text 0.06, 0.61, 0.18; fill 0.15, 0.58, 0.08; extend 0.13, 0.60, 0.09
SCORE_GAPS = {"text": (0.02, 0.4, 0.1), "fill": (0.05, 0.4, 0.04), "extend": (0.05, 0.4, 0.04)}


@pytest.mark.parametrize("task", ["text", "fill", "extend"])
def test_score_mode_keeps_the_order(task):
    s = {k: float(v.nanmean()) for k, v in judged(task, 29, n=24, mode="score").items()}
    gap_tn, gap_nw, gap_wh = SCORE_GAPS[task]
    hack = max(s[h] for h in HACKS)
    assert s["truth"] - s["noisy"] > gap_tn and s["noisy"] - s["wrong"] > gap_nw, s
    assert s["wrong"] - hack > gap_wh, s
    assert max(s[h] for h in HACKS) - min(s[h] for h in HACKS) < 0.01, s  # the hacks read alike


@pytest.mark.parametrize("seed", SEEDS)
def test_removal_quality_orders_truth_noisy_and_what_leaves_the_object(seed):
    s = judged("removal", seed)
    m = {k: float(v.mean()) for k, v in s.items()}
    failed = torch.maximum(s["empty"], s["noise"])  # "empty": the source, the object left in place
    # measured truth 1.0, noisy 0.37 / 0.36, object left 0.014 / 0.003, noise 0.0
    assert m["truth"] > 0.95 and m["truth"] - m["noisy"] > 0.4, m
    assert m["noisy"] - float(failed.mean()) > 0.25, m
    assert float((s["noisy"] > failed).float().mean()) >= 0.9
    # a flat grey patch removes the object but restores nothing: far below the truth, above failure
    # (measured 0.37 / 0.34, as high as the noisy truth: the fidelity counts noise 0.1 like an offset 0.1)
    assert m["truth"] - m["grey"] > 0.4 and m["grey"] - float(failed.mean()) > 0.15, m


def test_extend_without_a_described_object_pays_the_true_continuation():
    s = {k: float(v.mean()) for k, v in judged("extend", 29, n=24, creates_content=False).items()}
    # measured truth 1.0, noisy 0.61, grey (= the source: the new area is grey) 0.40, noise 0.006
    assert s["truth"] > 0.95 and s["truth"] - s["noisy"] > 0.2, s
    assert s["noisy"] - max(s["empty"], s["grey"], s["noise"]) > 0.1, s


@pytest.mark.parametrize("task", ["text", "fill", "extend"])
def test_content_gradients_are_finite_and_nonzero(task):
    """ReFL back-propagates through the judge: the content term's gradient must exist on answers
    near the truth, and every dimension's must stay finite on the hacks, where the content term is
    (nearly) zero and gates the others through a square root."""
    judge = RuleJudge()
    s = conditions(task, 29, 2)[1]
    g, rng = torch.Generator().manual_seed(3), random.Random(3)
    v = BUILD[task](s, g, rng)
    dims = ("text_alignment", "consistency", "structure", "aesthetics") if task != "text" else \
        ("text_accuracy", "consistency")
    for name in ("truth", "noisy", "wrong", *HACKS):
        for dtype in (torch.float32, torch.float64):
            x = v[name].to(dtype).clone().requires_grad_(True)
            reqs = [JudgeRequest(task, d, s.source, x, s.mask, s.prompt, truth=s) for d in dims]
            judge.score(reqs, "score").sum().backward()
            assert torch.isfinite(x.grad).all(), (task, name, dtype)
            y = v[name].to(dtype).clone().requires_grad_(True)
            judge.quality(task, CONTENT[task], y, s).backward()
            assert torch.isfinite(y.grad).all(), (task, name, dtype)
            if name in ("noisy", "wrong"):
                assert float(y.grad.abs().sum()) > 0, (task, name, dtype)
    # the analytic directional derivative of the content term matches finite differences
    base = v["noisy"].clamp(0.01, 0.99).double()
    x = base.clone().requires_grad_(True)
    judge.quality(task, CONTENT[task], x, s).backward()
    d = torch.randn(base.shape, generator=g, dtype=torch.float64) * s.mask
    h = 1e-6
    with torch.no_grad():
        numeric = (judge.quality(task, CONTENT[task], base + h * d, s)
                   - judge.quality(task, CONTENT[task], base - h * d, s)) / (2 * h)
    torch.testing.assert_close((x.grad * d).sum(), numeric, rtol=1e-4, atol=1e-8)
