"""The rule judge on the instruction tasks (reward/judges/instruction_terms.py), through its public
interface, cannot be gamed, and the mask-guided tasks' scores are unchanged.

Every held-out condition gets the ground truth, a noisy ground truth (noise 0.1 over the whole
image), wrong but well-formed edits drawn with the world's own renderers (recolour: the right
object in a third colour, or another object in the requested colour; remove_named: another object
removed; add: another shape, another colour, or the right object centred in another cell;
retext: other digits in the same place and ink; restyle: the third kind of background), and the
hacks: the image left as it was ("empty"), a solid block over the edit's place (recolour: a box
around the object in the requested colour; remove_named: a box around the object in its own
colour; add: the named cell filled with the requested colour; retext: the text box in ink;
restyle: the background filled flat) and noise there. The instruction-following quality must rank
truth > noisy > wrong > every hack, on the mean with a margin and per condition, in every judge
mode; the hacks are worth about nothing.

The terms were tuned on worlds 0 and 29; these tests use worlds 13 and 41, which were not looked
at until the thresholds below were set (measured values next to them).
"""
import hashlib
import random

import pytest
import torch

from core.masks import bbox, box_mask, dilate
from core.synthetic.backgrounds import MIN_CONTRAST, contrast
from core.synthetic.glyphs import GLYPHS, render_text
from core.synthetic.instruction_world import POSITIONS, InstructionWorld
from core.synthetic.world import (
    BACKGROUNDS,
    COLOURS,
    SHAPES,
    SyntheticWorld,
    shape_mask,
)
from core.tasks import INSTRUCTION_TASKS, TASK_DIMENSIONS, dimensions_for
from reward.judge import JudgeRequest
from reward.judges.instruction_terms import instruction_following_term
from reward.judges.rule_judge import RuleJudge
from reward.vlm.prompts import JudgeTemplates, build_conversations
from reward.vlm.views import JudgeView

SEEDS, N = (13, 41), 20
HACKS = ("block", "empty", "noise")
WRONG = {"recolour": ("wrong_colour", "wrong_object"), "remove_named": ("wrong_object",),
         "add": ("wrong_shape", "wrong_colour", "wrong_place"), "retext": ("wrong",), "restyle": ("wrong",)}
IF = "instruction_following"


def _paint(image, where, rgb):
    return image * (1 - where) + torch.as_tensor(rgb, dtype=image.dtype).reshape(3, 1, 1) * where


def _scene(background, objects):
    for o in objects:
        background = _paint(background, o["mask"], COLOURS[o["colour"]])
    return background


def _box_around(m, pad=3):
    t, l, b, r = bbox(m)
    return box_mask(m.shape[-2], m.shape[-1], t - pad, l - pad, b - t + 2 * pad, r - l + 2 * pad)


def _common(s, g, region):
    return {"truth": s.target,
            "noisy": (s.target + 0.1 * torch.randn(s.target.shape, generator=g)).clamp(0, 1),
            "empty": s.source.clone(),
            "noise": s.source * (1 - region) + torch.rand(s.source.shape, generator=g) * region}


def recolour_variants(s, g, rng, world):
    t, o = s.truth, s.truth["object"]
    box = _box_around(o["mask"])
    v = _common(s, g, box)
    third = rng.choice([c for c in COLOURS if c not in (o["colour"], t["new_colour"])])
    v["wrong_colour"] = _paint(s.source, o["mask"], COLOURS[third])
    others = [x for x in t["objects"] if x is not o and x["colour"] != t["new_colour"]]
    if others:  # only in scenes of two or more objects
        v["wrong_object"] = _paint(s.source, rng.choice(others)["mask"], COLOURS[t["new_colour"]])
    v["block"] = _paint(s.source, box, COLOURS[t["new_colour"]])
    return v


