"""The judge's questions as data: templates with named fields, and the conversation they build.

One template per mode ("score", "yesno", "pairwise") names the task and the quality dimension and
defines the dimension (definitions from `core.tasks`, after OneReward section 4.2). The user's
instruction is shown only for the prompt-dependent dimensions (text alignment, text accuracy):
OneReward judges the other dimensions prompt-free. Instruction tasks (Edit-R1's setting) show it
for every dimension, as Edit-R1's templates do. Every backend (in-process, OpenAI API, the
server) builds the same `Conversation` from a `JudgeRequest`, so their scores agree.

Templates are overridable from a mapping or a YAML file; an unknown key or an unknown placeholder
is a ValueError.
"""
from __future__ import annotations

import dataclasses
import os
import string
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from core.tasks import DIMENSIONS, INSTRUCTION_TASKS, TASK_DESCRIPTIONS
from reward.judge import JudgeRequest, check_mode
from reward.vlm.views import JudgeView, mask_crop

#: dimensions whose judgement depends on the user's instruction (the others are prompt-free);
#: an instruction task (core.tasks.INSTRUCTION_TASKS) shows its instruction for every dimension,
#: since what must stay unchanged depends on what was asked
PROMPT_DIMENSIONS: tuple[str, ...] = ("text_alignment", "text_accuracy", "instruction_following")

#: the answer tokens read from the first generated position, per mode
SCORE_LABELS: tuple[str, ...] = ("0", "1", "2", "3", "4", "5")
YES, NO = "Yes", "No"
LABELS: dict[str, tuple[str, ...]] = {"score": SCORE_LABELS, "yesno": (YES, NO), "pairwise": (YES, NO)}

_QUERY_FIELDS = frozenset({"images", "task", "task_description", "dimension", "dimension_name",
                           "dimension_definition", "instruction_block"})
_ALLOWED_FIELDS: dict[str, frozenset[str]] = {
    "system": frozenset(),
    "score": _QUERY_FIELDS,
    "yesno": _QUERY_FIELDS,
    "pairwise": _QUERY_FIELDS,
    "instruction_block": frozenset({"instruction"}),
    "image_source": frozenset({"index"}),
    "image_edited": frozenset({"index"}),
    "image_first": frozenset({"index"}),
    "image_second": frozenset({"index"}),
    "image_reference": frozenset({"index"}),
    "image_crop": frozenset({"index", "of"}),
}


