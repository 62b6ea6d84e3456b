"""JsonlData checks every record when it is built and reports all bad ones at once."""
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

import rl.plumbing.data
from rl.plumbing.data import JsonlData, step_rng

SIZE = 32


def png(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(arr, dtype=np.uint8)).save(path)
    return path.name


def image(path, h=SIZE, w=SIZE, seed=0):
    return png(path, np.random.default_rng(seed).integers(0, 256, (h, w, 3)))


def mask(path, h=SIZE, w=SIZE, box=(4, 4, 20, 20), value=255):
    arr = np.zeros((h, w))
    top, left, bottom, right = box
    arr[top:bottom, left:right] = value
    return png(path, arr)


def write(root, records):
    path = root / "edits.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


@pytest.fixture
def root(tmp_path):
    """A data folder with a good image/mask pair at img/a.png, masks/a.png."""
    d = tmp_path / "data"
    image(d / "img" / "a.png")
    mask(d / "masks" / "a.png")
    return d


def good(**extra):
    return {"image": "img/a.png", "mask": "masks/a.png", "task": "fill", "prompt": "a red car", **extra}


def instruction(**extra):
    return {"image": "img/a.png", "task": "restyle", "prompt": "make the background a beach", **extra}


def error_of(path, **kw):
    with pytest.raises(ValueError) as err:
        JsonlData(str(path), {"fill": 1.0}, size=SIZE, **kw)
    return str(err.value)


def test_good_file_loads_and_conditions_are_a_pure_function_of_seed_and_step(root):
    image(root / "img" / "b.png", seed=1)
    records = [good(), good(image="img/b.png", prompt="a boat"),
               {"image": "img/a.png", "mask": "masks/a.png", "task": "removal"},
               good(split="heldout")]
    path = write(root, records)
    data = JsonlData(str(path), {"fill": 0.7, "removal": 0.3}, size=SIZE)
    a, b = data.conditions(3, 5, 6), data.conditions(3, 5, 6)
    assert [s.key for s in a] == [s.key for s in b]
    assert all(torch.equal(x.source, y.source) and torch.equal(x.mask, y.mask) for x, y in zip(a, b))
    # the draws are the ones the loader always made: tasks from the mixture, then an index per sample
    rng = step_rng(3, 5, "data")
    expected = []
    for task in data.mixture.sample(rng, 6):
        expected.append(f"train/{task}/{rng.randrange(len(data.records['train'][task]))}")
    assert [s.key for s in a] == expected
    # pixels as the file holds them (no resize at the training size), masks binary
    src = torch.from_numpy(np.asarray(Image.open(root / "img" / "b.png"), dtype=np.float32) / 255).permute(2, 0, 1)
    b1 = data._sample(data.records["train"]["fill"][1], "k")
    assert torch.equal(b1.source, src) and b1.prompt == "a boat"
    assert set(b1.mask.unique().tolist()) == {0.0, 1.0} and b1.mask.shape == (1, SIZE, SIZE)
    removal = data._sample(data.records["train"]["removal"][0], "k")
    assert removal.prompt == rl.plumbing.data.REMOVAL_PROMPT and removal.truth == {"has_prompt": False}
    [held] = data.held_out("fill", 5)
    assert held.key == "heldout/fill/0" and held.source.shape == (3, SIZE, SIZE)
    # a sample is a copy: editing it leaves the next draw unchanged
    a[0].source.zero_()
    assert torch.equal(data.conditions(3, 5, 6)[0].source, b[0].source)


def test_images_are_decoded_once(root, monkeypatch):
    path = write(root, [good(), good(split="heldout"), good(prompt="another")])
    calls = {"image": 0, "mask": 0}

    def counting(name, real):
        def load(*args, **kw):
            calls[name] += 1
            return real(*args, **kw)
        return load

    monkeypatch.setattr(rl.plumbing.data, "load_image", counting("image", rl.plumbing.data.load_image))
    monkeypatch.setattr(rl.plumbing.data, "load_mask", counting("mask", rl.plumbing.data.load_mask))
    data = JsonlData(str(path), {"fill": 1.0}, size=SIZE)
    assert calls == {"image": 3, "mask": 3}
    for step in range(4):
        data.conditions(0, step, 8)
    data.held_out("fill", 4)
    assert calls == {"image": 3, "mask": 3}


