"""A rule judge for the synthetic world: it knows the ground truth, so it measures real quality.

Each (task, dimension) gets a quality q in [0, 1] computed in torch from the edited image and the
world's truth (differentiable in the edited image, so reward feedback learning can use it):

- content terms are soft overlaps (soft IoU) between "pixels of the requested colour" and where
  the ground truth puts them, so a blob of the right colour in roughly the right place earns
  partial credit and leaving the region empty earns none (an exact-match fidelity would score a
  rough attempt as low as doing nothing, and RL then learns to do nothing — a reward hack):
  text_alignment   fill: the requested colour vs the requested object's mask; extend: the
                   described object's colour vs its visible part in the new area (with no
                   described object: fidelity to the true continuation, below);
  text_accuracy    ink-coloured pixels in the box vs the true glyph strokes;
- fidelity terms are exp(-MSE / s) over a region that matters for the dimension:
  removal_quality  the removed object's footprint vs the clean background;
  consistency      the seam: a 3-pixel band inside the mask along its border with the kept region;
- structure        edges: image gradients inside the mask vs the target's;
- aesthetics       cleanliness (high-frequency energy in the mask beyond the target's, colours out
                   of range) times realism: the blurred edit against the blurred ground truth, so
                   a clean but empty region is not "beautiful" when something was asked for.

The three judge modes are read off q as a VLM's would be: "score" is the expectation of a
distribution over the digits 0..5 peaked at 5q, "yesno" a logistic of q - 1/2, and "pairwise" a
Bradley-Terry probability on the difference of the two images' q.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from core.masks import dilate, erode
from core.world import COLOURS, EditSample
from reward.judge import (
    Judge,
    JudgeError,
    JudgeRequest,
    Mode,
    check_mode,
    check_scores,
)

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


def colour_map(image: Tensor, rgb: Tensor, sigma: float = 0.15) -> Tensor:
    """[1,H,W] in [0,1]: how close each pixel is to the colour `rgb` (named colours lie >= 0.3 apart)."""
    return torch.exp(-((image - rgb[:, None, None]) ** 2).sum(0, keepdim=True) / (2 * sigma**2))


def soft_iou(p: Tensor, m: Tensor) -> Tensor:
    inter = (p * m).sum()
    return inter / (p + m - p * m).sum().clamp_min(1e-6)


def _wide(x: Tensor) -> Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def seam_band(mask: Tensor, width: int = 3) -> Tensor:
    """The inner border of the mask next to kept pixels (image borders do not count as seams)."""
    band = mask - erode(mask, width)
    return band if float(band.sum()) > 0 else mask


class RuleJudge(Judge):
    """Ground-truth judge for `core.world` samples (pass the EditSample as `JudgeRequest.truth`)."""

    differentiable = True

    def __init__(self, *, score_spread: float = 0.8, yesno_temperature: float = 0.1,
                 pairwise_temperature: float = 0.05):
        self.score_spread = score_spread
        self.yesno_temperature = yesno_temperature
        self.pairwise_temperature = pairwise_temperature

    # -- quality of one image on one dimension -----------------------------------------------
    def quality(self, task: str, dimension: str, edited: Tensor, sample: EditSample) -> Tensor:
        """q in [0, 1] of one image on one dimension. For edits that must create content (fill, text,
        extend with a described object) every other dimension is gated by the content term:
        q = q_dimension * sqrt(q_content). A judge asked about the consistency of a fill that ignored
        the prompt does not call it perfect; without the gate, "leave the region empty" scores
        high on consistency and aesthetics, and RL learns exactly that (found by the ground-truth
        metrics of the first default run: fill colour accuracy fell from 1.0 to 0.04)."""
        content_dim = self.CONTENT.get(task)
        q = self._raw(task, dimension, edited, sample)
        if content_dim is None or dimension == content_dim or not self._creates_content(task, sample):
            return q
        return q * self._raw(task, content_dim, edited, sample).clamp_min(0).sqrt()

    #: the dimension that says whether the requested content is there, per task
    CONTENT = {"fill": "text_alignment", "text": "text_accuracy", "extend": "text_alignment"}

    @staticmethod
    def _creates_content(task: str, sample: EditSample) -> bool:
        if task != "extend":
            return True
        d = sample.truth.get("described")
        return sample.truth.get("has_prompt", True) and d is not None and float((d["mask"] * sample.mask).sum()) > 0

    def _raw(self, task: str, dimension: str, edited: Tensor, sample: EditSample) -> Tensor:
        T, M, truth = sample.target.to(edited), sample.mask.to(edited), sample.truth
        E = edited
        if dimension == "removal_quality":
            return _fidelity(E, T, dilate(truth["object"]["mask"].to(E), 1), 0.01)
        if dimension == "text_alignment":
            obj = truth["object"] if task == "fill" else truth.get("described")
            if obj is None or float((obj["mask"].to(E) * M).sum()) == 0:  # extend, nothing described
                return _fidelity(E, T, M, 0.02)
            colour = torch.tensor(COLOURS[obj["colour"]], dtype=E.dtype, device=E.device)
            return soft_iou(colour_map(E, colour) * M, obj["mask"].to(E) * M)
        if dimension == "text_accuracy":
            ink = torch.full((3,), truth["ink_value"], dtype=E.dtype, device=E.device)
            return soft_iou(colour_map(E, ink) * M, truth["ink"].to(E))
        if dimension == "consistency":
            return _fidelity(E, T, seam_band(M), 0.008)
        if dimension == "structure":
            (ey, ex), (ty, tx) = _grads(E), _grads(T)
            err = _mse(ey, ty, M[:, 1:, :] * M[:, :-1, :]) + _mse(ex, tx, M[:, :, 1:] * M[:, :, :-1])
            return torch.exp(-err / 0.02)
        if dimension == "aesthetics":
            noise = F.relu(_laplacian(E) ** 2 - _laplacian(T) ** 2)
            out_of_range = F.relu(E - 1) + F.relu(-E)
            clean = torch.exp(-(_mse(noise, torch.zeros_like(noise), M) + 10 * _mse(out_of_range, 0 * E, M)) / 0.02)
            return clean * _fidelity(_blur(E), _blur(T), M, 0.05)
        raise JudgeError(f"the rule judge has no rule for dimension {dimension!r}")

    # -- the judge interface ------------------------------------------------------------------
    def score(self, requests: list[JudgeRequest], mode: Mode = "score") -> Tensor:
        check_mode(mode)
        return check_scores(self._raw_scores(requests, mode), len(requests), "RuleJudge")

    def _raw_scores(self, requests: list[JudgeRequest], mode: str) -> Tensor:
        """The scores before the final guard (`check_scores`), which every backend ends with."""
        out = []
        for req in requests:
            sample = req.truth
            if not isinstance(sample, EditSample):
                raise JudgeError(
                    "the rule judge needs the world's ground truth: pass the core.world.EditSample as "
                    "JudgeRequest.truth (it only judges synthetic-world edits)"
                )
            q = self.quality(req.task, req.dimension, _wide(req.edited), sample)
            if mode == "score":
                levels = torch.arange(6, dtype=q.dtype, device=q.device)
                p = torch.softmax(-((levels - 5 * q) ** 2) / (2 * self.score_spread**2), 0)
                out.append((p * levels).sum() / 5)
            elif mode == "yesno":
                out.append(torch.sigmoid((q - 0.5) / self.yesno_temperature))
            else:
                if req.other is None:
                    raise JudgeError("pairwise mode needs JudgeRequest.other (the image to compare against)")
                q_other = self.quality(req.task, req.dimension, _wide(req.other), sample)
                out.append(torch.sigmoid((q - q_other) / self.pairwise_temperature))
        return torch.stack(out) if out else torch.zeros(0)
