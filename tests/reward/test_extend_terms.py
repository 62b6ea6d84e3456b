"""The extend content term (reward/judges/extend_terms.py) beyond the hacks of
test_judge_not_gameable: answers between right and junk sit where they should, and batching
changes nothing. World 13 (its parameters were chosen on worlds 0 and 29)."""
import random

import pytest
import torch
from test_content_terms import _paint
from test_judge_not_gameable import _scene, conditions

from core.synthetic.world import COLOURS, SHAPES, SyntheticWorld, shape_mask
from reward.judges.extend_terms import extend_alignment_term

SEED, N = 13, 32


def variants(s, rng):
    d, t, (H, W) = s.truth["described"], s.truth, s.source.shape[-2:]
    keep = s.source * (1 - s.mask)
    bare = _scene(t["background"], [o for o in t["objects"] if (o["cy"], o["cx"]) != (d["cy"], d["cx"])])

    def drawn(where, colour=d["colour"]):  # the true continuation with `where` painted in `colour`
        return keep + _paint(bare, where, COLOURS[colour]) * s.mask

    r = 0.72 * d["r"]  # a shapeless blob of about the object's area: two overlapping discs
    blob = torch.maximum(shape_mask("circle", H, W, d["cy"] - 0.3 * r, d["cx"] - 0.65 * r, r),
                         shape_mask("circle", H, W, d["cy"] + 0.3 * r, d["cx"] + 0.65 * r, r))
    return {
        "truth": s.target,
        "shifted": drawn(torch.roll(d["mask"], (1, 1), (1, 2))),  # the right object a pixel off
        "void": _paint(s.source, d["mask"] * s.mask, COLOURS[d["colour"]]),  # no background drawn
        "wrong_colour": drawn(d["mask"], rng.choice([c for c in COLOURS if c != d["colour"]])),
        "blob": drawn(blob),
        "wrong_shape": drawn(shape_mask(rng.choice([x for x in SHAPES if x != d["shape"]]),
                                        H, W, d["cy"], d["cx"], d["r"])),
    }


@pytest.fixture(scope="module")
def measured():
    samples, rng = conditions("extend", SEED, N), random.Random(SEED)
    vs = [variants(s, rng) for s in samples]
    return {k: extend_alignment_term(torch.stack([v[k] for v in vs]), samples) for k in vs[0]}


def test_answers_between_right_and_junk_sit_where_they_should(measured):
    m = {k: float(v.mean()) for k, v in measured.items()}
    # measured: truth 0.94 (min 0.91), shifted 0.67, void 0.40, wrong shape 0.15, blob 0.06 (below the
    # wrong shape in 88% of conditions), wrong colour 0.0 (max 0.002)
    assert float(measured["truth"].min()) > 0.85, m  # a second object of the same colour is no noise
    assert m["truth"] - 0.15 > m["shifted"] > m["wrong_shape"] + 0.3, m
    # the prompt asks for the background too, but the described object is most of the answer
    assert m["truth"] - 0.3 > m["void"] > m["wrong_shape"] + 0.1, m
    assert m["blob"] < m["wrong_shape"] - 0.05 and float((measured["blob"] < measured["wrong_shape"]).float().mean()) >= 0.8
    assert float(measured["wrong_colour"].max()) < 0.01, m


def test_batched_matches_one_at_a_time():
    samples = conditions("extend", SEED, 5)
    g = torch.Generator().manual_seed(0)
    edited = torch.stack([(s.target + 0.1 * torch.randn(s.target.shape, generator=g)).clamp(0, 1) for s in samples])
    batched = extend_alignment_term(edited, samples)
    single = torch.stack([extend_alignment_term(e, s) for e, s in zip(edited, samples)])
    assert batched.shape == (5,) and single.shape == (5,)
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-6)
    same = extend_alignment_term(edited[:1].expand(3, -1, -1, -1), samples[0])
    torch.testing.assert_close(same, batched[:1].expand(3), rtol=1e-5, atol=1e-6)


def test_a_prompt_without_a_described_object_is_refused():
    s = next(s for s in SyntheticWorld(seed=SEED).held_out("extend", 40) if s.truth["described"] is None)
    with pytest.raises(ValueError, match="describes no object"):
        extend_alignment_term(s.target, s)
