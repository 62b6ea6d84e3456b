"""Adversarial tests of the identity-paying content terms (reward/judges/content_terms.py).

The soft-IoU terms they replace paid a filled box |truth| / |box|, and RL learned to paint solid
blocks of ink and blobs of colour. Here every held-out condition gets the ground truth, a noisy
ground truth, a wrong but well-formed answer (another glyph / shape, drawn with the world's own
renderer), and the hacks: a solid block over the mask, the region left empty, noise in the mask.
The terms must rank them truth > noisy > wrong > every hack, on the mean and per condition.

The temperatures and thresholds were tuned on world seed 0 (and one diagnosis looked at seed 7);
these tests use seed 13, which was not looked at until they were written (held-out split, 48
conditions per task). The margins measured on seed 13 are noted next to each threshold.
"""
import random

import pytest
import torch

from core.synthetic.glyphs import GLYPHS, render_text
from core.synthetic.world import COLOURS, SHAPES, SyntheticWorld, shape_mask
from reward.judges.content_terms import (
    fill_alignment_term,
    shape_masks,
    shape_probabilities,
)
from reward.judges.text_terms import text_accuracy_term

SEED, N = 13, 48
HACKS = ("block", "empty", "noise")


def _paint(image, where, rgb):
    return image * (1 - where) + torch.as_tensor(rgb, dtype=image.dtype).reshape(3, 1, 1) * where


def _common(s, g):
    """The variants every content task shares: truth, noisy truth and the three hacks."""
    M = s.mask
    return {
        "truth": s.target,
        "noisy": (s.target + 0.1 * torch.randn(s.target.shape, generator=g)).clamp(0, 1),
        "empty": s.source.clone(),  # the box and the fill mask lie over background in the source
        "noise": s.source * (1 - M) + torch.rand(s.source.shape, generator=g) * M,
    }


def text_variants(s, g, rng):
    t, (H, W) = s.truth, s.source.shape[-2:]
    ink_rgb = (t["ink_value"],) * 3
    top, left = t["cells"][0]

    def written(text):
        ink, _ = render_text(text, H, W, top, left)
        return _paint(s.source, ink, ink_rgb)

    v = _common(s, g)
    v["wrong"] = written("".join(rng.choice([c for c in GLYPHS if c != ch]) for ch in t["text"]))
    v["block"] = _paint(s.source, s.mask, ink_rgb)
    # extras: half the text wrong, and a solid block on each glyph's own cell (no spill outside)
    if len(t["text"]) == 2:
        v["half_wrong"] = written(t["text"][0] + rng.choice([c for c in GLYPHS if c != t["text"][1]]))
    cells = torch.zeros_like(s.mask)
    for ct, cl in t["cells"]:
        cells[:, ct:ct + 10, cl:cl + 6] = 1
    v["cell_blocks"] = _paint(s.source, cells, ink_rgb)
    return v


def fill_variants(s, g, rng):
    o, (H, W) = s.truth["object"], s.source.shape[-2:]
    rgb = COLOURS[o["colour"]]
    v = _common(s, g)
    other = rng.choice([x for x in SHAPES if x != o["shape"]])
    v["wrong"] = _paint(s.source, shape_mask(other, H, W, o["cy"], o["cx"], o["r"]), rgb)
    v["block"] = _paint(s.source, s.mask, rgb)
    # extras: the right shape in another colour; a shapeless blob (two overlapping discs) of the
    # right colour and about the object's area
    other_colour = rng.choice([c for c in COLOURS if c != o["colour"]])
    v["wrong_colour"] = _paint(s.source, o["mask"], COLOURS[other_colour])
    r = 0.72 * o["r"]
    blob = torch.maximum(shape_mask("circle", H, W, o["cy"] - 0.3 * r, o["cx"] - 0.65 * r, r),
                         shape_mask("circle", H, W, o["cy"] + 0.3 * r, o["cx"] + 0.65 * r, r))
    v["blob"] = _paint(s.source, blob * s.mask, rgb)
    return v


