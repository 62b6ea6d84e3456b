import json
import sys
import types

import pytest
import torch

from core.io.image_io import save_image
from reward.judges.vlm_judge import TransformersJudge
from reward.train import (
    RewardTrainConfig,
    format_table,
    main,
    pairwise_p_yes,
    pairwise_requests,
    split_records,
    train_reward_model,
)
from reward.training.preference_data import load_pair, read_preferences
from reward.vlm.judge_card import read_card

# short questions keep the tiny model's sequences short (the wording is data: reward/vlm/prompts.py)
SHORT = {"system": "", "pairwise": "{images}{dimension_name}: is the first better?",
         "image_source": "", "image_first": "", "image_second": ""}
TASKS = [("fill", ["consistency", "aesthetics"]), ("removal", ["removal_quality"])]


@pytest.fixture(autouse=True)
def one_thread():
    # tiny models on a shared 2-core machine run several times faster on one thread
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def build_bright_square_data(root, n_pairs, seed=0):
    """Winners carry a bright square in the mask, losers a dark patch: learnable in a few dozen steps."""
    g = torch.Generator().manual_seed(seed)
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n_pairs):
        task, dims = TASKS[i % 2]
        src = (torch.rand(3, 1, 1, generator=g) * 0.5 + 0.1 + 0.05 * torch.rand(3, 56, 56, generator=g)).clamp(0, 1)
        y, x = (int(v) for v in torch.randint(4, 28, (2,), generator=g))
        mask = torch.zeros(1, 56, 56)
        mask[:, y:y + 24, x:x + 24] = 1
        good, bad = src.clone(), src.clone()
        good[:, y + 4:y + 20, x + 4:x + 20] = 1.0
        bad[:, y:y + 24, x:x + 24] = 0.4 * src.mean((1, 2), keepdim=True)
        for name, img in (("src", src), ("mask", mask), ("good", good), ("bad", bad)):
            save_image(img, root / f"{i}_{name}.png")
        lines.append({"source": f"{i}_src.png", "mask": f"{i}_mask.png", "prompt": "", "task": task,
                      "dimensions": dims, "winner": f"{i}_good.png", "loser": f"{i}_bad.png"})
    (root / "prefs.jsonl").write_text("".join(json.dumps(rec) + "\n" for rec in lines))
    return root / "prefs.jsonl"


def test_lora_training_learns_the_preference_and_the_checkpoint_reloads(tmp_path):
    data = build_bright_square_data(tmp_path / "data", 30)
    cfg = RewardTrainConfig(data=str(data), out=str(tmp_path / "run"), model="tiny", tiny_preset="test",
                            lora=True, lr=5e-3, epochs=5, batch_size=4, templates=SHORT, show_crop=False,
                            progress=False)
    result = train_reward_model(cfg)
    before, after = result.metrics["before"], result.metrics["after"]
    assert after["overall"]["n"] == before["overall"]["n"] >= 8
    assert after["overall"]["accuracy"] >= 0.9 > before["overall"]["accuracy"]
    assert set(after["cells"]) == {"fill", "removal"} and set(after["cells"]["fill"]) == {"consistency", "aesthetics"}
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["after"]["overall"] == after["overall"] and saved["steps"] == result.metrics["steps"] > 0
    table = format_table(after)
    assert table.splitlines()[0].split() == ["task", "consistency", "aesthetics", "removal", "quality"]
    # the merged checkpoint answers exactly like the trained (unmerged LoRA) model did
    loaded = TransformersJudge(str(result.judge_dir), both_orders=True, templates=SHORT)
    _, heldout = split_records(read_preferences(data), cfg.heldout_fraction, cfg.seed)
    with torch.no_grad():
        p_yes = pairwise_p_yes(loaded, pairwise_requests([load_pair(r) for r in heldout])[0])
    assert torch.allclose(p_yes, result.heldout_p_yes, atol=1e-5)
    assert (p_yes[0::2] - p_yes[1::2]).min() > 0   # "Yes" is likelier whenever the winner comes first
    # the card says what the judge learned and how it saw the images; other uses are refused
    card = read_card(result.judge_dir)
    assert card.modes == ("pairwise",) and card.view["crop"] is False and card.templates == SHORT
    assert card.heldout_accuracy == after["overall"]["accuracy"]
    assert "--set lora=true" in card.made_by and "--set tiny_preset=test" in card.made_by
    with pytest.raises(ValueError, match=r"crop: trained False, asked True.*judge.show_crop"):
        TransformersJudge(str(result.judge_dir), templates=SHORT, show_crop=True)
    with pytest.raises(ValueError, match=r"templates: trained"):
        TransformersJudge(str(result.judge_dir))
    with pytest.raises(ValueError, match=r"trained on pairwise questions only.*score"):
        loaded.score(pairwise_requests([load_pair(heldout[0])])[0], mode="score")


def test_command_line_with_a_plugged_in_demo_builder(tmp_path, monkeypatch, capsys):
    calls = []

    def build_demo_data(out_dir, *, n_pairs, seed, label_noise):
        calls.append((n_pairs, seed, label_noise))
        return build_bright_square_data(out_dir, n_pairs, seed)

    demo = types.ModuleType("onejudge_test_demo")
    demo.build_demo_data = build_demo_data
    monkeypatch.setitem(sys.modules, "onejudge_test_demo", demo)
    (tmp_path / "short.yaml").write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in SHORT.items()))
    # some keys from a config file, the rest (and one the file also sets) from --set
    (tmp_path / "config.yaml").write_text("demo_builder: onejudge_test_demo:build_demo_data\ndemo_pairs: 8\n"
                                          "tiny_preset: test\nepochs: 3\n")
    result = main(["--out", str(tmp_path / "run"), "--config", str(tmp_path / "config.yaml"),
                   "--set", "label_noise=0.25", "--set", "lora=false", "--set", "epochs=1", "--set", "batch_size=4",
                   "--set", "lr=1e-3", "--set", f"templates={tmp_path / 'short.yaml'}", "--set", "progress=false"])
    printed = capsys.readouterr().out
    assert "held-out pairwise accuracy before training" in printed and "judge saved to" in printed
    assert (result.judge_dir / "model.safetensors").is_file() and (result.judge_dir / "tokenizer.json").is_file()
    assert json.loads((tmp_path / "run" / "config.json").read_text())["lora"] is False
    assert result.metrics["steps"] == 2   # 8 pairs, 2 held out at random, batches of 4 -> 2 steps
    assert calls == [(8, 0, 0.25)] and (tmp_path / "run" / "demo_data" / "prefs.jsonl").is_file()


