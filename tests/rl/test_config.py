import re

import pytest

from core.config.loading import ConfigError, save_yaml
from rl.plumbing.config import RunConfig, load_config


def test_defaults_are_the_builtin_job():
    cfg = load_config()
    assert cfg.model.kind == "tiny" and cfg.model.path is None
    assert cfg.judge.kind == "rule" and cfg.train.algorithm == "refl" and cfg.judge.mode == "pairwise" and cfg.data.source == "world"
    assert set(cfg.data.mixture) == {"fill", "extend", "removal", "text"}


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 1.0e-4\nnft:\n  group_size: 6\n")
    cfg = load_config(str(path), ["nft.beta=0.1", "nft.tau_mean=null", "nft.tau_std=null", "model.lora.r=8", "optim.betas=[0.9, 0.99]"])
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
    ("optim.lr=-1", "optim.lr must be in (0, 1], got -1.0"),
    ("optim.lr=inf", "optim.lr must be in (0, 1], got inf"),
    ("optim.lr=1e30", "optim.lr must be in (0, 1], got 1e+30"),
    ("optim.grad_clip=-1", "optim.grad_clip must be in (0, inf)"),
    ("optim.betas=[0.9,1.0]", "optim.betas must be in [0, 1)"),
    ("optim.betas=[0.9]", "optim.betas must hold two numbers"),
    ("optim.weight_decay=-0.1", "optim.weight_decay must be in [0, 1]"),
    ("train.ema_max_decay=-0.5", "train.ema_max_decay must be in [0, 1)"),
    ("train.ema_max_decay=1", "train.ema_max_decay must be in [0, 1)"),
    ("train.steps=0", "train.steps must be in [1, inf)"),
    ("train.steps=-3", "train.steps must be in [1, inf)"),
    ("train.keep_checkpoints=-1", "train.keep_checkpoints must be in [0, inf)"),
    ("train.max_bad_steps=0", "train.max_bad_steps must be in [1, inf)"),
    ("nft.group_size=1", "nft.group_size must be in [2, inf)"),
    ("nft.groups_per_step=0", "nft.groups_per_step must be in [1, inf)"),
    ("nft.tau_mean=nan", "nft.tau_mean must be in [0, 1], got nan"),
    ("sampler.noise_level=-0.1", "sampler.noise_level must be in [0, 2]"),
    ("data.image_size=60", "data.image_size must be a multiple of 16"),
    ("nft.std_eps=0", "nft.std_eps must be in (0, inf)"),
    ("nft.tau_mean=0.5 nft.tau_std=null", "needs both nft.tau_mean and nft.tau_std, or neither"),
    ("nft.old_decay_max=1", "nft.old_decay_max must be in [0, 1)"),
    ("train.algorithm=refl judge.mode=score", "set judge.mode=pairwise"),
    ("model.kind=flux_fill", "needs model.path"),
    ("model.path=does/not/exist", "model.path not found: does/not/exist"),
    ("judge.kind=openai", "needs judge.base_url"),
    ("train.algorithm=refl judge.mode=pairwise refl.max_step=99", "refl.min_step/max_step"),
    ("optim.lr", "must look like key.path=value"),
])
def test_bad_keys_and_values_are_named(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, override.split(" "))