def scores(task, seed=SEED, n=N):
    """{variant: [n] term values} over the first n held-out conditions of `task` in world `seed`."""
    term, build = {"text": (text_accuracy_term, text_variants),
                   "fill": (fill_alignment_term, fill_variants)}[task]
    samples = SyntheticWorld(seed=seed).held_out(task, n)
    g, rng = torch.Generator().manual_seed(seed), random.Random(seed)
    variants = [build(s, g, rng) for s in samples]
    out = {}
    for name in dict.fromkeys(k for v in variants for k in v):  # some exist only for 2-glyph texts
        keep = [i for i, v in enumerate(variants) if name in v]
        out[name] = torch.full((n,), float("nan"))
        out[name][keep] = term(torch.stack([variants[i][name] for i in keep]), [samples[i] for i in keep])
    return out


@pytest.fixture(scope="module")
def measured():
    return {task: scores(task) for task in ("text", "fill")}


# (min mean gap truth-noisy, noisy-wrong, wrong-max(hacks)); measured on seed 13 in the comments
MEAN_GAPS = {"text": (0.05, 0.4, 0.15),   # measured 0.098, 0.642, 0.246
             "fill": (0.06, 0.4, 0.08)}   # measured 0.127, 0.654, 0.152


@pytest.mark.parametrize("task", ["text", "fill"])
def test_truth_beats_noisy_beats_wrong_beats_every_hack_on_the_mean(task, measured):
    s = {k: float(v.nanmean()) for k, v in measured[task].items()}
    hack = max(s[h] for h in HACKS)
    gap_tn, gap_nw, gap_wh = MEAN_GAPS[task]
    assert s["truth"] > 0.9, s
    assert s["truth"] - s["noisy"] > gap_tn, s
    assert s["noisy"] - s["wrong"] > gap_nw, s
    assert s["wrong"] - hack > gap_wh, s
    assert hack < 0.025, s  # blocks, empty regions and noise earn (almost) nothing (text noise: 0.020)


@pytest.mark.parametrize("task", ["text", "fill"])
def test_the_order_holds_per_condition(task, measured):
    s = measured[task]
    hack = torch.stack([s[h] for h in HACKS]).max(0).values
    for hi, lo in ((s["truth"], s["noisy"]), (s["noisy"], s["wrong"]), (s["wrong"], hack)):
        assert float((hi > lo).float().mean()) >= 0.9
    # and with a clear margin on most of them: at the 10th percentile over conditions (seed 13)
    # noisy is 0.57 above wrong and wrong 0.11 (fill) / 0.24 (text) above the best hack
    assert float((s["noisy"] - s["wrong"] > 0.3).float().mean()) >= 0.9
    assert float((s["wrong"] - hack > 0.05).float().mean()) >= 0.9


def test_text_extras_sit_where_they_should(measured):
    s = measured["text"]
    half = s["half_wrong"][~s["half_wrong"].isnan()]
    full = s["truth"][~s["half_wrong"].isnan()]
    assert len(half) >= 10
    # one of two glyphs wrong: about (1 + credit) / 2, between the all-wrong and the right text
    assert float(s["wrong"].mean()) + 0.2 < float(half.mean()) < float(full.mean()) - 0.2
    # a block on each glyph's own cell (no ink spilling out) reads as "solid", not as a glyph
    assert float(s["cell_blocks"].max()) < 0.05 < float(s["wrong"].min())


def test_a_right_glyph_a_pixel_off_still_reads_right_at_a_cost():
    """A crisp right glyph drawn a pixel off reads as itself at a cost, so it ranks between the
    exact glyph and a wrong one drawn in place."""
    rng, seen = random.Random(SEED), []
    for s in SyntheticWorld(seed=SEED).held_out("text", 12):
        (H, W), t = s.source.shape[-2:], s.truth
        top, left = t["cells"][0]
        ink, _ = render_text(t["text"], H, W, top, left)
        wrong, _ = render_text("".join(rng.choice([c for c in GLYPHS if c != ch]) for ch in t["text"]),
                               H, W, top, left)
        rgb = (t["ink_value"],) * 3
        edits = torch.stack([s.target, _paint(s.source, torch.roll(ink, 1, 2), rgb),
                             _paint(s.source, wrong, rgb)])
        exact, shifted, wrong_glyph = text_accuracy_term(edits, s).tolist()
        assert exact - 0.1 > shifted > wrong_glyph + 0.2, (exact, shifted, wrong_glyph)
        seen.append(shifted)
    assert 0.6 < sum(seen) / len(seen) < 0.8  # measured 0.73: the moved reading's IoU less 0.2 per pixel