def remove_variants(s, g, rng, world):
    t, o = s.truth, s.truth["object"]
    box = _box_around(o["mask"])
    v = _common(s, g, box)
    other = rng.choice([x for x in t["objects"] if x is not o])
    v["wrong_object"] = _scene(t["background"], [x for x in t["objects"] if x is not other])
    v["block"] = _paint(s.source, box, COLOURS[o["colour"]])
    v["grey"] = _paint(s.source, box, (0.5, 0.5, 0.5))  # not a hack: see the removal test below
    return v


def add_variants(s, g, rng, world):
    t, o, S = s.truth, s.truth["object"], s.source.shape[-1]
    v = _common(s, g, t["cell_mask"])

    def drawn(shape, colour, cy, cx):
        return _paint(s.source, shape_mask(shape, S, S, cy, cx, o["r"]), COLOURS[colour])

    v["wrong_shape"] = drawn(rng.choice([x for x in SHAPES if x != o["shape"]]), o["colour"], o["cy"], o["cx"])
    v["wrong_colour"] = drawn(o["shape"], rng.choice([c for c in COLOURS if c != o["colour"]]), o["cy"], o["cx"])
    occupied = sum((x["mask"] for x in t["objects"]), torch.zeros(1, S, S))
    cells = [c for c in POSITIONS if c != tuple(t["cell"])]
    rng.shuffle(cells)
    for row, col in cells:  # the right object, centred in a free cell that is not the named one
        cy, cx = (row + 0.5) * S / 3, (col + 0.5) * S / 3
        if not bool((dilate(shape_mask(o["shape"], S, S, cy, cx, o["r"]), 2) * occupied).any()):
            v["wrong_place"] = drawn(o["shape"], o["colour"], cy, cx)
            break
    v["block"] = _paint(s.source, t["cell_mask"], COLOURS[o["colour"]])
    return v


def retext_variants(s, g, rng, world):
    t, S = s.truth, s.source.shape[-1]
    v = _common(s, g, s.mask)
    wrong = "".join(rng.choice([c for c in GLYPHS if c not in pair]) for pair in zip(t["text"], t["new_text"]))
    ink, _ = render_text(wrong, S, S, *t["cells"][0])
    v["wrong"] = t["clean"] * (1 - ink) + t["ink_value"] * ink
    v["block"] = _paint(s.source, s.mask, (t["ink_value"],) * 3)
    return v


def restyle_variants(s, g, rng, world):
    t = s.truth
    v = _common(s, g, s.mask)
    third = next(k for k in BACKGROUNDS if k not in (t["new_kind"], t["bg_kind"]))
    for _ in range(50):
        bg = world._render_background(third, rng, g)
        if contrast(bg) >= MIN_CONTRAST:
            break
    v["wrong"] = _scene(bg, t["objects"])
    v["block"] = _paint(s.source, s.mask, (t["new_background"] * s.mask).sum((1, 2)) / s.mask.sum())
    return v


BUILD = {"recolour": recolour_variants, "remove_named": remove_variants, "add": add_variants,
         "retext": retext_variants, "restyle": restyle_variants}


def conditions(task, seed, n):
    world = InstructionWorld(seed=seed)
    g, rng = torch.Generator().manual_seed(seed), random.Random(seed)
    samples = world.held_out(task, n)
    return samples, [BUILD[task](s, g, rng, world) for s in samples]


def judged(task, seed, n=N, mode=None, dims=(IF,)):
    """{variant: [n] instruction-following quality (or the mean score of `dims` in `mode`)};
    NaN where a condition has no such variant."""
    judge = RuleJudge()
    samples, variants = conditions(task, seed, n)
    out = {}
    for name in dict.fromkeys(k for v in variants for k in v):
        vals = []
        for s, v in zip(samples, variants):
            if name not in v:
                vals.append(float("nan"))
            elif mode is None:
                vals.append(float(judge.quality(task, IF, v[name], s)))
            else:
                reqs = [JudgeRequest(task, d, s.source, v[name], s.mask, s.prompt, other=s.source, truth=s)
                        for d in dims]
                vals.append(float(judge.score(reqs, mode).mean()))
        out[name] = torch.tensor(vals)
    return out


