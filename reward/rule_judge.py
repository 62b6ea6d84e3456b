"""A rule judge for the synthetic world: it knows the ground truth, so it measures real quality.

Each (task, dimension) gets a quality q in [0, 1] computed in torch from the edited image and the
world's truth (differentiable in the edited image, so reward feedback learning can use it):

- fidelity terms are exp(-MSE / s) over a region that matters for the dimension:
  removal_quality  the removed object's footprint vs the clean background;
  text_alignment   fill: the requested object's footprint; extend: the described object's visible
                   part in the new area (or the whole new area when no object is described);
  text_accuracy    the text box, with the glyph ink weighted 4x;
  consistency      the seam: a 3-pixel band inside the mask along its border with the kept region;
- structure        edges: image gradients inside the mask vs the target's;
- aesthetics       cleanliness: high-frequency energy (Laplacian) in the mask beyond the target's,
                   and colours pushed out of range.

The three judge modes are read off q as a VLM's would be: "score" is the expectation of a
distribution over the digits 0..5 peaked at 5q, "yesno" a logistic of q - 1/2, and "pairwise" a
Bradley-Terry probability on the difference of the two images' q.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from core.masks import dilate, erode
from core.world import EditSample

from .judge import Judge, JudgeError, JudgeRequest, Mode, check_mode, check_scores

_LAPLACE = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])


def _mse(a: Tensor, b: Tensor, w: Tensor) -> Tensor:
    w = w.expand_as(a)
    return ((a - b) ** 2 * w).sum() / w.sum().clamp_min(1e-6)


def _fidelity(a: Tensor, b: Tensor, w: Tensor, scale: float) -> Tensor:
    return torch.exp(-_mse(a, b, w) / scale)


def _grads(x: Tensor) -> tuple[Tensor, Tensor]:
    return x[:, 1:, :] - x[:, :-1, :], x[:, :, 1:] - x[:, :, :-1]


def _laplacian(x: Tensor) -> Tensor:
    k = _LAPLACE.to(x)[None, None].expand(x.shape[0], 1, 3, 3)
    return F.conv2d(x[None], k, padding=1, groups=x.shape[0])[0]


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
        T, M, truth = sample.target.to(edited), sample.mask.to(edited), sample.truth
        E = edited
        if dimension == "removal_quality":
            return _fidelity(E, T, dilate(truth["object"]["mask"].to(E), 1), 0.01)
        if dimension == "text_alignment":
            if task == "fill":
                region = dilate(truth["object"]["mask"].to(E), 1)
            else:  # extend
                d = truth.get("described")
                region = M if d is None or float((d["mask"].to(E) * M).sum()) == 0 else d["mask"].to(E) * M
            return _fidelity(E, T, region, 0.02)
        if dimension == "text_accuracy":
            return _fidelity(E, T, M + 3 * truth["ink"].to(E), 0.02)
        if dimension == "consistency":
            return _fidelity(E, T, seam_band(M), 0.008)
        if dimension == "structure":
            (ey, ex), (ty, tx) = _grads(E), _grads(T)
            err = _mse(ey, ty, M[:, 1:, :] * M[:, :-1, :]) + _mse(ex, tx, M[:, :, 1:] * M[:, :, :-1])
            return torch.exp(-err / 0.02)
        if dimension == "aesthetics":
            noise = F.relu(_laplacian(E) ** 2 - _laplacian(T) ** 2)
            out_of_range = F.relu(E - 1) + F.relu(-E)
            return torch.exp(-(_mse(noise, torch.zeros_like(noise), M) + 10 * _mse(out_of_range, 0 * E, M)) / 0.02)
        raise JudgeError(f"the rule judge has no rule for dimension {dimension!r}")

    # -- the judge interface ------------------------------------------------------------------
    def score(self, requests: list[JudgeRequest], mode: Mode = "score") -> Tensor:
        check_mode(mode)
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
        scores = torch.stack(out) if out else torch.zeros(0)
        return check_scores(scores, len(requests), "RuleJudge")