def test_fill_extras_sit_where_they_should(measured):
    s = measured["fill"]
    # the right shape in the wrong colour is nothing; a shapeless blob of the right colour is
    # below a well-formed wrong shape
    assert float(s["wrong_colour"].max()) < 0.06  # measured 0.031: yellow vs orange, 0.31 apart
    assert float(s["blob"].mean()) < float(s["wrong"].mean())
    assert float((s["blob"] < s["wrong"]).float().mean()) >= 0.8


def test_a_block_on_a_box_mask_reads_as_the_mask_not_as_a_square():
    for s in SyntheticWorld(seed=SEED).held_out("fill", 24):
        block = s.mask[0][None]
        p = shape_probabilities(block, s.mask[0][None])[0]
        assert float(p[len(SHAPES)]) > 0.8, p  # the "whole mask" reading


def test_batched_matches_one_at_a_time_and_shapes():
    w = SyntheticWorld(seed=SEED)
    for task, term in (("text", text_accuracy_term), ("fill", fill_alignment_term)):
        samples = w.held_out(task, 5)
        g = torch.Generator().manual_seed(0)
        edited = torch.stack([(s.target + 0.1 * torch.randn(s.target.shape, generator=g)).clamp(0, 1)
                              for s in samples])
        batched = term(edited, samples)
        single = torch.stack([term(e, s) for e, s in zip(edited, samples)])
        assert batched.shape == (5,) and single.shape == (5,)
        torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-6)
        # G rollouts of one condition: one sample for the whole batch
        same = term(edited[:1].expand(3, -1, -1, -1), samples[0])
        torch.testing.assert_close(same, batched[:1].expand(3), rtol=1e-5, atol=1e-6)
        with pytest.raises(ValueError, match="samples"):
            term(edited, samples[:2])


@pytest.mark.parametrize("task", ["text", "fill"])
def test_gradients_are_finite_and_nonzero(task):
    s = SyntheticWorld(size=32, seed=SEED).held_out(task, 2)[1]
    term = text_accuracy_term if task == "text" else fill_alignment_term
    g = torch.Generator().manual_seed(1)
    for start in (s.target, (s.target + 0.1 * torch.randn(s.target.shape, generator=g)).clamp(0, 1),
                  s.source):  # the perfect edit, a noisy one and the untouched source
        x = start.double().clone().requires_grad_(True)
        term(x, s).backward()
        assert torch.isfinite(x.grad).all()
        if start is not s.source:  # (at the exact source the ink map's gradient is 0: a minimum)
            assert float(x.grad.abs().sum()) > 0
    # the analytic directional derivative matches finite differences on a noisy edit
    base = (s.target + 0.1 * torch.randn(s.target.shape, generator=g)).clamp(0.01, 0.99).double()
    x = base.clone().requires_grad_(True)
    term(x, s).backward()
    d = torch.randn(base.shape, generator=g, dtype=torch.float64) * s.mask
    h = 1e-6
    with torch.no_grad():
        numeric = (term(base + h * d, s) - term(base - h * d, s)) / (2 * h)
    torch.testing.assert_close((x.grad * d).sum(), numeric, rtol=1e-4, atol=1e-8)


def test_renderers_agree_with_the_world():
    g = torch.Generator().manual_seed(0)
    cy, cx = 10 + 40 * torch.rand(3, 1, generator=g), 10 + 40 * torch.rand(3, 1, generator=g)
    r = 5 + 3 * torch.rand(3, 1, generator=g)
    ours = shape_masks(64, 64, cy.expand(3, len(SHAPES)), cx.expand(3, len(SHAPES)), r.expand(3, len(SHAPES)))
    for b in range(3):
        for i, name in enumerate(SHAPES):
            want = shape_mask(name, 64, 64, float(cy[b]), float(cx[b]), float(r[b]))[0]
            assert torch.equal(ours[b, i], want), (b, name)