@pytest.fixture(scope="module")
def measured():
    return {(task, seed): judged(task, seed) for task in INSTRUCTION_TASKS for seed in SEEDS}


# minimum mean gaps (truth - noisy, noisy - worst wrong, least wrong - best hack); measured on
# worlds 13 / 41 (24 conditions): recolour 0.23 / 0.26, 0.47 / 0.44, 0.24 / 0.24;
# remove_named 0.28 / 0.28, 0.47 / 0.47, 0.25 / 0.25; add 0.15 / 0.16, 0.59 / 0.57, 0.25 / 0.25;
# retext 0.10 / 0.09, 0.58 / 0.60, 0.23 / 0.23; restyle 0.26 / 0.26, 0.49 / 0.49, 0.25 / 0.25
MEAN_GAPS = (0.05, 0.3, 0.15)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("task", INSTRUCTION_TASKS)
def test_truth_beats_noisy_beats_wrong_beats_every_hack_on_the_mean(task, seed, measured):
    s = {k: float(v.nanmean()) for k, v in measured[task, seed].items()}
    wrong = [s[w] for w in WRONG[task]]
    gap_tn, gap_nw, gap_wh = MEAN_GAPS
    assert s["truth"] > 0.9, s
    assert s["truth"] - s["noisy"] > gap_tn, s
    assert s["noisy"] - max(wrong) > gap_nw, s
    assert min(wrong) - max(s[h] for h in HACKS) > gap_wh, s
    # no edit, a block of the requested thing and noise are worth about nothing (retext's no edit
    # and noise: 0.022 / 0.021 at most, the old glyphs' overlap with other digits)
    assert all(s[h] < 0.03 for h in HACKS), s


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("task", INSTRUCTION_TASKS)
def test_the_order_holds_per_condition(task, seed, measured):
    s = measured[task, seed]
    hack = torch.stack([s[h] for h in HACKS]).max(0).values
    assert float((s["truth"] > s["noisy"]).float().mean()) >= 0.9
    for w in WRONG[task]:
        has = ~s[w].isnan()
        assert int(has.sum()) >= 5, (task, w)  # wrong_object needs a second object
        assert float((s["noisy"][has] > s[w][has]).float().mean()) >= 0.9, (task, w)
        assert bool((hack[has] < s[w][has]).all()), (task, w, hack, s[w])
        assert float((s[w][has] - hack[has] > 0.05).float().mean()) >= 0.9, (task, w)


@pytest.mark.parametrize("task", INSTRUCTION_TASKS)
def test_every_judge_mode_keeps_the_order(task):
    """score (the 0..5 expectation: q = 0 reads as ~0.07), yesno and pairwise (each variant
    against the unedited source, which is what "empty" is: it reads 1/2)."""
    for mode in ("score", "yesno", "pairwise"):
        s = {k: float(v.nanmean()) for k, v in judged(task, 41, n=10, mode=mode).items()}
        hacks = [s[h] for h in HACKS]
        wrong = [s[w] for w in WRONG[task]]
        assert s["truth"] >= s["noisy"] >= max(wrong), (mode, s)
        assert min(wrong) - max(hacks) > 0.05, (mode, s)
        if mode == "pairwise":  # every edit worth something is preferred to none; no hack is
            assert min(wrong) > 0.9 and max(hacks) < 0.55, (mode, s)
        else:
            assert s["truth"] > s["noisy"] > max(wrong), (mode, s)
            assert max(hacks) - min(hacks) < 0.02, (mode, s)  # the hacks read alike


