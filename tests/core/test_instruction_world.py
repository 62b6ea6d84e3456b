"""The instruction world (core/synthetic/instruction_world.py): well-formed, deterministic samples with exact
targets; its metrics (core.synthetic.metrics) and background reader (core.synthetic.backgrounds); and the mask-guided
world's outputs unchanged by the refactor that lets both share the scene helpers."""
import hashlib
import re

import pytest
import torch

from core.synthetic.backgrounds import KINDS, kind_probabilities, read_kind
from core.synthetic.instruction_world import (
    INSTRUCTION_VOCABULARY,
    INSTRUCTION_WORDS,
    POSITIONS,
    InstructionWorld,
    cell_of,
)
from core.synthetic.metrics import ground_truth_metrics, summarize
from core.synthetic.world import COLOURS, VOCABULARY, SyntheticWorld, collate
from core.tasks import (
    ALL_TASKS,
    DIMENSIONS,
    INSTRUCTION_TASKS,
    TASK_DESCRIPTIONS,
    TASK_DIMENSIONS,
    TASKS,
    check_task,
    dimensions_for,
)

N = 10


@pytest.fixture(scope="module")
def world():
    return InstructionWorld(size=64, seed=0)


def _digest(samples):
    """Rounded to 2^-20 before hashing: a refactor must keep every value, while a machine whose
    float kernels round the last bit differently still passes."""
    h = hashlib.sha256()
    for s in samples:
        for t in (s.source, s.mask, s.target):
            h.update(torch.round(t.double() * 2**20).to(torch.int64).numpy().tobytes())
        h.update(f"{s.key}|{s.task}|{s.prompt}".encode())
    return h.hexdigest()[:16]


# recorded with core/synthetic/world.py as it was before the instruction world (git HEAD d8de306)
GOLDEN = {
    (64, 0, "fill"): "a763587c515f2fa1", (64, 0, "extend"): "ffd654b8e67bbe65",
    (64, 0, "removal"): "ac3ef4091777561c", (64, 0, "text"): "ca1118928a864a77",
    (32, 5, "fill"): "3e41d95eb02cc9bd", (32, 5, "extend"): "8c71e6d16b009e59",
    (32, 5, "removal"): "bbf482c0daaea807", (32, 5, "text"): "07c28af8389f9a1e",
}


@pytest.mark.parametrize("size, seed, task", list(GOLDEN))
def test_mask_guided_world_is_unchanged(size, seed, task):
    for cls in (SyntheticWorld, InstructionWorld):  # the instruction world makes them bit for bit too
        w = cls(size=size, seed=seed)
        got = _digest([w.sample(task, i, split) for split in ("train", "heldout") for i in range(6)])
        assert got == GOLDEN[size, seed, task], (cls.__name__, task)
    assert hashlib.sha256(" ".join(VOCABULARY).encode()).hexdigest()[:16] == "0b735b40f9a252d7"


def test_task_registry():
    assert TASKS == ("fill", "extend", "removal", "text")  # what training, pretraining and data take
    assert ALL_TASKS == TASKS + INSTRUCTION_TASKS
    for t in INSTRUCTION_TASKS:
        assert check_task(t) == t and t in TASK_DESCRIPTIONS
        assert dimensions_for(t) == TASK_DIMENSIONS[t] == ("instruction_following", "preservation", "aesthetics")
        assert all(d in DIMENSIONS for d in TASK_DIMENSIONS[t])
    with pytest.raises(ValueError, match="instruction tasks come from core.synthetic.instruction_world"):
        SyntheticWorld().sample("recolour", 0)


def _changed(s):
    return ((s.source - s.target).abs().amax(0, keepdim=True) > 0).float()


