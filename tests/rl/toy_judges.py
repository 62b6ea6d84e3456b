"""Judges whose right answer is known, for behaviour tests of the trainers."""
import torch

from reward.judge import Judge, check_scores


def redness(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of R - (G + B) / 2 inside the mask: how red the edited region is."""
    m = mask[0].to(image.dtype)
    return ((image[0] - image[1:].mean(0)) * m).sum() / m.sum().clamp(min=1)


class RedJudge(Judge):
    """Pays for red inside the mask: absolute 1/2 + tanh(4 redness) / 2; pairwise
    sigmoid(8 (redness - the other's)). Differentiable, so it drives ReFL too."""

    differentiable = True

    def score(self, requests, mode="score"):
        out = []
        for q in requests:
            red = redness(q.edited, q.mask)
            if mode == "pairwise":
                out.append(torch.sigmoid(8 * (red - redness(q.other, q.mask))))
            else:
                out.append(0.5 + 0.5 * torch.tanh(4 * red))
        return check_scores(torch.stack(out), len(requests), "RedJudge")


class ConstantJudge(Judge):
    """The same score for every request (every group's spread is zero)."""

    differentiable = True

    def __init__(self, value: float):
        self.value = value

    def score(self, requests, mode="score"):
        return torch.full((len(requests),), self.value)
