"""The judge interface: one call scores a batch of (task, dimension, images, ...) requests.

Every backend (the rule judge, a VLM in-process through transformers, a VLM behind an OpenAI-style
server) implements `Judge.score`. A score is a float in [0, 1]; a judge that cannot produce one
raises `JudgeError` — it never returns a made-up value such as 0.
"""
from __future__ import annotations

import abc
import dataclasses
from typing import Any, Literal

import torch
from torch import Tensor

from core.tasks import DIMENSIONS, check_task

Mode = Literal["score", "yesno", "pairwise"]
MODES: tuple[str, ...] = ("score", "yesno", "pairwise")


class JudgeError(RuntimeError):
    """A judge could not score a request (after its retries). Never converted into a reward."""


@dataclasses.dataclass
class JudgeRequest:
    """One question to the judge about one edit.

    Images are float tensors [3, H, W] in [0, 1] (they may carry gradients: a differentiable judge
    back-propagates into `edited`). `mask` is [1, H, W] with 1 = the edited region.
    In "pairwise" mode the question is whether `edited` is better than `other` (the reference
    model's image for the same condition).
    """

    task: str
    dimension: str
    source: Tensor
    edited: Tensor
    mask: Tensor
    instruction: str = ""
    other: Tensor | None = None
    reference: Tensor | None = None   # an optional reference image shown to the judge
    truth: Any = None                 # ground truth of the synthetic world (rule judge only)

    def __post_init__(self) -> None:
        check_task(self.task)
        if self.dimension not in DIMENSIONS:
            raise ValueError(f"unknown dimension {self.dimension!r}; expected one of {list(DIMENSIONS)}")
        for name in ("source", "edited"):
            img = getattr(self, name)
            if img.dim() != 3 or img.shape[0] != 3:
                raise ValueError(f"JudgeRequest.{name} must be [3, H, W] in [0, 1], got shape {tuple(img.shape)}")
        if self.mask.dim() != 3 or self.mask.shape[0] != 1 or self.mask.shape[1:] != self.source.shape[1:]:
            raise ValueError(
                f"JudgeRequest.mask must be [1, H, W] matching the source {tuple(self.source.shape[1:])}, "
                f"got {tuple(self.mask.shape)}"
            )


class Judge(abc.ABC):
    """Scores requests in one of the modes "score" (0-5 expectation / 5), "yesno" or "pairwise"."""

    #: True when `score` is differentiable with respect to `JudgeRequest.edited`
    differentiable: bool = False

    @abc.abstractmethod
    def score(self, requests: list[JudgeRequest], mode: Mode = "score") -> Tensor:
        """A float tensor [N] in [0, 1], one per request, in order. Raises JudgeError on failure."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources (HTTP sessions, servers)."""


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"unknown judge mode {mode!r}; expected one of {list(MODES)}")
    return mode


def check_scores(scores: Tensor, n: int, who: str) -> Tensor:
    """Every backend's last line: exactly n finite values in [0, 1], or a JudgeError."""
    if scores.shape != (n,):
        raise JudgeError(f"{who} returned {tuple(scores.shape)} scores for {n} requests")
    bad = ~torch.isfinite(scores.detach()) | (scores.detach() < 0) | (scores.detach() > 1)
    if bool(bad.any()):
        raise JudgeError(f"{who} returned scores outside [0, 1] or non-finite: {scores.detach()[bad].tolist()}")
    return scores
