import pytest

from rl.config import RunConfig, load_config
from rl.config_io import ConfigError, save_yaml


def test_defaults_are_the_builtin_job():
    cfg = load_config()
    assert cfg.model.kind == "tiny" and cfg.model.path is None
    assert cfg.judge.kind == "rule" and cfg.train.algorithm == "nft" and cfg.data.source == "world"
    assert set(cfg.data.mixture) == {"fill", "extend", "removal", "text"}


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 1.0e-4\nnft:\n  group_size: 6\n")
    cfg = load_config(str(path), ["nft.beta=0.1", "nft.tau_mean=null", "model.lora.r=8", "optim.betas=[0.9, 0.99]"])
    assert cfg.optim.lr == 1e-4 and cfg.nft.group_size == 6 and cfg.nft.beta == 0.1
    assert cfg.nft.tau_mean is None and cfg.model.lora.r == 8 and cfg.optim.betas == [0.9, 0.99]
    # the saved, resolved config loads back to the same thing
    save_yaml(cfg, tmp_path / "resolved.yaml")
    assert load_config(str(tmp_path / "resolved.yaml")) == cfg


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1", "unknown config key 'optim.lrr'"),
    ("nope.x=1", "unknown config key 'nope'"),
    ("optim.lr=fast", "optim.lr: expected a number"),
    ("nft.std=median", "nft.std: 'median' is not one of"),
    ("train.steps=1.5", "train.steps: expected an integer"),
    ("data.mixture.paint=1", "unknown task 'paint'"),
    ("optim.lr=-1", "optim.lr must be > 0"),
    ("nft.std_eps=0", "nft.std_eps must be > 0"),
    ("nft.old_decay_max=1", "nft.old_decay_max in"),
    ("train.algorithm=refl", "set judge.mode=pairwise"),
    ("model.kind=flux_fill", "needs model.path"),
    ("model.path=does/not/exist", "model.path not found: does/not/exist"),
    ("judge.kind=openai", "needs judge.base_url"),
    ("train.algorithm=refl judge.mode=pairwise refl.max_step=99", "refl.min_step/max_step"),
    ("optim.lr", "must look like key.path=value"),
])
def test_bad_keys_and_values_are_named(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(".", r"\.")):
        load_config(None, override.split(" "))


def test_unknown_key_in_yaml_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("nft:\n  gropu_size: 4\n")
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) \['gropu_size'\] in 'nft'"):
        load_config(str(path))
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "missing.yaml"))


def test_shipped_configs_load_and_validate(tmp_path):
    from pathlib import Path

    configs = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))
    names = {p.name for p in configs}
    assert {"tiny_nft.yaml", "tiny_refl.yaml", "flux_fill_nft_qwen7b.yaml", "flux_fill_nft_vllm.yaml"} <= names
    data = tmp_path / "edits.jsonl"
    data.write_text("")
    for path in configs:
        cfg = load_config(str(path), [f"data.jsonl={data}"] if "flux" in path.name else [])
        if "flux" in path.name:
            assert cfg.model.kind == "flux_fill" and cfg.model.lora is not None and cfg.model.dtype == "bfloat16"
            assert cfg.model.gradient_checkpointing
    # without the user's data file the error names it
    with pytest.raises(ConfigError, match="data.jsonl file not found: data/edits.jsonl"):
        load_config(str(Path(__file__).parents[2] / "configs" / "flux_fill_nft_vllm.yaml"))
    # the default job is the shipped tiny_nft.yaml
    assert load_config(str(Path(__file__).parents[2] / "configs" / "tiny_nft.yaml")) == load_config()
