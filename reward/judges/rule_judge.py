"""A rule judge for the synthetic world: it knows the ground truth, so it measures real quality.

Each (task, dimension) gets a quality q in [0, 1] computed in torch from the edited image and the
world's truth (differentiable in the edited image, so reward feedback learning can use it):

- content terms read identity (which glyph, which shape, of which colour, where), softly so that
  they stay differentiable, as core/synthetic/metrics.py reads it for the ground-truth metrics. Soft
  overlaps of "pixels of the requested colour" with the truth, the terms before them, paid a solid
  block |truth| / |box|, and RL learned to paint blocks of ink and blobs of colour while glyph and
  shape accuracy fell. A wrong but well-formed answer keeps partial credit, above every hack
  (a block, an empty region, noise: about 0), so RL has a slope from junk to form to the right form:
  text_accuracy    text: a soft per-cell glyph reading over the font, solid and blank, as
                   core.synthetic.metrics reads glyphs (text_terms);
  text_alignment   fill: colour x soft shape reading x placement of the drawn region
                   (content_terms); extend with an object described in the new area: the same
                   read at the object's true pose, since the kept canvas fixes where it continues,
                   times fidelity of the rest of the new area to the true continuation
                   (extend_terms); extend with nothing described: fidelity to the continuation;
- fidelity terms are exp(-MSE / s) over a region that matters for the dimension:
  removal_quality  the removed object's footprint vs the clean background;
  consistency      the seam: a 3-pixel band inside the mask along its border with the kept region;
- structure        edges: image gradients inside the mask vs the target's;
- aesthetics       cleanliness (high-frequency energy in the mask beyond the target's, colours out
                   of range) times realism: the blurred edit against the blurred ground truth, so
                   a clean but empty region is not "beautiful" when something was asked for.

Instruction tasks (core/synthetic/instruction_world.py: no mask for the editor; the sample's mask is the
region that should change) have three dimensions, scored the same way:
  instruction_following  the task's identity term (reward/judges/instruction_terms.py: the right
                   colour on the right object, the right object gone, the right shape at the
                   right place, the right glyphs, the right kind of background);
  preservation     fidelity to the target over what must stay as in the source (truth["keep"]);
  aesthetics       the rule above over the region that may change (1 - keep);
and like fill and text, preservation and aesthetics are gated by the identity term.

The three judge modes are read off q as a VLM's would be: "score" is the expectation of a
distribution over the digits 0..5 peaked at 5q, "yesno" a logistic of q - 1/2, and "pairwise" a
Bradley-Terry probability on the difference of the two images' q.
"""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from core.masks import dilate, erode
from core.synthetic.world import EditSample
from core.tasks import INSTRUCTION_TASKS
from reward.judge import (
    Judge,
    JudgeError,
    JudgeRequest,
    Mode,
    check_mode,
    check_scores,
)
from reward.judges.content_terms import fill_alignment_term
from reward.judges.extend_terms import extend_alignment_term
from reward.judges.instruction_terms import instruction_following_term
from reward.judges.text_terms import text_accuracy_term

_LAPLACE = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])


def _mse(a: Tensor, b: Tensor, w: Tensor) -> Tensor:
    w = w.expand_as(a)
    return ((a - b) ** 2 * w).sum() / w.sum().clamp_min(1e-6)


def _fidelity(a: Tensor, b: Tensor, w: Tensor, scale: float) -> Tensor:
    return torch.exp(-_mse(a, b, w) / scale)


def _grads(x: Tensor) -> tuple[Tensor, Tensor]:
    return x[:, 1:, :] - x[:, :-1, :], x[:, :, 1:] - x[:, :, :-1]