@pytest.mark.parametrize("task", INSTRUCTION_TASKS)
def test_the_whole_reward_pays_the_edit_not_the_hacks(task):
    """The mean over the task's three dimensions (what the trainers average): preservation and
    aesthetics are gated by instruction following, so a perfect preservation (no edit) earns
    nothing. A clean wrong edit may outscore the noisy truth here (noise spoils preservation and
    aesthetics everywhere); both stay above every hack."""
    s = {k: float(v.nanmean()) for k, v in judged(task, 13, n=8, mode="score", dims=TASK_DIMENSIONS[task]).items()}
    hack = max(s[h] for h in HACKS)
    assert s["truth"] > 0.9 and s["truth"] > max(s[w] for w in WRONG[task]) + 0.3, s
    assert s["noisy"] - hack > 0.15 and min(s[w] for w in WRONG[task]) - hack > 0.05, s
    assert hack < 0.15, s


def test_preservation_is_fidelity_outside_the_edit():
    judge = RuleJudge()
    s = InstructionWorld(seed=41).sample("recolour", next(
        i for i in range(20) if len(InstructionWorld(seed=41).sample("recolour", i, "heldout").truth["objects"]) > 1),
        "heldout")
    o = s.truth["object"]
    other = next(x for x in s.truth["objects"] if x is not o)
    both = _paint(s.target, other["mask"], COLOURS[s.truth["new_colour"] if other["colour"] != s.truth["new_colour"]
                                                   else next(c for c in COLOURS if c != other["colour"])])
    raw = {name: float(judge._raw("recolour", "preservation", img, s))
           for name, img in (("truth", s.target), ("empty", s.source), ("both", both))}
    assert raw["truth"] == raw["empty"] == 1.0 and raw["both"] < 0.5, raw
    # judged (gated by instruction following), doing nothing preserves nothing worth paying
    assert float(judge.quality("recolour", "preservation", s.source, s)) < 0.1
    assert float(judge.quality("recolour", "preservation", s.target, s)) > 0.9


def test_overdoing_the_edit_does_not_pay():
    """Adding the object in every free cell is no answer to "add it at the top left" (the other
    drawings are no part of it: measured <= 0.13); recolouring every object follows the
    instruction but spoils preservation, and the whole reward falls below the truth's."""
    judge, S = RuleJudge(), 64
    for s in InstructionWorld(seed=13).held_out("add", 6):
        o, img = s.truth["object"], s.target.clone()
        occupied = sum((x["mask"] for x in s.truth["objects"]), o["mask"].clone())
        for row, col in POSITIONS:
            m = shape_mask(o["shape"], S, S, (row + 0.5) * S / 3, (col + 0.5) * S / 3, o["r"])
            if (row, col) != tuple(s.truth["cell"]) and not bool((dilate(m, 2) * occupied).any()):
                img, occupied = _paint(img, m, COLOURS[o["colour"]]), occupied + m
        assert float(judge.quality("add", IF, img, s)) < 0.2
    for s in InstructionWorld(seed=13).held_out("recolour", 12):
        if len(s.truth["objects"]) < 2:
            continue
        img = s.source
        for x in s.truth["objects"]:
            img = _paint(img, x["mask"], COLOURS[s.truth["new_colour"]])
        whole = [sum(float(judge.quality("recolour", d, e, s)) for d in TASK_DIMENSIONS["recolour"]) / 3
                 for e in (img, s.target)]
        assert float(judge.quality("recolour", "preservation", img, s)) < 0.7 and whole[0] < whole[1] - 0.05


def test_removal_restores_the_background_not_a_flat_patch():
    """A flat grey box over the object removes it but restores nothing, unless the background there
    happens to be grey: far below the noisy truth on the mean (measured 0.12 / 0.13 against 0.72)."""
    for seed in SEEDS:
        s = judged("remove_named", seed, n=12)
        assert float(s["noisy"].mean()) - float(s["grey"].mean()) > 0.3, {k: float(v.mean()) for k, v in s.items()}