def test_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="--set data=FILE.jsonl"):
        train_reward_model(RewardTrainConfig(out=str(tmp_path), demo_builder="no_such_module:build"))
    with pytest.raises(ValueError, match="heldout_fraction"):
        RewardTrainConfig(heldout_fraction=1.0)
    with pytest.raises(ValueError, match="unknown dtype"):
        RewardTrainConfig(dtype="float8")
    data = build_bright_square_data(tmp_path / "d", 2)
    lines = [json.loads(x) | {"split": "train"} for x in data.read_text().splitlines()]
    data.write_text("".join(json.dumps(x) + "\n" for x in lines))
    with pytest.raises(ValueError, match="training and held-out"):
        train_reward_model(RewardTrainConfig(data=str(data), out=str(tmp_path / "r"), tiny_preset="test"))


def test_accuracy_curve_trains_one_judge_per_count_on_one_held_out_set(tmp_path):
    from reward.training.accuracy_curve import main as curve_main

    data = build_bright_square_data(tmp_path / "data", 40)
    lines = [json.loads(line) for line in data.read_text().splitlines()]
    for i, rec in enumerate(lines):
        rec["split"] = "heldout" if i % 4 == 3 else "train"
    data.write_text("".join(json.dumps(r) + "\n" for r in lines))
    out = tmp_path / "curve"
    short = json.dumps(SHORT).replace(" ", "")  # one --set value
    curve = curve_main(["--pairs", "2,30", "--out", str(out), "--set", f"data={data}", "--set", "model=tiny",
                        "--set", "tiny_preset=test", "--set", "epochs=5", "--set", "lora=true", "--set", "lr=5e-3",
                        "--set", f"templates={short}", "--set", "show_crop=false", "--set", "progress=false"])
    assert curve["pairs"] == [2, 30] and (out / "curve.png").is_file()
    small, full = (curve["tables"][k]["overall"] for k in ("2", "30"))
    held_out_dims = sum(len(r["dimensions"]) for r in lines if r["split"] == "heldout")
    assert small["n"] == full["n"] == held_out_dims   # one held-out set for every count
    assert full["accuracy"] >= 0.8
    with pytest.raises(ValueError, match="exceed the 30 training records"):
        curve_main(["--pairs", "31", "--out", str(out), "--set", f"data={data}"])


@pytest.mark.parametrize("kind", ["pixels", "tint"])
def test_adversarial_pairs_stay_in_the_edited_region_and_raise_the_loss(tmp_path, kind):
    from reward.training.adversarial import adversarial_requests
    from reward.training.pairwise_loss import pairwise_loss
    from reward.vlm.tiny_vlm import build_tiny_vlm

    data = build_bright_square_data(tmp_path / "data", 4)
    requests = pairwise_requests([load_pair(r) for r in read_preferences(data)])[0]
    judge = TransformersJudge(build_tiny_vlm("test", seed=0), both_orders=True, templates=SHORT)
    eps = 0.05
    attacked = adversarial_requests(judge, requests, eps, steps=3, generator=torch.Generator().manual_seed(0),
                                    kind=kind)
    for clean, adv in zip(requests, attacked):
        for name in ("edited", "other"):
            moved = getattr(adv, name) - getattr(clean, name)
            assert moved.abs().max() <= eps + 1e-6 and moved.abs().max() > 0
            assert torch.all(moved[:, clean.mask[0] == 0] == 0)   # the known region is never touched
            if kind == "tint":  # one offset per channel wherever clamping to [0, 1] did not cut it
                free = (clean.mask[0] > 0) & (getattr(clean, name) > eps).all(0) & (getattr(clean, name) < 1 - eps).all(0)
                per_channel = moved[:, free]
                assert per_channel.shape[1] > 0
                assert torch.allclose(per_channel, per_channel[:, :1].expand_as(per_channel), atol=1e-6)
            assert not getattr(adv, name).requires_grad
        assert torch.equal(adv.source, clean.source)
    with torch.no_grad():
        assert float(pairwise_loss(judge, attacked)) > float(pairwise_loss(judge, requests))


def test_adversarial_training_runs_and_is_named_in_the_card(tmp_path):
    data = build_bright_square_data(tmp_path / "data", 12)
    cfg = RewardTrainConfig(data=str(data), out=str(tmp_path / "run"), model="tiny", tiny_preset="test", lora=False,
                            lr=1e-3, epochs=2, batch_size=4, templates=SHORT, show_crop=False, progress=False,
                            adversarial_eps=0.03, adversarial_steps=1)
    result = train_reward_model(cfg)
    assert result.metrics["steps"] > 0
    assert "--set adversarial_eps=0.03" in read_card(result.judge_dir).made_by
    with pytest.raises(ValueError, match="adversarial_eps"):
        RewardTrainConfig(adversarial_eps=1.5)
    with pytest.raises(ValueError, match="used only with adversarial_eps"):
        RewardTrainConfig(adversarial_kind="tint")