@pytest.mark.parametrize("task", INSTRUCTION_TASKS)
def test_samples_are_well_formed_and_change_exactly_the_edit_region(world, task):
    for i in range(N):
        s = world.sample(task, i, "heldout")
        t = s.truth
        assert s.task == task and s.key == f"heldout/{task}/{i}"
        assert s.source.shape == s.target.shape == (3, 64, 64) and s.mask.shape == t["keep"].shape == (1, 64, 64)
        assert set(s.mask.unique().tolist()) <= {0.0, 1.0} and s.mask.sum() > 0
        assert 0 <= float(s.source.min()) and float(s.target.max()) <= 1
        changed = _changed(s)
        # nothing changes outside the edit region, nothing at all where the truth says "keep"
        assert float((changed * (1 - s.mask)).sum()) == 0
        assert float((t["keep"] * s.mask).sum()) == 0 and float((changed * t["keep"]).sum()) == 0
        if task in ("recolour", "remove_named", "add"):  # the region is the object's footprint, all of it changes
            assert torch.equal(changed, s.mask) and torch.equal(s.mask, t["object"]["mask"])
        elif task == "retext":  # the glyphs' pixels that differ; the box holds them
            assert torch.equal(changed, (t["ink"] != t["new_ink"]).float())
            assert all(a != b for a, b in zip(t["text"], t["new_text"])) and len(t["text"]) == len(t["new_text"])
        else:  # restyle: the background, every pixel off the objects (a few may coincide)
            assert float(changed.sum()) >= 0.95 * float(s.mask.sum())
            assert t["new_kind"] != t["bg_kind"]
        names = [(o["colour"], o["shape"]) for o in t["objects"]]
        assert len(names) == len(set(names))  # an instruction names exactly one object
        for o in t["objects"]:
            assert o["mask"].shape == (1, 64, 64) and o["mask"].sum() > 0
        # the prompt: the world's words and the instruction words (split as FluxFillPolicy.prompt_problem does)
        words = re.findall(r"\d|[^\W\d_]+|[^\w\s]", s.prompt.lower())
        assert set(words) <= set(INSTRUCTION_VOCABULARY), s.prompt


def test_instruction_words_are_the_new_ones():
    # what a tokenizer for instruction editing must add to the toy's (built over VOCABULARY)
    assert INSTRUCTION_WORDS and not set(INSTRUCTION_WORDS) & set(VOCABULARY)
    assert {"make", "add", "replace", "change", "top", "left", "centre"} <= set(INSTRUCTION_WORDS)
    assert INSTRUCTION_VOCABULARY[:len(VOCABULARY)] == VOCABULARY


def test_prompts_say_what_the_truth_holds(world):
    r = world.sample("recolour", 3)
    o = r.truth["object"]
    assert r.prompt == f"make the {o['colour']} {o['shape']} {r.truth['new_colour']}"
    assert r.truth["new_colour"] != o["colour"]
    assert torch.equal(r.target, world._paint(r.truth["background"], r.truth["target_objects"]))
    m = world.sample("remove_named", 3)
    assert m.prompt == f"remove the {m.truth['object']['colour']} {m.truth['object']['shape']}"
    assert len(m.truth["objects"]) >= 2 and m.truth["object"] not in m.truth["target_objects"]
    # the background behind the removed object is the world's own
    assert torch.equal(m.target * m.mask, m.truth["background"] * m.mask)
    for i in range(N):
        a = world.sample("add", i)
        o, (row, col) = a.truth["object"], a.truth["cell"]
        assert a.prompt == f"add a {o['colour']} {o['shape']} {POSITIONS[row, col]}"
        assert cell_of(64, o["cy"], o["cx"]) == (row, col)
    x = world.sample("retext", 3)
    assert x.prompt == f'replace the text "{x.truth["text"]}" with "{x.truth["new_text"]}"'
    y = world.sample("restyle", 3)
    assert y.prompt.startswith("change the background to ")
    assert read_kind(y.target, y.mask) == y.truth["new_kind"]


