"""Bad input to the public kernel functions: a ValueError naming the problem, raised before any
kernel or reference runs, whatever the backend."""
import pytest
import torch

import kernels

NAN = float("nan")


@pytest.fixture(autouse=True)
def nothing_may_run(monkeypatch):
    """Every implementation behind the public functions fails loudly if reached."""
    def launched(*args, **kwargs):
        raise AssertionError("an implementation ran before the inputs were checked")

    for name in ("nft_loss_triton", "nft_loss_reference", "group_rewards_triton", "group_rewards_reference",
                 "masked_blend_step_triton", "masked_blend_step_reference", "grpo_loss_triton",
                 "grpo_loss_reference", "sde_step_logprob_triton", "sde_step_logprob_reference"):
        monkeypatch.setattr(kernels, name, launched)


def nft_args(B=3, n=8, **change):
    args = dict(v_theta=torch.randn(B, n), v_old=torch.randn(B, n), v_target=torch.randn(B, n),
                r=torch.rand(B), t=torch.rand(B), beta=1.0, adaptive=True, v_ref=None, kl_coef=0.0, weight=None,
                reduction="mean", backend="auto")
    args.update(change)
    return args


def call_nft(args):
    a = dict(args)
    return kernels.nft_loss(a.pop("v_theta"), a.pop("v_old"), a.pop("v_target"), a.pop("r"), a.pop("t"), **a)


NFT_BAD = [
    (dict(v_theta=[[1.0]]), "v_theta must be a torch.Tensor"),
    (dict(v_theta=torch.ones(3, 8, dtype=torch.int64)), "v_theta must be a floating tensor"),
    (dict(v_theta=torch.ones(0, 8), v_old=torch.ones(0, 8), v_target=torch.ones(0, 8)), "non-empty"),
    (dict(v_old=torch.randn(3, 9)), r"v_old has shape \(3, 9\) but v_theta has \(3, 8\)"),
    (dict(v_target=torch.randn(3, 8, dtype=torch.float64)),
     r"v_target is torch.float64 but v_theta is torch.float32; convert"),
    (dict(v_old=torch.randn(3, 8, device="meta")), "v_old is on meta but the main input is on "),
    (dict(r=torch.rand(4)), r"r must have shape \[B\] = \[3\]"),
    (dict(r=torch.tensor([0.5, -0.2, 1.3])), r"r must be finite and within \[0, 1\].*not the advantage"),
    (dict(r=torch.tensor([0.5, NAN, 0.1])), "r must be finite.*non-finite"),
    (dict(r=torch.tensor([0, 1, 1])), "r must be a floating tensor"),
    (dict(t=None), "adaptive=True needs t"),
    (dict(t=torch.tensor([0.5, 1.5, 0.1])), r"t must be finite and within \[0, 1\]"),
    (dict(t=torch.tensor([[0.5, 0.5, 0.1]])), r"t must have shape \[B\]"),
    (dict(beta=0.0), "beta must be > 0"),
    (dict(beta=-1.0), "beta must be > 0"),
    (dict(beta=NAN), "beta must be a finite number"),
    (dict(beta=True), "beta must be a finite number"),
    (dict(kl_coef=0.1), "kl_coef=0.1 needs v_ref"),
    (dict(kl_coef=-0.1, v_ref=torch.randn(3, 8)), "kl_coef must be >= 0"),
    (dict(v_ref=torch.randn(3, 4)), "v_ref has shape"),
    (dict(weight=torch.tensor([1.0, -1.0, 0.0])), r"weight must be finite and within \[0,"),
    (dict(weight=torch.ones(3), reduction="none"), "weight only applies to reduction='mean'"),
    (dict(reduction="sum"), r"unknown reduction 'sum'; expected one of \['mean', 'none'\]"),
    (dict(adaptive="yes"), "adaptive must be True or False"),
    (dict(backend="cuda"), r"unknown backend 'cuda'; expected one of \['auto', 'triton', 'torch'\]"),
]


@pytest.mark.parametrize("change, message", NFT_BAD, ids=[m[:40] for _, m in NFT_BAD])
def test_nft_loss_bad_input(change, message):
    with pytest.raises(ValueError, match=message) as err:
        call_nft(nft_args(**change))
    assert str(err.value).startswith("nft_loss: ")


def gr_args(**change):
    args = dict(scores=torch.rand(4, 6), dim_weights=None, std="group", clip=1.0, eps=1e-4, tau_mean=None,
                tau_std=None, rule="paper", backend="auto")
    args.update(change)
    return args


