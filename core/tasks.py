"""The tasks as data: what the judge scores for each, fixed prompts, mixtures.

Every other part (the synthetic world, the judges, the trainers, evaluation) reads tasks and
dimensions from here, so a task is added in one place. Dimension definitions follow OneReward
section 4.2; "text_accuracy" is ours, for the text-rendering task.

Two families. TASKS, the four mask-guided tasks of OneReward (the editor gets a mask), are what
training, pretraining and user data take. INSTRUCTION_TASKS are Edit-R1's setting: the editor gets
an instruction and no mask ("make the red circle blue"); core.synthetic.instruction_world makes them with
ground truth, the rule judge and core.synthetic.metrics judge them, and no policy trains on them yet (the
toy FLUX.1 Fill cannot: it needs a mask, and its tokenizers lack the instruction words). Their
dimensions: Edit-R1 scores one judgement, "the correct object was edited according to the
instruction, all requirements were met, and the visual result is high quality" (its appendix C),
and its human study splits it into instruction alignment and image quality; here that is
instruction_following and aesthetics, plus OneReward-style preservation (everything the
instruction does not touch stays as it was), the one requirement every instruction edit shares.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

TASKS: tuple[str, ...] = ("fill", "extend", "removal", "text")
INSTRUCTION_TASKS: tuple[str, ...] = ("recolour", "remove_named", "add", "retext", "restyle")
ALL_TASKS: tuple[str, ...] = TASKS + INSTRUCTION_TASKS

DIMENSIONS: dict[str, str] = {
    "text_alignment": (
        "how accurately the generated content matches the semantics of the prompt, especially "
        "object identity, attributes and position"
    ),
    "consistency": (
        "how smoothly the edited region blends with its surroundings in colour, texture and "
        "illumination, with no visible seam"
    ),
    "structure": (
        "whether the generated content keeps the spatial and geometric coherence of the original "
        "layout: object contours, perspective and scene structure"
    ),
    "aesthetics": (
        "the overall visual appeal of the result: composition, realism and fidelity to "
        "high-quality image standards"
    ),
    "removal_quality": (
        "whether the target object is completely removed and the area is cleanly filled with "
        "plausible background, without artifacts or new unintended content"
    ),
    "text_accuracy": (
        "whether exactly the requested text is rendered inside the region, legible and with no "
        "missing, extra or wrong characters"
    ),
    "instruction_following": (
        "whether the edit does what the instruction asks: the correct object was edited, in the "
        "requested way (colour, removal, shape and place, text, background), and all requirements "
        "were met"
    ),
    "preservation": (
        "whether everything the instruction does not ask to change (the other objects, the "
        "background, any text) is left exactly as it was in the original image"
    ),
}

TASK_DIMENSIONS: dict[str, tuple[str, ...]] = {
    "fill": ("text_alignment", "consistency", "structure", "aesthetics"),
    "extend": ("text_alignment", "consistency", "structure", "aesthetics"),
    "removal": ("removal_quality", "consistency", "structure"),
    "text": ("text_accuracy", "consistency"),
    **{t: ("instruction_following", "preservation", "aesthetics") for t in INSTRUCTION_TASKS},
}

TASK_DESCRIPTIONS: dict[str, str] = {
    "fill": "image fill: generate new content inside the masked region following the prompt",
    "extend": "image extend: extend the image outward beyond its original borders",
    "removal": "object removal: remove the object in the masked region and fill it with background",
    "text": "text rendering: draw the requested text inside the masked region",
    "recolour": "recolouring: give the named object the requested colour and change nothing else",
    "remove_named": "object removal by name: remove the named object and restore the background behind it",
    "add": "adding an object: draw the requested object at the requested place in the image",
    "retext": "text replacement: replace the named text with the requested text, in the same place and ink",
    "restyle": "background change: give the image the requested background, keeping every object as it is",
}

# Fixed prompts, as in OneReward's released inference code: removal has no user text, and
# extend may come without a prompt (then text alignment is not judged).
REMOVAL_PROMPT = "remove the object and fill the region with the surrounding background"
EXTEND_NO_PROMPT = "a seamless, high quality continuation of the image"

# OneReward trained with 50/25/25 fill/extend/removal; text is off unless configured.
PAPER_MIXTURE: dict[str, float] = {"fill": 0.5, "extend": 0.25, "removal": 0.25, "text": 0.0}


def check_task(task: str) -> str:
    """`task` if it is a registered task (mask-guided or instruction), else a ValueError."""
    if task not in TASK_DIMENSIONS:
        raise ValueError(f"unknown task {task!r}; expected one of {list(ALL_TASKS)}")
    return task


def dimensions_for(task: str, *, has_prompt: bool = True) -> tuple[str, ...]:
    """The dimensions the judge scores for `task`; extend without a prompt drops text alignment."""
    dims = TASK_DIMENSIONS[check_task(task)]
    if task == "extend" and not has_prompt:
        dims = tuple(d for d in dims if d != "text_alignment")
    return dims


@dataclass(frozen=True)
class TaskMixture:
    """Sampling probabilities over tasks (normalised; zero-weight tasks are never drawn)."""

    weights: dict[str, float]

    def __post_init__(self) -> None:
        for task, w in self.weights.items():
            check_task(task)
            if not (w >= 0.0):
                raise ValueError(f"task weight for {task!r} must be >= 0, got {w}")
        if sum(self.weights.values()) <= 0:
            raise ValueError(f"task mixture {self.weights} has no positive weight")

    @property
    def probabilities(self) -> dict[str, float]:
        total = sum(self.weights.values())
        return {t: w / total for t, w in self.weights.items() if w > 0}

    def sample(self, rng: random.Random, n: int, *, balanced: bool = False) -> list[str]:
        """n tasks. Independent draws by default; `balanced`: every task `floor(n p)` times, the
        remaining slots drawn without replacement by the fractional parts of n p, in a shuffled
        order, so that each batch holds every task in proportion (a task with n p >= 1 is never
        absent, as independent draws leave a weight-0.2 task out of 12 conditions 7% of the time)."""
        probs = self.probabilities
        if not balanced:
            return rng.choices(list(probs), weights=list(probs.values()), k=n)
        exact = {t: n * p for t, p in probs.items()}
        out = [t for t, x in exact.items() for _ in range(int(x))]
        fractions = {t: x - int(x) for t, x in exact.items() if x - int(x) > 1e-9}
        while len(out) < n and fractions:
            t = rng.choices(list(fractions), weights=list(fractions.values()))[0]
            out.append(t)
            del fractions[t]
        rng.shuffle(out)
        return out
