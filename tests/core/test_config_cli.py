"""One config system for every entry point: rl.train, rl.plan, rl.pretrain, reward.train and the toy
VAE's pretraining (core.toy_flux.vae_training).

Each takes --config FILE.yaml and --set KEY=VALUE, names a bad key in its error, and lists every
key of its config dataclass (default, type, meaning) in --help. The expected keys and defaults are
walked from the dataclasses here, independently of core/config/schema.py's own walker.
"""
import dataclasses
import re
import typing

import pytest
import yaml

import reward.train
import rl.plan
import rl.pretrain
import rl.train
from core.config.cli import parse_config, show_value, type_text
from core.config.loading import ConfigError, load_yaml, to_dict
from core.config.schema import opt
from core.toy_flux import vae_training
from rl.plumbing.config import RunConfig
from rl.plumbing.config_checks import NUMERIC_RANGES

ENTRY_POINTS = {
    # name: (main, config class, numeric ranges, arguments every call needs, an unknown key, a bad value)
    "rl.train": (rl.train.main, RunConfig, NUMERIC_RANGES, [], "optim.lrr", ("train.steps", "0")),
    "rl.plan": (rl.plan.main, RunConfig, NUMERIC_RANGES, [], "optim.lrr", ("train.steps", "0")),
    "rl.pretrain": (rl.pretrain.main, rl.pretrain.PretrainConfig, rl.pretrain.RANGES, ["--out", "unused"],
                    "editor.known_weigth", ("editor.lr", "0")),
    "reward.train": (reward.train.main, reward.train.RewardTrainConfig, reward.train.RANGES, [], "lora_rank",
                     ("epochs", "0")),
    "core.toy_flux.vae_training": (vae_training.main, vae_training.VAETrainConfig, vae_training.RANGES,
                                   ["unused"], "vae.latent_chanels", ("lr", "0")),
}


def walk(cls, instance=None, prefix=""):
    """(dotted key, default, field) of every key; an optional section is a key and so are its keys."""
    instance = cls() if instance is None else instance
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, value = hints[f.name], getattr(instance, f.name)
        inner = [a for a in (tp, *typing.get_args(tp)) if dataclasses.is_dataclass(a)]
        if not inner or inner[0] is not tp:
            yield prefix + f.name, value, f
        if inner:
            yield from walk(inner[0], value if value is not None else inner[0](), f"{prefix}{f.name}.")