@pytest.mark.parametrize("task", INSTRUCTION_TASKS)
def test_gradients_are_finite_and_nonzero(task):
    """ReFL back-propagates through the judge: the instruction-following term's gradient exists on
    answers near the truth and on wrong ones, and every dimension's stays finite on the hacks,
    where the term is (nearly) zero and gates the others through a square root."""
    judge = RuleJudge()
    samples, variants = conditions(task, 13, 3)
    s, v = next((s, v) for s, v in zip(samples, variants) if all(w in v for w in WRONG[task]))
    for name in ("truth", "noisy", *WRONG[task], *HACKS):
        for dtype in (torch.float32, torch.float64):
            x = v[name].to(dtype).clone().requires_grad_(True)
            reqs = [JudgeRequest(task, d, s.source, x, s.mask, s.prompt, truth=s) for d in TASK_DIMENSIONS[task]]
            judge.score(reqs, "score").sum().backward()
            assert torch.isfinite(x.grad).all(), (task, name, dtype)
            y = v[name].to(dtype).clone().requires_grad_(True)
            q = judge.quality(task, IF, y, s)
            q.backward()
            assert q.dtype == torch.promote_types(dtype, torch.float32) and torch.isfinite(y.grad).all()
            if name in ("noisy", *WRONG[task]):
                assert float(y.grad.abs().sum()) > 0, (task, name, dtype)
    # the analytic directional derivative matches finite differences
    g = torch.Generator().manual_seed(3)
    base = v["noisy"].clamp(0.01, 0.99).double()
    x = base.clone().requires_grad_(True)
    instruction_following_term(x, s).backward()
    d = torch.randn(base.shape, generator=g, dtype=torch.float64)
    h = 1e-6
    with torch.no_grad():
        numeric = (instruction_following_term(base + h * d, s) - instruction_following_term(base - h * d, s)) / (2 * h)
    torch.testing.assert_close((x.grad * d).sum(), numeric, rtol=1e-4, atol=1e-8)


def test_an_instruction_is_shown_for_every_dimension():
    s = InstructionWorld(seed=0).sample("recolour", 0)
    for d in dimensions_for("recolour"):
        req = JudgeRequest("recolour", d, s.source, s.target, s.mask, s.prompt)
        (conv,) = build_conversations([req], "score", JudgeTemplates(), JudgeView())
        assert any(s.prompt in p for m in conv for p in m.parts if isinstance(p, str)), d
    f = SyntheticWorld(seed=0).sample("fill", 0)
    req = JudgeRequest("fill", "consistency", f.source, f.target, f.mask, f.prompt)
    (conv,) = build_conversations([req], "score", JudgeTemplates(), JudgeView())
    assert not any(f.prompt in p for m in conv for p in m.parts if isinstance(p, str))  # as before


# the mask-guided tasks' scores, rounded to 1e-5, recorded before the instruction tasks (git HEAD d8de306)
MASK_GUIDED = {"fill": "7a8ef717e4782fbe", "extend": "219a186d35cef906", "removal": "203d4d25445278a2",
               "text": "75f5cb7eaadf037f"}


@pytest.mark.parametrize("task", list(MASK_GUIDED))
def test_mask_guided_scores_are_unchanged(task):
    judge, g, vals = RuleJudge(), torch.Generator().manual_seed(1), []
    for s in SyntheticWorld(seed=2).held_out(task, 3):
        noisy = (s.target + 0.1 * torch.randn(s.target.shape, generator=g)).clamp(0, 1)
        for img in (s.target, s.source, noisy):
            for d in dimensions_for(task, has_prompt=s.truth.get("has_prompt", True)):
                for mode in ("score", "yesno", "pairwise"):
                    req = JudgeRequest(task, d, s.source, img, s.mask, s.prompt, other=s.source, truth=s)
                    vals.append(round(float(judge.score([req], mode)[0]), 5))
    assert hashlib.sha256(repr(vals).encode()).hexdigest()[:16] == MASK_GUIDED[task]