def test_every_numeric_key_declares_its_range():
    """A new numeric key must say what values it accepts (rl/plumbing/config_checks.py)."""
    import dataclasses

    from rl.plumbing.config import RunConfig
    from rl.plumbing.config_checks import NUMERIC_RANGES

    def numeric_keys(cls, prefix=""):
        import typing

        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            inner = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
            if dataclasses.is_dataclass(tp) or inner:
                yield from numeric_keys(inner[0] if inner else tp, f"{prefix}{f.name}.")
            elif any(t in (int, float) for t in (tp, *typing.get_args(tp), *[
                    x for a in typing.get_args(tp) for x in typing.get_args(a)])):
                yield f"{prefix}{f.name}"

    keys = set(numeric_keys(RunConfig))
    assert "optim.lr" in keys and "model.lora.r" in keys and "data.mixture" in keys
    assert keys == set(NUMERIC_RANGES), keys ^ set(NUMERIC_RANGES)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_device_without_a_gpu_is_a_config_error():
    with pytest.raises(ConfigError, match="model.device is 'cuda' but this machine has no CUDA GPU"):
        load_config(None, ["model.device=cuda"])


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
    assert {"tiny_nft.yaml", "tiny_refl.yaml", "flux_fill_nft_qwen7b.yaml", "flux_fill_nft_vllm.yaml",
            "flux_kontext_nft_vllm.yaml", "qwen_image_edit_nft_vllm.yaml"} <= names
    data = tmp_path / "edits.jsonl"
    data.write_text("")
    real = {"flux_fill": "flux_fill", "flux_kontext": "flux_kontext", "qwen_image_edit": "qwen_image_edit"}
    for path in configs:
        kind = next((k for prefix, k in real.items() if path.name.startswith(prefix)), None)
        cfg = load_config(str(path), [f"data.jsonl={data}"] if kind else [])
        if kind:
            assert cfg.model.kind == kind and cfg.model.lora is not None and cfg.model.dtype == "bfloat16"
            assert cfg.model.gradient_checkpointing and cfg.data.source == "jsonl"
    # without the user's data file the error names it
    with pytest.raises(ConfigError, match="data.jsonl file not found: data/edits.jsonl"):
        load_config(str(Path(__file__).parents[2] / "configs" / "flux_fill_nft_vllm.yaml"))
    # the instruction editors: Edit-R1's recipe on instruction tasks, judged by a served Qwen2.5-VL-32B
    from core.tasks import INSTRUCTION_TASKS

    for name, path, guidance in (("flux_kontext_nft_vllm.yaml", "black-forest-labs/FLUX.1-Kontext-dev", 2.5),
                                 ("qwen_image_edit_nft_vllm.yaml", "Qwen/Qwen-Image-Edit", None)):
        cfg = load_config(str(Path(__file__).parents[2] / "configs" / name), [f"data.jsonl={data}"])
        assert cfg.model.path == path and cfg.model.guidance == guidance
        assert set(cfg.data.mixture) == set(INSTRUCTION_TASKS) and all(w > 0 for w in cfg.data.mixture.values())
        assert cfg.train.algorithm == "nft" and cfg.judge.kind == "openai" and cfg.judge.mode == "score"
        assert cfg.judge.model == "Qwen/Qwen2.5-VL-32B-Instruct" and not cfg.judge.show_crop
        assert (cfg.nft.tau_mean, cfg.nft.tau_std, cfg.nft.filter_rule) == (0.9, 0.05, "paper")
        assert (cfg.nft.group_size, cfg.nft.groups_per_step, cfg.sampler.steps) == (12, 24, 6)
        assert (cfg.optim.lr, cfg.nft.kl_coef, cfg.nft.beta) == (3e-4, 1e-4, 1.0)
    # the default job is the shipped tiny_refl.yaml
    assert load_config(str(Path(__file__).parents[2] / "configs" / "tiny_refl.yaml")) == load_config()


def test_every_config_key_is_read_by_the_code():
    """A key that nothing reads is a promise the code does not keep (cfg_scale, eval_every once)."""
    import dataclasses
    import typing
    from pathlib import Path

    from rl.plumbing.config import RunConfig

    root = Path(__file__).parents[2]
    defining = {"rl/plumbing/config.py", "rl/plumbing/config_checks.py"}
    source = "\n".join(p.read_text() for pkg in ("core", "reward", "rl") for p in (root / pkg).rglob("*.py")
                       if p.relative_to(root).as_posix() not in defining and p.parent != root / "core" / "config")

    def fields(cls, prefix=""):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            inner = [a for a in (hints[f.name], *typing.get_args(hints[f.name])) if dataclasses.is_dataclass(a)]
            yield f"{prefix}{f.name}", f.name
            if inner:
                yield from fields(inner[0], f"{prefix}{f.name}.")

    unread = [key for key, name in fields(RunConfig) if not re.search(rf"\.{name}\b", source)]
    assert unread == []


def test_every_config_key_has_a_one_line_meaning():
    """--help and the source read the same text: opt(default, meaning) in rl/plumbing/config.py."""
    import dataclasses
    import typing

    def fields(cls, prefix=""):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            yield f"{prefix}{f.name}", f
            inner = [a for a in (hints[f.name], *typing.get_args(hints[f.name])) if dataclasses.is_dataclass(a)]
            if inner:
                yield from fields(inner[0], f"{prefix}{f.name}.")

    meanings = {key: f.metadata.get("help", "") for key, f in fields(RunConfig)}
    assert len(meanings) > 90
    assert [k for k, m in meanings.items() if not m.strip() or "\n" in m] == []
    assert meanings["optim.lr"].startswith("full fine-tune rate of the toy model")


def test_help_text_does_not_change_the_config_values():
    """Declaring meanings with opt() kept every default; lists and dicts are per instance."""
    a, b = RunConfig(), RunConfig()
    a.optim.betas.append(0.5)
    a.data.mixture["fill"] = 0.0
    assert b.optim.betas == [0.9, 0.999] and b.data.mixture["fill"] == 0.4
    assert b.model.lora is None and b.nft.tau_mean == 0.9 and b.train.steps == 300


def test_eval_every_adds_held_out_scores_to_the_metrics(quick, tmp_path):
    import json

    import rl.train

    cfg = load_config(None, quick(**{"train.steps": 3, "train.eval_every": 1, "train.eval_per_task": 1}))
    rl.train.run(cfg, out_dir=tmp_path)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [("heldout/reward" in m) for m in lines] == [True, True, False]  # the last step: the summary
    assert set(lines[0]["heldout/reward_by_task"]) == {"fill", "extend", "removal", "text"}
    assert "psnr_mask" in lines[0]["heldout/truth_by_task"]["removal"]