def run_main(main, argv, capsys):
    """(exit status, stdout, stderr) of an entry point's main(argv)."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_help_lists_every_key_with_its_default_type_and_meaning(name, capsys):
    main, cls, ranges, _, _, _ = ENTRY_POINTS[name]
    code, out, _ = run_main(main, ["--help"], capsys)
    assert code == 0 and out.startswith(f"usage: python -m {name}")
    keys = list(walk(cls))
    assert len(keys) >= 20
    for key, default, f in keys:
        assert f.metadata.get("help"), f"{name}: {key} has no one-line meaning (opt(default, meaning))"
        m = re.search(rf"^  {re.escape(key)} = (.*?)  \((.*)\)\n      (.*)$", out, re.MULTILINE)
        assert m, f"{name} --help does not list {key}"
        assert yaml.safe_load(m.group(1)) == to_dict(default), (key, m.group(1))
        assert f.metadata["help"].startswith(m.group(3).strip()), key
        if key in ranges:
            assert f"in {ranges[key]}" in m.group(2), key
    # the key list comes after the usage and the flags
    assert out.index("config keys:") > out.index("--set KEY=VALUE")


def test_help_groups_run_config_keys_by_section(capsys):
    _, out, _ = run_main(rl.train.main, ["--help"], capsys)
    headings = re.findall(r"^(\w+): ", out[out.index("config keys:"):], re.MULTILINE)
    assert headings == [f.name for f in dataclasses.fields(RunConfig)]
    assert re.search(r"^  optim\.lr = 5\.0e-05  \(float, in \(0, 1\]\)$", out, re.MULTILINE)
    assert re.search(r"^  nft\.std = group  \(group \| global\)$", out, re.MULTILINE)
    assert re.search(r"^  model\.lora = null  \(.* or null\)$", out, re.MULTILINE)


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_unknown_set_key_is_an_error_naming_it(name, capsys, tmp_path):
    main, _, _, needed, unknown, _ = ENTRY_POINTS[name]
    code, _, err = run_main(main, [a.replace("unused", str(tmp_path / "x")) for a in needed]
                            + ["--set", f"{unknown}=1"], capsys)
    assert code == 2 and f"unknown config key {unknown!r}" in err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_yaml_config_file_is_read_and_its_values_checked(name, capsys, tmp_path):
    main, cls, _, needed, _, (key, bad) = ENTRY_POINTS[name]
    needed = [a.replace("unused", str(tmp_path / "x")) for a in needed]
    config = tmp_path / "config.yaml"
    section, _, leaf = key.rpartition(".")
    config.write_text(yaml.safe_dump({section: {leaf: int(bad)}} if section else {leaf: int(bad)}))
    code, _, err = run_main(main, needed + ["--config", str(config)], capsys)
    assert code == 2 and f"{key} must be in" in err  # the file's value reached the typed, checked config
    config.write_text("nonsense_key: 1\n")
    code, _, err = run_main(main, needed + ["--config", str(config)], capsys)
    assert code == 2 and "nonsense_key" in err
    code, _, err = run_main(main, needed + ["--config", str(tmp_path / "missing.yaml")], capsys)
    assert code == 2 and "config file not found" in err


@pytest.mark.parametrize("module, cls, section", [(rl.pretrain, rl.pretrain.PretrainConfig, "editor"),
                                                  (reward.train, reward.train.RewardTrainConfig, None)])
def test_yaml_then_set_overrides_build_the_typed_config(module, cls, section, tmp_path):
    config = tmp_path / "config.yaml"
    values = {"seed": 7, "weight_decay": 0.02}
    config.write_text(yaml.safe_dump({section: values} if section else values))
    key = f"{section}.seed" if section else "seed"
    args, cfg = parse_config(module.parser(), cls, ["--config", str(config), "--set", f"{key}=3", "--out", "o"])
    part = getattr(cfg, section) if section else cfg
    assert isinstance(cfg, cls) and part.seed == 3 and part.weight_decay == 0.02
    assert str(args.out) == "o"


@pytest.mark.parametrize("cls, ranges", [(rl.pretrain.PretrainConfig, rl.pretrain.RANGES),
                                         (reward.train.RewardTrainConfig, reward.train.RANGES),
                                         (vae_training.VAETrainConfig, vae_training.RANGES)])
def test_every_numeric_key_declares_its_range(cls, ranges):
    def atoms(tp):
        yield tp
        for arg in typing.get_args(tp):
            yield from atoms(arg)

    def numeric_keys(owner, prefix=""):
        hints = typing.get_type_hints(owner)
        for f in dataclasses.fields(owner):
            inner = [a for a in atoms(hints[f.name]) if dataclasses.is_dataclass(a)]
            if inner:
                yield from numeric_keys(inner[0], f"{prefix}{f.name}.")
            elif {int, float} & set(atoms(hints[f.name])):
                yield prefix + f.name

    numeric = set(numeric_keys(cls))
    assert numeric == set(ranges), numeric ^ set(ranges)


@pytest.mark.parametrize("override, message", [
    ("editor.lr=0", "editor.lr must be in (0, 1], got 0.0"),
    ("vae.steps=0", "vae.steps must be in [1, inf)"),
    ("editor.ema_decay=1", "editor.ema_decay must be in [0, 1)"),
    ("editor.transformer.attention_head_dim=30", "attention_head_dim must be a multiple of 4"),
    ("editor.transformer.num_layers=0 editor.transformer.num_single_layers=0",
     "set num_layers or num_single_layers >= 1"),
    ("shifts=[0.0]", "shifts must be in (0, inf)"),
    ("editor.batch_size=many", "editor.batch_size: expected an integer"),
])
def test_pretrain_bad_values_are_named(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_yaml(rl.pretrain.PretrainConfig, None, override.split(" "))


def test_pretrain_still_requires_out(capsys):
    code, _, err = run_main(rl.pretrain.main, ["--set", "editor.steps=1"], capsys)
    assert code == 2 and "--out" in err


@pytest.mark.parametrize("override, message", [
    ("heldout_fraction=1", "heldout_fraction must be in (0, 1)"),
    ("lora_r=0", "lora_r must be in [1, inf)"),
    ("lr=-1", "lr must be in (0, 1]"),
    ("loss_over=tokens", "loss_over: 'tokens' is not one of ['vocab', 'labels']"),
    ("dtype=float8", "dtype: unknown dtype 'float8'"),
])
def test_reward_train_bad_values_are_named(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_yaml(reward.train.RewardTrainConfig, None, [override])


def test_reward_train_decides_lora_and_lr_from_the_final_model():
    """null lora / lr follow `model` as set by the file or --set, not the default's model."""
    cfg = load_yaml(reward.train.RewardTrainConfig, None, ["model=some/pretrained-vlm"])
    assert cfg.lora is None and cfg.lr is None
    assert (cfg.resolved().lora, cfg.resolved().lr) == (True, 1e-4)
    assert (reward.train.RewardTrainConfig().resolved().lora, reward.train.RewardTrainConfig().resolved().lr) == \
        (False, 1e-3)
    tiny_lora = reward.train.RewardTrainConfig(lora=True).resolved()
    assert tiny_lora.lr == 5e-3
    assert reward.train.RewardTrainConfig(lr=2e-4).resolved().lr == 2e-4


def test_opt_gives_each_instance_its_own_mutable_default():
    @dataclasses.dataclass
    class C:
        xs: list[int] = opt([1, 2], "numbers")
        n: int = opt(3, "a count")

    a, b = C(), C()
    a.xs.append(9)
    assert b.xs == [1, 2] and C.n == 3
    assert dataclasses.fields(C)[0].metadata["help"] == "numbers"


@pytest.mark.parametrize("value", [None, True, 0.0001, 1e-5, 220, "auto", "a: b", "", [0.9, 0.999],
                                   {"fill": 0.4, "text": 0.2}, ["to_out.0"]])
def test_show_value_reads_back_as_the_value(value):
    assert "\n" not in show_value(value) and yaml.safe_load(show_value(value)) == value


def test_type_text():
    from typing import Literal

    assert type_text(Literal["a", "b"]) == "a | b"
    assert type_text(float | None) == "float or null"
    assert type_text(list[str]) == "list of str"
    assert type_text(dict[str, float]) == "mapping of str to float"