@dataclasses.dataclass(frozen=True)
class JudgeTemplates:
    """The judge's wording. Placeholders in braces are filled per request (see `_ALLOWED_FIELDS`)."""

    system: str = (
        "You are a strict, impartial inspector of image edits. You look closely at the images and "
        "answer with exactly one token."
    )
    score: str = (
        "{images}"
        "The task is {task_description}.\n"
        "Judge one quality only: {dimension_name}, that is, {dimension_definition}.\n"
        "{instruction_block}"
        "Give the edited result a grade from 0 to 5 for this quality alone: 0 means it fails "
        "entirely, 5 means it has no flaw at all.\n"
        "Reply with the single digit only."
    )
    yesno: str = (
        "{images}"
        "The task is {task_description}.\n"
        "Judge one quality only: {dimension_name}, that is, {dimension_definition}.\n"
        "{instruction_block}"
        "Is the edited result free of any visible flaw in this quality?\n"
        "Reply Yes or No only."
    )
    pairwise: str = (
        "{images}"
        "Both results attempt the same task, {task_description}.\n"
        "Compare them on one quality only: {dimension_name}, that is, {dimension_definition}.\n"
        "{instruction_block}"
        "Is the first result better than the second in this quality?\n"
        "Reply Yes or No only."
    )
    instruction_block: str = 'The user asked for: "{instruction}".\n'
    image_source: str = "Image {index} is the input, before the edit."
    image_edited: str = "Image {index} is the edited result."
    image_first: str = "Image {index} is the first result."
    image_second: str = "Image {index} is the second result."
    image_reference: str = "Image {index} is a reference for the intended content."
    image_crop: str = "Image {index} is a close-up of the edited region of image {of}."

    def __post_init__(self) -> None:
        for name, allowed in _ALLOWED_FIELDS.items():
            text = getattr(self, name)
            if not isinstance(text, str):
                raise ValueError(f"template {name!r} must be a string, got {type(text).__name__}")
            try:
                used = {f for _, f, _, _ in string.Formatter().parse(text) if f is not None}
            except ValueError as err:
                raise ValueError(f"template {name!r} is not a valid format string ({err}); "
                                 "write literal braces as {{ and }}") from err
            unknown = used - allowed
            if unknown:
                raise ValueError(f"template {name!r} uses unknown placeholder(s) {sorted(unknown)}; "
                                 f"allowed: {sorted(allowed) or 'none'}")

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | str | os.PathLike | None) -> JudgeTemplates:
        """Defaults overridden by a mapping or a YAML file of {template name: text}."""
        if config is None:
            return cls()
        if isinstance(config, (str, os.PathLike)):
            import yaml

            with open(config, encoding="utf-8") as f:
                config = yaml.safe_load(f) or {}
        if not isinstance(config, Mapping):
            raise ValueError(f"judge templates config must be a mapping of name -> text, got {type(config).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"unknown judge template key(s) {unknown}; valid keys: {sorted(known)}")
        return cls(**dict(config))

    def texts(self) -> list[str]:
        """Every template string (for building a tokenizer that covers them)."""
        return [getattr(self, f.name) for f in dataclasses.fields(self)]


@dataclasses.dataclass
class ChatMessage:
    """One chat message: its role and its parts in order (text strings and images [3, H, W])."""

    role: str
    parts: list[str | Tensor]


Conversation = list[ChatMessage]


def conversation_images(conversation: Conversation) -> list[Tensor]:
    """The images of a conversation in the order the model sees them."""
    return [p for m in conversation for p in m.parts if not isinstance(p, str)]


def _fill(template: str, **fields: Any) -> str:
    return template.format(**fields)


def build_conversation(request: JudgeRequest, mode: str, templates: JudgeTemplates, view: JudgeView,
                       *, swap: bool = False) -> Conversation:
    """The question for one request. `swap` (pairwise only) shows `other` first and `edited` second."""
    check_mode(mode)
    t = templates
    shown: list[tuple[Tensor, str]] = []   # (image, caption template) in display order
    if mode == "pairwise":
        if request.other is None:
            raise ValueError("pairwise mode needs JudgeRequest.other (the image to compare against)")
        if request.other.shape != request.edited.shape:
            raise ValueError(f"JudgeRequest.other {tuple(request.other.shape)} must match edited "
                             f"{tuple(request.edited.shape)}")
        first, second = (request.other, request.edited) if swap else (request.edited, request.other)
        if view.show_source:
            shown.append((request.source, t.image_source))
        compared = [(first, t.image_first), (second, t.image_second)]
    else:
        if swap:
            raise ValueError("swap applies to pairwise mode only")
        shown.append((request.source, t.image_source))
        compared = [(request.edited, t.image_edited)]
    shown += compared
    if request.reference is not None:
        shown.append((request.reference, t.image_reference))
    lines = [_fill(caption, index=i + 1) for i, (_, caption) in enumerate(shown)]
    images = [img for img, _ in shown]
    if view.crop:
        for img, _ in compared:
            of = next(i for i, (s, _) in enumerate(shown) if s is img) + 1
            images.append(mask_crop(img, request.mask, margin=view.crop_margin, size=view.crop_size))
            lines.append(_fill(t.image_crop, index=len(images), of=of))
    dim = request.dimension
    shows_instruction = dim in PROMPT_DIMENSIONS or request.task in INSTRUCTION_TASKS
    instruction = (_fill(t.instruction_block, instruction=request.instruction)
                   if shows_instruction and request.instruction else "")
    text = _fill(getattr(t, mode), images="\n".join(lines) + "\n", task=request.task,
                 task_description=TASK_DESCRIPTIONS[request.task], dimension=dim,
                 dimension_name=dim.replace("_", " "), dimension_definition=DIMENSIONS[dim],
                 instruction_block=instruction)
    conversation = [ChatMessage("user", [*images, text])]
    if t.system:
        conversation.insert(0, ChatMessage("system", [t.system]))
    return conversation


def build_conversations(requests: list[JudgeRequest], mode: str, templates: JudgeTemplates, view: JudgeView,
                        *, both_orders: bool = False) -> list[Conversation]:
    """The chats for a batch. Pairwise with `both_orders` gives two per request, edited first then
    other first (the row order `labels.scores_from_label_probs` expects)."""
    check_mode(mode)
    out = []
    for req in requests:
        out.append(build_conversation(req, mode, templates, view))
        if mode == "pairwise" and both_orders:
            out.append(build_conversation(req, mode, templates, view, swap=True))
    return out