def _blur(x: Tensor, k: int = 5) -> Tensor:
    return F.avg_pool2d(x[None], k, stride=1, padding=k // 2, count_include_pad=False)[0]


def _laplacian(x: Tensor) -> Tensor:
    k = _LAPLACE.to(x)[None, None].expand(x.shape[0], 1, 3, 3)
    return F.conv2d(x[None], k, padding=1, groups=x.shape[0])[0]


def _wide(x: Tensor) -> Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _aesthetics(E: Tensor, T: Tensor, M: Tensor) -> Tensor:
    """Cleanliness (high-frequency energy beyond the target's, colours out of range) times realism
    (the blurred edit against the blurred target), over the region M."""
    noise = F.relu(_laplacian(E) ** 2 - _laplacian(T) ** 2)
    out_of_range = F.relu(E - 1) + F.relu(-E)
    clean = torch.exp(-(_mse(noise, torch.zeros_like(noise), M) + 10 * _mse(out_of_range, 0 * E, M)) / 0.02)
    return clean * _fidelity(_blur(E), _blur(T), M, 0.05)


def seam_band(mask: Tensor, width: int = 3) -> Tensor:
    """The inner border of the mask next to kept pixels (image borders do not count as seams)."""
    band = mask - erode(mask, width)
    return band if float(band.sum()) > 0 else mask


class RuleJudge(Judge):
    """Ground-truth judge for `core.synthetic.world` samples (pass the EditSample as `JudgeRequest.truth`)."""

    differentiable = True

    def __init__(self, *, score_spread: float = 0.8, yesno_temperature: float = 0.1,
                 pairwise_temperature: float = 0.05):
        self.score_spread = score_spread
        self.yesno_temperature = yesno_temperature
        self.pairwise_temperature = pairwise_temperature

    # -- quality of one image on one dimension -----------------------------------------------
    def quality(self, task: str, dimension: str, edited: Tensor, sample: EditSample,
                memo: dict | None = None) -> Tensor:
        """q in [0, 1] of one image on one dimension. For edits that must create content (fill, text,
        extend with a described object) every other dimension is gated by the content term:
        q = q_dimension * sqrt(q_content). A judge asked about the consistency of a fill that ignored
        the prompt does not call it perfect; without the gate, "leave the region empty" scores
        high on consistency and aesthetics, and RL learns exactly that (found by the ground-truth
        metrics of the first default run: fill colour accuracy fell from 1.0 to 0.04).

        `memo`, one dict shared by the calls of one scoring pass, keeps each image's content term:
        every dimension of the image needs it, and the identity terms cost more than all the others
        together. An image is known by its memory (the scorer asks about images[i], a new view each
        time), so its tensors must stay alive and unchanged while the memo is in use."""
        content_dim = self.CONTENT.get(task)
        key = None if memo is None else (task, id(sample), edited.device, edited.data_ptr(), edited.dtype,
                                         tuple(edited.shape), edited.stride(), edited.requires_grad)
        memo = {} if memo is None else memo
        edited = _wide(edited)
        if content_dim is None or not self._creates_content(task, sample):
            return self._raw(task, dimension, edited, sample)
        if key not in memo:
            memo[key] = self._raw(task, content_dim, edited, sample)
        if dimension == content_dim:
            return memo[key]
        # the floor keeps the gradient finite where an identity term underflows to exactly 0 (sqrt'(0) = inf)
        return self._raw(task, dimension, edited, sample) * memo[key].clamp_min(1e-8).sqrt()

    #: the dimension that says whether the requested content is there, per task
    CONTENT: ClassVar[dict[str, str]] = {"fill": "text_alignment", "text": "text_accuracy", "extend": "text_alignment",
                                         **{t: "instruction_following" for t in INSTRUCTION_TASKS}}

    @staticmethod
    def _creates_content(task: str, sample: EditSample) -> bool:
        if task != "extend":
            return True
        d = sample.truth.get("described")
        return sample.truth.get("has_prompt", True) and d is not None and float((d["mask"] * sample.mask).sum()) > 0

    def _raw(self, task: str, dimension: str, edited: Tensor, sample: EditSample) -> Tensor:
        if task in INSTRUCTION_TASKS:
            return self._raw_instruction(dimension, edited, sample)
        T, M, truth = sample.target.to(edited), sample.mask.to(edited), sample.truth
        E = edited
        if dimension == "removal_quality":
            return _fidelity(E, T, dilate(truth["object"]["mask"].to(E), 1), 0.01)
        if dimension == "text_alignment":
            if task == "fill":
                return fill_alignment_term(E, sample)
            if task == "extend" and self._creates_content(task, sample):
                return extend_alignment_term(E, sample)
            return _fidelity(E, T, M, 0.02)
        if dimension == "text_accuracy":
            return text_accuracy_term(E, sample)
        if dimension == "consistency":
            return _fidelity(E, T, seam_band(M), 0.008)
        if dimension == "structure":
            (ey, ex), (ty, tx) = _grads(E), _grads(T)
            err = _mse(ey, ty, M[:, 1:, :] * M[:, :-1, :]) + _mse(ex, tx, M[:, :, 1:] * M[:, :, :-1])
            return torch.exp(-err / 0.02)
        if dimension == "aesthetics":
            return _aesthetics(E, T, M)
        raise JudgeError(f"the rule judge has no rule for dimension {dimension!r}")

    @staticmethod
    def _raw_instruction(dimension: str, edited: Tensor, sample: EditSample) -> Tensor:
        T, keep = sample.target.to(edited), sample.truth["keep"].to(edited)
        if dimension == "instruction_following":
            return instruction_following_term(edited, sample)
        if dimension == "preservation":
            return _fidelity(edited, T, keep, 0.008)
        if dimension == "aesthetics":
            return _aesthetics(edited, T, 1 - keep)
        raise JudgeError(f"the rule judge has no rule for dimension {dimension!r} of task {sample.task!r}")

    # -- the judge interface ------------------------------------------------------------------
    def score(self, requests: list[JudgeRequest], mode: Mode = "score") -> Tensor:
        check_mode(mode)
        return check_scores(self._raw_scores(requests, mode), len(requests), "RuleJudge")

    def _raw_scores(self, requests: list[JudgeRequest], mode: str) -> Tensor:
        """The scores before the final guard (`check_scores`), which every backend ends with."""
        out, memo = [], {}
        for req in requests:
            if not isinstance(req.truth, EditSample):
                raise JudgeError(
                    "the rule judge needs the world's ground truth: pass the core.synthetic.world.EditSample as "
                    "JudgeRequest.truth (it only judges synthetic-world edits)"
                )
            q = self.quality(req.task, req.dimension, req.edited, req.truth, memo)
            if mode == "score":
                levels = torch.arange(6, dtype=q.dtype, device=q.device)
                p = torch.softmax(-((levels - 5 * q) ** 2) / (2 * self.score_spread**2), 0)
                out.append((p * levels).sum() / 5)
            elif mode == "yesno":
                out.append(torch.sigmoid((q - 0.5) / self.yesno_temperature))
            else:
                if req.other is None:
                    raise JudgeError("pairwise mode needs JudgeRequest.other (the image to compare against)")
                q_other = self.quality(req.task, req.dimension, req.other, req.truth, memo)
                out.append(torch.sigmoid((q - q_other) / self.pairwise_temperature))
        return torch.stack(out) if out else torch.zeros(0)
