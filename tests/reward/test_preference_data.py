import json

import pytest
import torch

from core.io.image_io import load_image, save_image
from reward.training.preference_data import (
    load_pair,
    read_preferences,
    write_preferences,
)


@pytest.fixture
def files(tmp_path):
    g = torch.Generator().manual_seed(0)
    for name in ("src", "a", "b"):
        save_image(torch.rand(3, 20, 24, generator=g), tmp_path / "img" / f"{name}.png")
    mask = torch.zeros(1, 20, 24)
    mask[:, 5:15, 6:18] = 1
    save_image(mask, tmp_path / "img" / "mask.png")
    save_image(torch.rand(3, 10, 10, generator=g), tmp_path / "img" / "small.png")
    return tmp_path


def _record(**over):
    rec = {"source": "img/src.png", "mask": "img/mask.png", "prompt": "a red circle", "task": "fill",
           "dimensions": ["text_alignment", "structure"], "winner": "img/a.png", "loser": "img/b.png"}
    rec.update(over)
    return {k: v for k, v in rec.items() if v is not None}


def _write(root, *records):
    path = root / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + "\n")
    return path


def test_records_round_trip_and_load(files):
    path = _write(files, _record(), _record(task="removal", dimensions=None, dimension="removal_quality",
                                            prompt="", split="heldout", id=7))
    first, second = read_preferences(path)
    assert first.dimensions == ("text_alignment", "structure") and first.winner == files / "img" / "a.png"
    assert second.dimensions == ("removal_quality",) and second.split == "heldout" and second.id == "7"
    pair = load_pair(first)
    assert pair.source.shape == (3, 20, 24) and pair.mask.shape == (1, 20, 24)
    assert set(pair.mask.unique().tolist()) == {0.0, 1.0}
    # next to the images, paths are written relative; elsewhere they stay absolute
    write_preferences(files / "again.jsonl", [first, second])
    assert json.loads((files / "again.jsonl").read_text().splitlines()[0])["source"] == "img/src.png"
    again = read_preferences(write_preferences(files / "copy" / "prefs.jsonl", [first, second]))
    assert again[0].source == first.source.resolve() and again[1].split == "heldout"
    assert again[0].dimensions == first.dimensions and again[1].id == "7"


@pytest.mark.parametrize("record, message", [
    (_record(task="paint"), "unknown task"),
    (_record(dimensions=["removal_quality"]), "not .*dimensions of task 'fill'"),
    (_record(dimensions=[]), "non-empty list"),
    (_record(dimension="structure"), "exactly one of"),
    (_record(winner="img/missing.png"), "winner image not found"),
    (_record(loser="img/a.png"), "same file"),
    (_record(colour="red"), "unknown key"),
    (_record(prompt=None), "missing key"),
    (_record(split="test"), "split must be"),
])
def test_bad_records_name_the_line_and_the_problem(files, record, message):
    path = _write(files, _record(), record)
    with pytest.raises(ValueError, match=message) as err:
        read_preferences(path)
    assert "prefs.jsonl:2" in str(err.value)


def test_bad_files_and_sizes(files):
    with pytest.raises(ValueError, match="not found"):
        read_preferences(files / "nope.jsonl")
    (files / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match="bad.jsonl:1: not valid JSON"):
        read_preferences(files / "bad.jsonl")
    (files / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no preference records"):
        read_preferences(files / "empty.jsonl")
    (record,) = read_preferences(_write(files, _record(loser="img/small.png")))
    with pytest.raises(ValueError, match="share one size"):
        load_pair(record)


def test_failure_candidates_spoil_only_the_mask():
    from core.synthetic.world import SyntheticWorld
    from reward.training.demo_data import FAILURES, failure_candidates

    samples = [SyntheticWorld(seed=3).sample(t, i) for i, t in enumerate(("removal", "extend"))]
    edits = torch.rand(2, *samples[0].source.shape, generator=torch.Generator().manual_seed(0))
    spoilt = failure_candidates(samples, edits, seed=0)
    assert spoilt.shape == (2, len(FAILURES), *edits.shape[1:])
    for s, e, f in zip(samples, edits, spoilt):
        outside = (1 - s.mask).bool().expand_as(e)
        assert all(torch.equal(x[outside], e[outside]) for x in f)          # the kept region is the edit's
        inside = s.mask.bool().expand_as(e)
        assert torch.allclose(f[0][inside], s.source[inside])                # "unchanged": the input
        assert torch.allclose(f[1][inside], (0.5 * s.source + 0.5 * e)[inside])   # the ghost


def test_demo_data_with_failures_pairs_real_winners_with_spoilt_losers(tmp_path):
    from reward.judges.rule_judge import RuleJudge
    from reward.training.demo_data import (
        CANDIDATE_SETTINGS,
        build_demo_data_with_failures,
    )

    path = build_demo_data_with_failures(tmp_path, n_pairs=16, batch=8, seed=0, label_noise=0.0)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    k = len(CANDIDATE_SETTINGS)
    index = lambda name: int(name.rsplit("cand", 1)[1].split(".")[0])  # noqa: E731
    spoilt = [r for r in records if index(r["loser"]) >= k]
    assert spoilt and all(index(r["winner"]) < k for r in spoilt)
    judge = RuleJudge()
    from core.synthetic.world import SyntheticWorld

    world = SyntheticWorld(seed=101)
    for r in spoilt[:6]:   # without label noise every label is the rule judge's own
        n = int(r["winner"].split("/")[1].split("_")[0])
        sample = world.sample(r["task"], n)
        win, lose = (load_image(tmp_path / r[k_]) for k_ in ("winner", "loser"))
        for dim in r["dimensions"]:
            assert judge.quality(r["task"], dim, win, sample) > judge.quality(r["task"], dim, lose, sample)


def test_group_data_pairs_near_ties_of_one_sampler(tmp_path):
    """build_group_data's candidates are one sampler's edits with different noise (a rollout group)."""
    from reward.training.demo_data import GROUP_SETTINGS, build_group_data

    assert len(set(GROUP_SETTINGS)) == 1 and len(GROUP_SETTINGS) == 4
    path = build_group_data(tmp_path, n_pairs=4, batch=8, seed=0, label_noise=0.0)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) >= 4
    for r in records:
        assert r["winner"] != r["loser"]
        w, lo = (load_image(tmp_path / r[k]) for k in ("winner", "loser"))
        assert not torch.equal(w, lo)   # different noise, different edits
