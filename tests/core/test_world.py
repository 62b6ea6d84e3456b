import random

import pytest
import torch

from core.synthetic.metrics import ground_truth_metrics, summarize
from core.synthetic.world import VOCABULARY, SyntheticWorld, collate
from core.tasks import TASKS


@pytest.fixture(scope="module")
def world():
    return SyntheticWorld(size=64, seed=0)


@pytest.mark.parametrize("task", TASKS)
def test_samples_are_well_formed(world, task):
    for i in range(8):
        s = world.sample(task, i)
        assert s.task == task and s.key == f"train/{task}/{i}"
        assert s.source.shape == s.target.shape == (3, 64, 64)
        assert s.mask.shape == (1, 64, 64)
        assert set(s.mask.unique().tolist()) <= {0.0, 1.0} and s.mask.sum() > 0
        assert 0 <= float(s.source.min()) and float(s.source.max()) <= 1
        # the edit happens inside the mask only: outside it, source and target agree
        # (extend's source shows grey in the new area, which is inside the mask)
        outside = (1 - s.mask).expand(3, -1, -1)
        assert torch.equal(s.source * outside, s.target * outside)
        assert (s.source - s.target).abs().sum() > 0
        for word in s.prompt.replace('"', ' " ').replace(",", " , ").split():
            assert word in VOCABULARY or all(c in VOCABULARY for c in word), word


def test_deterministic_and_splits_disjoint(world):
    a, b = world.sample("fill", 5), world.sample("fill", 5)
    assert torch.equal(a.target, b.target) and a.prompt == b.prompt
    h = world.sample("fill", 5, "heldout")
    assert not torch.equal(a.target, h.target)
    assert not torch.equal(SyntheticWorld(seed=1).sample("fill", 5).target, a.target)


def test_ground_truth_is_kept(world):
    s = world.sample("removal", 0)
    obj = s.truth["object"]["mask"]
    # the removed object sits inside the mask, and the target there is the clean background
    assert float((obj * (1 - s.mask)).sum()) == 0
    assert torch.allclose(s.target * obj, s.truth["background"] * obj)
    f = world.sample("fill", 0)
    assert f.prompt == f"a {f.truth['object']['colour']} {f.truth['object']['shape']}"
    t = world.sample("text", 0)
    assert t.prompt == f'the text "{t.truth["text"]}"'
    e = world.sample("extend", 0)
    assert torch.equal(e.truth["canvas"], e.target)


def test_collate_and_batch(world):
    batch = collate(world.batch(["fill", "text", "removal"], random.Random(0)))
    assert batch.images.shape == (3, 3, 64, 64) and batch.masks.shape == (3, 1, 64, 64)
    assert batch.tasks == ["fill", "text", "removal"] and len(batch) == 3


def test_metrics_separate_truth_from_no_edit(world):
    samples = [s for t in TASKS for s in world.held_out(t, 12)]
    perfect = summarize(ground_truth_metrics(samples, torch.stack([s.target for s in samples])))
    nothing = summarize(ground_truth_metrics(samples, torch.stack([s.source for s in samples])))
    assert perfect["fill"]["colour_acc"] == 1 and perfect["fill"]["shape_acc"] == 1
    assert perfect["text"]["glyph_acc"] == 1 and perfect["removal"]["residue"] == 0
    assert nothing["fill"]["colour_acc"] == 0 and nothing["text"]["glyph_acc"] == 0
    assert nothing["removal"]["residue"] == 1
    for task in TASKS:
        assert perfect[task]["psnr_mask"] > 60 > 25 > nothing[task]["psnr_mask"]


def test_metrics_reject_mismatched_batch(world):
    with pytest.raises(ValueError, match="edited images"):
        ground_truth_metrics(world.held_out("fill", 2), torch.zeros(3, 3, 64, 64))
