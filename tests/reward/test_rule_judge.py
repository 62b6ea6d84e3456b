import pytest
import torch

from core.synthetic.world import COLOURS, SyntheticWorld
from core.tasks import TASKS, dimensions_for
from reward.judge import JudgeError, JudgeRequest
from reward.judges.rule_judge import RuleJudge


@pytest.fixture(scope="module")
def samples():
    w = SyntheticWorld(seed=3)
    return {t: w.held_out(t, 6) for t in TASKS}


def _requests(task, samples, edit, other=None):
    return [JudgeRequest(task, d, s.source, edit(s), s.mask, s.prompt, truth=s,
                         other=None if other is None else other(s))
            for s in samples for d in dimensions_for(task)]


@pytest.mark.parametrize("task", TASKS)
def test_truth_beats_noise_beats_no_edit(task, samples):
    judge = RuleJudge()
    g = torch.Generator().manual_seed(0)
    perfect = judge.score(_requests(task, samples[task], lambda s: s.target))
    noisy = judge.score(_requests(task, samples[task],
                                  lambda s: (s.target + 0.05 * torch.randn(s.target.shape, generator=g)).clamp(0, 1)))
    untouched = judge.score(_requests(task, samples[task], lambda s: s.source * (1 - s.mask) + 0.5 * s.mask))
    assert perfect.min() > 0.8 and perfect.mean() > 0.9
    assert perfect.mean() > noisy.mean() + 0.1 > untouched.mean() + 0.2


def test_modes_in_range_and_pairwise_is_antisymmetric(samples):
    judge = RuleJudge()
    s = samples["fill"]
    noisy = lambda x: (x.target + 0.1 * torch.randn(x.target.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)  # noqa: E731
    for mode in ("score", "yesno"):
        v = judge.score(_requests("fill", s, lambda x: x.target), mode)
        assert ((0 <= v) & (v <= 1)).all()
    ab = judge.score(_requests("fill", s, lambda x: x.target, other=noisy), "pairwise")
    ba = judge.score(_requests("fill", s, noisy, other=lambda x: x.target), "pairwise")
    assert torch.allclose(ab + ba, torch.ones_like(ab), atol=1e-6) and ab.min() > 0.5


@pytest.mark.parametrize("task", ["fill", "text", "extend"])
def test_one_scoring_pass_reuses_each_images_content_term_without_mixing_images(task, samples):
    """score() keeps each image's content term for all its dimensions (the scorer asks about
    images[i], a new view per request): the scores must be those of one request at a time."""
    judge = RuleJudge()
    s = samples[task][:3]
    images = torch.stack([x.target for x in s] + [x.source for x in s])
    reqs = [JudgeRequest(task, d, x.source, images[i + k * len(s)], x.mask, x.prompt, truth=x)
            for k in (0, 1) for i, x in enumerate(s) for d in dimensions_for(task)]
    together = judge.score(reqs)
    one_at_a_time = torch.cat([judge.score([r]) for r in reqs])
    torch.testing.assert_close(together, one_at_a_time, rtol=0, atol=0)
    half = len(reqs) // 2
    assert together[:half].mean() > together[half:].mean() + 0.3  # the truth, then the unedited source


def test_differentiable_and_matches_finite_differences(samples):
    judge = RuleJudge()
    s = samples["removal"][0]
    base = (s.target + 0.05 * torch.randn(s.target.shape, generator=torch.Generator().manual_seed(1))).double()
    edited = base.clone().requires_grad_(True)
    reqs = [JudgeRequest("removal", d, s.source, edited, s.mask, truth=s) for d in dimensions_for("removal")]
    total = judge.score(reqs).sum()
    total.backward()
    grad = edited.grad
    assert grad.abs().sum() > 0
    # directional derivative along a random direction inside the mask
    direction = torch.randn(base.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * s.mask
    h = 1e-5

    def f(x):
        with torch.no_grad():
            return judge.score([JudgeRequest("removal", d, s.source, x, s.mask, truth=s)
                                for d in dimensions_for("removal")]).double().sum()

    numeric = (f(base + h * direction) - f(base - h * direction)) / (2 * h)
    assert torch.allclose((grad * direction).sum(), numeric, rtol=1e-3, atol=1e-6)


def test_needs_ground_truth_and_other():
    s = SyntheticWorld().sample("fill", 0)
    judge = RuleJudge()
    with pytest.raises(JudgeError, match="ground truth"):
        judge.score([JudgeRequest("fill", "structure", s.source, s.target, s.mask)])
    with pytest.raises(JudgeError, match="other"):
        judge.score([JudgeRequest("fill", "structure", s.source, s.target, s.mask, truth=s)], "pairwise")
    with pytest.raises(ValueError, match="unknown judge mode"):
        judge.score([], "stars")


def test_leaving_the_region_empty_is_not_rewarded():
    """Doing nothing must not beat a rough attempt at the requested content (the reward hack RL
    found with an ungated judge): every dimension of fill and text needs the content."""
    judge = RuleJudge()
    for task in ("fill", "text"):
        for s in SyntheticWorld(seed=5).held_out(task, 4):
            empty = s.source * (1 - s.mask) + s.truth["background"] * s.mask
            # the right content, two pixels off: a rough but honest attempt
            if task == "fill":
                ink = torch.roll(s.truth["object"]["mask"], (2, 2), (1, 2)) * s.mask
                colour = torch.tensor(COLOURS[s.truth["object"]["colour"]])[:, None, None]
            else:
                ink = torch.roll(s.truth["ink"], (1, 1), (1, 2)) * s.mask
                colour = torch.full((3, 1, 1), s.truth["ink_value"])
            rough = empty * (1 - ink) + colour * ink
            for d in dimensions_for(task):
                q_empty = judge.quality(task, d, empty, s)
                q_rough = judge.quality(task, d, rough, s)
                assert q_rough > q_empty, (task, d, float(q_rough), float(q_empty))
