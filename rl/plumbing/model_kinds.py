"""The model kinds (`model.kind`), each once: which policy class loads it, which diffusers pipeline
directory it is, whether it is a built-in toy, whether it edits from words alone.

The config checks (instruction kinds train on instruction tasks), the policy builder, the loading of
model directories (rl.plumbing.model_ref) and the memory plan all read this table.
"""
from __future__ import annotations

import dataclasses
from typing import Literal

Family = Literal["fill", "kontext", "qwen"]


@dataclasses.dataclass(frozen=True)
class ModelKind:
    name: str
    #: the policy class that loads it: fill = core.policies.flux_fill.FluxFillPolicy, kontext =
    #: core.policies.flux_kontext.FluxKontextPolicy, qwen = core.policies.qwen_image_edit.QwenImageEditPolicy
    family: Family
    #: model_index.json's _class_name of its pipeline directory
    pipeline: str
    #: built in: model.path null loads the pipeline shipped in core/assets
    toy: bool = False

    @property
    def instruction(self) -> bool:
        """It edits from an instruction alone (no mask) and trains on core.tasks.INSTRUCTION_TASKS."""
        return self.family != "fill"

    @property
    def appends_source(self) -> bool:
        """Its transformer's sequence holds the source image's tokens after the generated ones
        (FLUX.1 Kontext and Qwen-Image-Edit; Fill takes them as channels)."""
        return self.family in ("kontext", "qwen")


KINDS: dict[str, ModelKind] = {k.name: k for k in (
    ModelKind("tiny", "fill", "FluxFillPipeline", toy=True),
    ModelKind("flux_fill", "fill", "FluxFillPipeline"),
    ModelKind("tiny_kontext", "kontext", "FluxKontextPipeline", toy=True),
    ModelKind("flux_kontext", "kontext", "FluxKontextPipeline"),
    ModelKind("qwen_image_edit", "qwen", "QwenImageEditPipeline"),
)}

#: model kinds that edit from an instruction alone (no mask): they train on core.tasks.INSTRUCTION_TASKS
INSTRUCTION_KINDS: tuple[str, ...] = tuple(n for n, k in KINDS.items() if k.instruction)
#: the kinds with a built-in toy (model.path null)
BUILTIN_KINDS: tuple[str, ...] = tuple(n for n, k in KINDS.items() if k.toy)


def kind_of_pipeline(class_name: str | None, toy: bool) -> str | None:
    """The model.kind of a pipeline directory of `class_name`: the toy's when `toy` and the pipeline has
    one, else the real model's; None when no kind has that pipeline."""
    matches = [k for k in KINDS.values() if k.pipeline == class_name]
    return next((k.name for k in matches if k.toy == toy), next((k.name for k in matches if not k.toy), None))