def test_deterministic_and_splits_disjoint(world):
    for task in INSTRUCTION_TASKS:
        a, b = world.sample(task, 5), InstructionWorld(size=64, seed=0).sample(task, 5)
        assert torch.equal(a.source, b.source) and torch.equal(a.target, b.target) and a.prompt == b.prompt
        assert torch.equal(a.mask, b.mask)
        h = world.sample(task, 5, "heldout")
        assert not torch.equal(a.source, h.source)
        assert not torch.equal(InstructionWorld(seed=1).sample(task, 5).source, a.source)
    # held-out conditions are not training conditions: no held-out source appears among 200 train ones
    train = {_digest([world.sample("recolour", i)])[:8] for i in range(200)}
    assert not any(_digest([s])[:8] in train for s in world.held_out("recolour", 20))
    batch = collate([world.sample(t, 0) for t in INSTRUCTION_TASKS])
    assert batch.tasks == list(INSTRUCTION_TASKS) and batch.targets.shape == (5, 3, 64, 64)


def test_metrics_perfect_on_target_low_on_no_edit(world):
    samples = [s for t in INSTRUCTION_TASKS for s in world.held_out(t, 12)]
    perfect = summarize(ground_truth_metrics(samples, torch.stack([s.target for s in samples])))
    nothing = summarize(ground_truth_metrics(samples, torch.stack([s.source for s in samples])))
    following = {"recolour": ["colour_acc"], "add": ["colour_acc", "shape_acc", "position_acc"],
                 "retext": ["glyph_acc", "text_exact"], "restyle": ["style_acc"]}
    for task, keys in following.items():
        for k in keys:
            assert perfect[task][k] == 1 and nothing[task][k] == 0, (task, k)
    assert perfect["remove_named"]["residue"] == 0 and nothing["remove_named"]["residue"] == 1
    for task in INSTRUCTION_TASKS:
        # consistency: no edit keeps everything it should (and the target, of course)
        assert perfect[task]["psnr_keep"] == nothing[task]["psnr_keep"] == 100
        assert perfect[task]["psnr_mask"] > 60 and nothing[task]["psnr_mask"] < 25


def test_metrics_see_wrong_edits(world):
    from core.synthetic.metrics import sample_metrics

    s = world.sample("recolour", 1, "heldout")
    o = s.truth["object"]
    other = next(c for c in COLOURS if c not in (o["colour"], s.truth["new_colour"]))
    wrong = world._paint(s.truth["background"], [{**x, "colour": other} if x is o else x for x in s.truth["objects"]])
    assert sample_metrics(s, wrong)["colour_acc"] == 0
    # an edit that also touches what must stay loses consistency
    spoiled = s.target.clone()
    spoiled[:, :16] = 1 - spoiled[:, :16]
    assert sample_metrics(s, spoiled)["psnr_keep"] < 25 < sample_metrics(s, s.target)["psnr_keep"]


def test_background_reader_reads_kinds_and_refuses_flat_and_noise(world):
    g = torch.Generator().manual_seed(0)
    for i in range(16):
        s = world.sample("restyle", i, "heldout")
        noisy = (s.target + 0.1 * torch.randn(s.target.shape, generator=g)).clamp(0, 1)
        assert read_kind(s.target, s.mask) == read_kind(noisy, s.mask) == s.truth["new_kind"]
        flat = s.target * (1 - s.mask) + 0.5 * s.mask
        noise = s.target * (1 - s.mask) + torch.rand(s.target.shape, generator=g) * s.mask
        assert read_kind(flat, s.mask) == read_kind(noise, s.mask) == "none"
    p = kind_probabilities(torch.stack([s.target, s.source]), torch.stack([s.mask, s.mask]))
    assert p.shape == (2, len(KINDS)) and torch.allclose(p.sum(1), torch.ones(2))


@pytest.mark.parametrize("size", [32, 48])
def test_small_worlds_make_every_instruction_task(size):
    w = InstructionWorld(size=size, seed=3)
    samples = [w.sample(t, i) for t in INSTRUCTION_TASKS for i in range(6)]
    perfect = summarize(ground_truth_metrics(samples, torch.stack([s.target for s in samples])))
    for task, m in perfect.items():
        assert all(v == 1 for k, v in m.items() if k.endswith("_acc")), (size, task, m)