@pytest.mark.parametrize("case, record, expected", [
    ("json", "{not json", "not valid JSON"),
    ("object", "[1, 2]", "a record must be a JSON object"),
    ("keys", {"image": "img/a.png", "task": "fill", "prompt": "x"}, "record lacks ['mask']"),
    ("task", good(task="paint"), "unknown task 'paint'"),
    ("instruction mask", good(task="recolour"), "a recolour record is an instruction edit and takes no mask"),
    ("instruction prompt", instruction(prompt=None), "a restyle record needs a prompt (its instruction)"),
    ("instruction blank", instruction(prompt=" "), "a restyle record needs a prompt (its instruction)"),
    ("instruction keys", {"task": "add", "prompt": "add a cat"}, "record lacks ['image']"),
    ("instruction image", instruction(image="img/nope.png"), "image 'img/nope.png': file not found"),
    ("split", good(split="test"), "split must be 'train' or 'heldout'"),
    ("fill prompt", good(prompt=None), "a fill record needs a prompt"),
    ("text prompt", good(task="text", prompt="  "), "a text record needs a prompt"),
    ("prompt type", good(prompt=3), "prompt must be a string"),
    ("missing image", good(image="img/nope.png"), "image 'img/nope.png': file not found"),
    ("missing mask", good(mask="masks/nope.png"), "mask 'masks/nope.png': file not found"),
    ("undecodable", good(image="img/broken.png"), "image 'img/broken.png': does not decode"),
    ("aspect", good(mask="masks/wide.png"), "mask 'masks/wide.png' is 32x24 but image 'img/a.png' is 32x32"),
    ("soft mask", good(mask="masks/soft.png"), "is not binary"),
    ("empty mask", good(mask="masks/empty.png"), "nothing to edit"),
    ("vanishes", good(image="img/big.png", mask="masks/thin.png"), "empty after resizing to 32x32"),
    ("escape", good(image="../outside.png"), "image path '../outside.png' leaves the data folder"),
    ("heldout", good(split="heldout", mask="masks/nope.png"), "mask 'masks/nope.png': file not found"),
])
def test_each_bad_record_is_reported_with_its_line(root, case, record, expected):
    (root / "img" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    mask(root / "masks" / "wide.png", h=24)
    png(root / "masks" / "soft.png", np.full((SIZE, SIZE), 128))
    mask(root / "masks" / "empty.png", value=0)
    image(root / "img" / "big.png", h=128, w=128)
    mask(root / "masks" / "thin.png", h=128, w=128, box=(0, 1, 128, 2))  # a column that nearest drops
    image(root.parent / "outside.png")
    msg = error_of(write(root, [good(), "", record]))
    assert "edits.jsonl:3: " in msg and expected in msg, msg
    assert "edits.jsonl:1:" not in msg and "1 bad record;" in msg


def test_several_bad_records_are_reported_together_and_the_list_is_capped(root):
    records = [good(), good(image="img/nope.png"), good(prompt=""), good(), good(task="paint", mask="../m.png")]
    msg = error_of(write(root, records))
    assert "3 bad records" in msg
    assert re.search(r"edits\.jsonl:2: image 'img/nope\.png': file not found", msg)
    assert re.search(r"edits\.jsonl:3: a fill record needs a prompt", msg)
    # one line per record, every problem of it named
    assert re.search(r"edits\.jsonl:5: unknown task 'paint'.*; mask path '\.\./m\.png' leaves", msg)
    assert "edits.jsonl:4" not in msg

    msg = error_of(write(root, [good(image=f"img/{i}.png") for i in range(25)]))
    assert "25 bad records" in msg and "edits.jsonl:20:" in msg and "edits.jsonl:21:" not in msg
    assert msg.endswith("... and 5 more bad records")


def test_paths_outside_the_folder_need_allow_outside(root):
    outside = root.parent / "elsewhere"
    image(outside / "x.png")
    mask(outside / "m.png")
    absolute = good(image=str(outside / "x.png"), mask=str(outside / "m.png"))
    for record in (good(image="../elsewhere/x.png"), good(image="img/../../elsewhere/x.png"), absolute):
        path = write(root, [record])
        assert "leaves the data folder" in error_of(path)
        data = JsonlData(str(path), {"fill": 1.0}, size=SIZE, allow_outside=True)
        assert data.conditions(0, 0, 1)[0].source.shape == (3, SIZE, SIZE)
    # ".." that stays inside, and an absolute path inside, are fine
    inside = [good(image="masks/../img/a.png"), good(image=str(root / "img" / "a.png"))]
    assert len(JsonlData(str(write(root, inside)), {"fill": 1.0}, size=SIZE).records["train"]["fill"]) == 2


def test_pairs_resize_together_to_the_square_training_size(root):
    # a non-square pair, and a mask at an exact scale of its image, are both accepted and squashed
    image(root / "img" / "wide.png", h=48, w=64)
    mask(root / "masks" / "wide.png", h=48, w=64, box=(0, 0, 48, 64))  # all ones: "generate everything"
    mask(root / "masks" / "small.png", h=16, w=16, box=(2, 2, 10, 10))
    path = write(root, [good(image="img/wide.png", mask="masks/wide.png"), good(mask="masks/small.png")])
    data = JsonlData(str(path), {"fill": 1.0}, size=SIZE)
    full = data._sample(data.records["train"]["fill"][0], "k")
    assert full.source.shape == (3, SIZE, SIZE) and bool((full.mask == 1).all())
    scaled = data._sample(data.records["train"]["fill"][1], "k")
    assert scaled.mask.sum() == 16 * 16  # the 8x8 box doubled


def test_no_training_records_for_the_mixture(root):
    path = write(root, [good()])
    with pytest.raises(ValueError, match="no training records for the tasks of the mixture"):
        JsonlData(str(path), {"removal": 1.0}, size=SIZE)


def test_instruction_records_give_the_whole_image_to_edit(root):
    # an instruction edit (Edit-R1's setting) has an image and an instruction, and no mask
    image(root / "img" / "wide.png", h=48, w=64)
    records = [instruction(), instruction(image="img/wide.png", task="recolour", prompt="make the car blue"),
               instruction(split="heldout"), good()]
    path = write(root, records)
    data = JsonlData(str(path), {"restyle": 0.5, "recolour": 0.3, "fill": 0.2}, size=SIZE)
    assert set(data.tasks) == {"restyle", "recolour", "fill"}  # mask-guided and instruction tasks may mix
    restyle = data._sample(data.records["train"]["restyle"][0], "k")
    src = torch.from_numpy(np.asarray(Image.open(root / "img" / "a.png"), dtype=np.float32) / 255).permute(2, 0, 1)
    assert torch.equal(restyle.source, src) and restyle.prompt == "make the background a beach"
    assert restyle.mask.shape == (1, SIZE, SIZE) and bool((restyle.mask == 1).all())
    assert restyle.target is None and restyle.truth == {"has_prompt": True}
    # a non-square image is squashed to the training size like a mask-guided one; its mask is all ones too
    recolour = data._sample(data.records["train"]["recolour"][0], "k")
    assert recolour.source.shape == (3, SIZE, SIZE) and bool((recolour.mask == 1).all())
    # the all-ones mask is shared in the cache, and a sample's copy of it can be edited freely
    recolour.mask.zero_()
    assert bool((data._sample(data.records["train"]["restyle"][0], "k").mask == 1).all())
    [held] = data.held_out("restyle", 5)
    assert held.key == "heldout/restyle/0" and bool((held.mask == 1).all())
    drawn = data.conditions(0, 0, 16)
    assert {s.task for s in drawn} <= {"restyle", "recolour", "fill"}
    for s in drawn:
        assert s.mask.shape == (1, SIZE, SIZE)
        if s.task == "fill":
            assert not bool((s.mask == 1).all())  # a fill record keeps its own mask
        else:
            assert bool((s.mask == 1).all())


def test_an_instruction_record_with_a_mask_is_refused_even_if_the_mask_is_bad(root):
    # the mask is not read at all: the problem named is the mask's presence, not its file
    msg = error_of(write(root, [instruction(mask="masks/nope.png")]))
    assert "a restyle record is an instruction edit and takes no mask" in msg and "file not found" not in msg