GR_BAD = [
    (dict(scores=torch.rand(5)), r"scores must be a non-empty \[G, S\] or \[G, S, D\]"),
    (dict(scores=torch.rand(2, 3, 4, 5)), r"scores must be a non-empty"),
    (dict(scores=torch.zeros(0, 4)), r"scores must be a non-empty"),
    (dict(scores=torch.full((2, 3), 3.0)), r"scores must be finite and within \[0, 1\]"),
    (dict(scores=torch.tensor([[0.5, NAN]])), "scores must be finite.*non-finite"),
    (dict(scores=torch.ones(2, 3, dtype=torch.int32)), "scores must be a floating tensor"),
    (dict(dim_weights=torch.ones(1)), r"dim_weights needs \[G, S, D\] scores"),
    (dict(scores=torch.rand(2, 3, 4), dim_weights=torch.ones(3)), r"dim_weights must have shape \[D\] = \[4\]"),
    (dict(scores=torch.rand(2, 3, 2), dim_weights=torch.tensor([1.0, -1.0])), "dim_weights must be finite and within"),
    (dict(scores=torch.rand(2, 3, 2), dim_weights=torch.zeros(2)), "the sum of dim_weights"),
    (dict(std="batch"), r"unknown std 'batch'; expected one of \['group', 'global'\]"),
    (dict(rule="loose"), "unknown rule 'loose'"),
    (dict(clip=0.0), "clip must be > 0"),
    (dict(eps=0.0), "eps must be > 0"),
    (dict(eps=float("inf")), "eps must be a finite number"),
    (dict(tau_mean=0.9), "needs both tau_mean and tau_std"),
    (dict(tau_mean=0.9, tau_std=NAN), "tau_std must be a finite number"),
    (dict(backend="triton!"), "unknown backend"),
    (dict(scores=torch.rand(2, 3, requires_grad=True)), r"gradients with respect to scores are not supported"),
]


@pytest.mark.parametrize("change, message", GR_BAD, ids=[m[:40] for _, m in GR_BAD])
def test_group_rewards_bad_input(change, message):
    args = gr_args(**change)
    with pytest.raises(ValueError, match=message) as err:
        kernels.group_rewards(args.pop("scores"), **args)
    assert str(err.value).startswith("group_rewards: ")


def blend_args(**change):
    x = torch.randn(2, 5, 4)
    args = dict(x_t=x, v=torch.randn_like(x), mask=torch.ones(2, 5, 1), x0_known=torch.randn_like(x),
                noise=torch.randn_like(x), t=0.8, t_next=0.6, backend="auto")
    args.update(change)
    return args


BLEND_BAD = [
    (dict(x_t=torch.tensor(1.0)), r"x_t must be a non-empty \[B, ...\] tensor"),
    (dict(v=torch.randn(2, 5, 3)), "v has shape"),
    (dict(x0_known=torch.randn(2, 5, 4, dtype=torch.float64)), "x0_known is torch.float64 but x_t is torch.float32"),
    (dict(noise=None), "noise must be a torch.Tensor"),
    (dict(mask=torch.ones(2, 6, 1)), r"mask \(2, 6, 1\) does not broadcast to x_t \(2, 5, 4\)"),
    (dict(mask=torch.ones(1, 2, 5, 4)), "does not broadcast"),
    (dict(mask=torch.ones(2, 5, 1, dtype=torch.int64)), r"mask must be a floating \(or bool\) tensor"),
    (dict(mask=torch.ones(2, 5, 1, device="meta")), "mask is on meta"),
    (dict(t=NAN), "t must be a finite number"),
    (dict(t_next=1.5), r"t_next must lie in \[0, 1\]"),
    (dict(t=torch.tensor([0.5, NAN])), r"t must be finite and within \[0, 1\].*non-finite"),
    (dict(t_next=torch.tensor([0.5, 2.0])), r"t_next must be finite and within \[0, 1\]"),
    (dict(t=torch.rand(3)), r"t must be a number, a 0-d tensor or a \[B\] = \[2\] tensor"),
    (dict(t=torch.rand(2, 1)), r"t must be a number"),
    (dict(t="0.5"), "t must be a finite number"),
    (dict(mask=torch.ones(2, 5, 1, requires_grad=True)), "gradients with respect to mask are not supported"),
    (dict(t_next=torch.rand(2, requires_grad=True)), "gradients with respect to t_next are not supported"),
    (dict(backend=None), "unknown backend None"),
]


@pytest.mark.parametrize("change, message", BLEND_BAD, ids=[m[:40] for _, m in BLEND_BAD])
def test_masked_blend_step_bad_input(change, message):
    args = blend_args(**change)
    with pytest.raises(ValueError, match=message) as err:
        kernels.masked_blend_step(args.pop("x_t"), args.pop("v"), args.pop("mask"), args.pop("x0_known"),
                                  args.pop("noise"), args.pop("t"), args.pop("t_next"), **args)
    assert str(err.value).startswith("masked_blend_step: ")


