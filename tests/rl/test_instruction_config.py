"""Instruction editing in run configs: which tasks each model kind trains on, the world data that
serves them, and YAML mixtures meaning exactly what they list."""
import re

import pytest
import torch

from core.config.loading import ConfigError
from core.synthetic.instruction_world import InstructionWorld
from core.synthetic.world import SyntheticWorld
from core.tasks import INSTRUCTION_TASKS
from rl.plumbing.config import load_config
from rl.plumbing.data import WorldData


def test_a_yaml_mixture_is_the_whole_mixture(tmp_path):
    # a file's dict-valued key replaces the default dict (it used to be merged into it, so
    # `mixture: {fill: 1.0}` silently trained extend, removal and text as well)
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  mixture: {fill: 1.0}\noptim:\n  lr: 2.0e-4\n")
    cfg = load_config(str(path))
    assert cfg.data.mixture == {"fill": 1.0}
    assert cfg.optim.lr == 2e-4 and cfg.optim.grad_clip == load_config().optim.grad_clip  # sections still merge
    # an override still sets one weight of the mixture
    assert load_config(str(path), ["data.mixture.text=0.5"]).data.mixture == {"fill": 1.0, "text": 0.5}


@pytest.mark.parametrize("overrides, message", [
    (["data.mixture={recolour: 1.0}"], "model.kind 'tiny' is a mask-guided editor"),
    (["model.kind=tiny_kontext"], "model.kind 'tiny_kontext' is an instruction editor"),
    (["model.kind=flux_kontext", "model.path=x/y"], "cannot train on ['fill', 'extend', 'removal', 'text']"),
    (["data.mixture={paint: 1.0}"], "unknown task 'paint'; tasks are ['fill', 'extend', 'removal', 'text', 'recolour'"),
])
def test_each_model_kind_trains_on_its_own_tasks(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, overrides)


def test_instruction_kinds_accept_instruction_mixtures():
    mixture = "data.mixture={recolour: 1, remove_named: 1, add: 1, retext: 1, restyle: 1, fill: 0}"
    cfg = load_config(None, ["model.kind=tiny_kontext", mixture])
    assert cfg.model.kind == "tiny_kontext" and cfg.data.mixture["fill"] == 0  # a zero weight is not trained on


def test_world_data_serves_instruction_tasks_and_the_same_mask_guided_ones():
    data = WorldData({t: 1.0 for t in INSTRUCTION_TASKS}, world_seed=3, image_size=64)
    batch = data.conditions(seed=0, step=5, n=10)
    assert {s.task for s in batch} <= set(INSTRUCTION_TASKS) and len(batch) == 10
    world = InstructionWorld(size=64, seed=3)
    for task in INSTRUCTION_TASKS:
        got, want = data.held_out(task, 2), world.held_out(task, 2)
        assert [s.prompt for s in got] == [s.prompt for s in want]
        assert all(torch.equal(a.source, b.source) and torch.equal(a.target, b.target) for a, b in zip(got, want))
    # the mask-guided conditions are the plain synthetic world's, bit for bit
    fill = WorldData({"fill": 1.0, "text": 1.0}, world_seed=3, image_size=64)
    plain = SyntheticWorld(size=64, seed=3)
    for a, b in zip(fill.held_out("text", 3), plain.held_out("text", 3)):
        assert a.prompt == b.prompt and torch.equal(a.source, b.source) and torch.equal(a.mask, b.mask)


def test_the_kinds_table_covers_every_configurable_kind_and_pipeline_directory():
    import typing

    from rl.plumbing.config import ModelConfig
    from rl.plumbing.model_kinds import KINDS, kind_of_pipeline

    configurable = set(typing.get_args(typing.get_type_hints(ModelConfig)["kind"]))
    assert configurable == set(KINDS)
    assert kind_of_pipeline("FluxKontextPipeline", toy=True) == "tiny_kontext"
    assert kind_of_pipeline("FluxKontextPipeline", toy=False) == "flux_kontext"
    assert kind_of_pipeline("FluxFillPipeline", toy=True) == "tiny"
    assert kind_of_pipeline("QwenImageEditPipeline", toy=True) == "qwen_image_edit"  # no toy: the real one
    assert kind_of_pipeline("StableDiffusionPipeline", toy=False) is None