def grpo_args(B=3, n=8, **change):
    args = dict(v_theta=torch.randn(B, n), x_t=torch.randn(B, n), x_next=torch.randn(B, n), advantage=torch.randn(B),
                logp_old=None, mean_x=torch.ones(B), mean_v=-0.1 * torch.ones(B), std=0.3 * torch.ones(B),
                mask=None, clip_range=0.2, v_ref=None, kl_coef=0.0, weight=None, reduction="mean",
                return_logp=False, backend="auto")
    args.update(change)
    return args


GRPO_BAD = [
    (dict(v_theta=[[1.0]]), "v_theta must be a torch.Tensor"),
    (dict(v_theta=torch.ones(3, 8, dtype=torch.int64)), "v_theta must be a floating tensor"),
    (dict(v_theta=torch.ones(0, 8), x_t=torch.ones(0, 8), x_next=torch.ones(0, 8)), "non-empty"),
    (dict(x_t=torch.randn(3, 9)), r"x_t has shape \(3, 9\) but v_theta has \(3, 8\)"),
    (dict(x_next=torch.randn(3, 8, dtype=torch.float64)), "x_next is torch.float64 but v_theta is torch.float32"),
    (dict(x_next=torch.randn(3, 8, device="meta")), "x_next is on meta"),
    (dict(advantage=torch.randn(4)), r"advantage must have shape \[B\] = \[3\]"),
    (dict(advantage=torch.tensor([0.5, NAN, 0.1])), "advantage must be finite"),
    (dict(logp_old=torch.tensor([0.5, float("inf"), 0.1])), "logp_old must be finite"),
    (dict(logp_old=torch.zeros(2)), r"logp_old must have shape \[B\]"),
    (dict(std=torch.tensor([0.3, 0.0, 0.3])), "std must be finite and within .*an Euler or final step"),
    (dict(std=torch.tensor([0.3, -0.1, 0.3])), "std must be finite and within"),
    (dict(mean_v=torch.tensor([0.3, NAN, 0.3])), "mean_v must be finite"),
    (dict(mean_x=torch.ones(3, 1)), r"mean_x must have shape \[B\]"),
    (dict(mask=torch.ones(3, 9)), r"mask \(3, 9\) does not broadcast to v \(3, 8\)"),
    (dict(mask=torch.ones(3, 8, dtype=torch.int64)), r"mask must be a floating \(or bool\) tensor"),
    (dict(clip_range=1.0), "clip_range must be < 1"),
    (dict(clip_range=-0.1), "clip_range must be >= 0"),
    (dict(clip_range=NAN), "clip_range must be a finite number"),
    (dict(kl_coef=0.1), "kl_coef=0.1 needs v_ref"),
    (dict(kl_coef=-0.1, v_ref=torch.randn(3, 8)), "kl_coef must be >= 0"),
    (dict(v_ref=torch.randn(3, 4)), "v_ref has shape"),
    (dict(weight=torch.tensor([1.0, -1.0, 0.0])), r"weight must be finite and within \[0,"),
    (dict(weight=torch.ones(3), reduction="none"), "weight only applies to reduction='mean'"),
    (dict(reduction="sum"), r"unknown reduction 'sum'"),
    (dict(return_logp=1), "return_logp must be True or False"),
    (dict(backend="cuda"), "unknown backend 'cuda'"),
]


@pytest.mark.parametrize("change, message", GRPO_BAD, ids=[m[:40] for _, m in GRPO_BAD])
def test_grpo_loss_bad_input(change, message):
    a = grpo_args(**change)
    with pytest.raises(ValueError, match=message) as err:
        kernels.grpo_loss(a.pop("v_theta"), a.pop("x_t"), a.pop("x_next"), a.pop("advantage"), a.pop("logp_old"), **a)
    assert str(err.value).startswith("grpo_loss: ")


@pytest.mark.parametrize("change, message", [
    (dict(std=torch.zeros(3)), "std must be finite and within"),
    (dict(x_t=torch.randn(3, 7)), "x_t has shape"),
    (dict(v=torch.ones(3)), "v must be a non-empty|x_t has shape"),
])
def test_sde_step_logprob_bad_input(change, message):
    a = dict(v=torch.randn(3, 8), x_t=torch.randn(3, 8), x_next=torch.randn(3, 8), mean_x=torch.ones(3),
             mean_v=-torch.ones(3), std=torch.ones(3), mask=None)
    a.update(change)
    with pytest.raises(ValueError, match=message) as err:
        kernels.sde_step_logprob(a.pop("v"), a.pop("x_t"), a.pop("x_next"), **a)
    assert str(err.value).startswith("sde_step_logprob: ")
