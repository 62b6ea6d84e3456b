"""Which implementation a public call reaches: backend="auto" / "triton" / "torch"."""
import pytest
import torch

import kernels
from kernels import backend


@pytest.fixture
def spies(monkeypatch):
    """Replace each implementation by a recorder that returns a marker."""
    calls = []
    for name in ("nft_loss_triton", "nft_loss_reference", "group_rewards_triton", "group_rewards_reference",
                 "masked_blend_step_triton", "masked_blend_step_reference", "grpo_loss_triton",
                 "grpo_loss_reference", "sde_step_logprob_triton", "sde_step_logprob_reference"):
        monkeypatch.setattr(kernels, name, lambda *a, _name=name, **k: calls.append(_name) or _name)
    return calls


def run_all(b: str) -> list[str]:
    x = torch.randn(2, 4, device="cpu")
    return [
        kernels.nft_loss(x, x, x, torch.rand(2, device="cpu"), torch.rand(2, device="cpu"), beta=1.0, backend=b),
        kernels.group_rewards(torch.rand(2, 3, device="cpu"), backend=b),
        kernels.masked_blend_step(x, x, torch.ones(2, 1, device="cpu"), x, x, 0.5, 0.4, backend=b),
        kernels.grpo_loss(x, x, x, torch.randn(2, device="cpu"), mean_x=torch.ones(2, device="cpu"),
                          mean_v=-torch.ones(2, device="cpu"), std=torch.ones(2, device="cpu"), clip_range=0.2,
                          backend=b),
        kernels.sde_step_logprob(x, x, x, mean_x=torch.ones(2, device="cpu"), mean_v=-torch.ones(2, device="cpu"),
                                 std=torch.ones(2, device="cpu"), backend=b),
    ]


TRITON = ["nft_loss_triton", "group_rewards_triton", "masked_blend_step_triton", "grpo_loss_triton",
          "sde_step_logprob_triton"]
REFERENCE = ["nft_loss_reference", "group_rewards_reference", "masked_blend_step_reference", "grpo_loss_reference",
             "sde_step_logprob_reference"]


def test_cpu_auto_follows_the_interpreter_flag(spies, monkeypatch):
    monkeypatch.setattr(backend, "INTERPRET", True)
    assert run_all("auto") == TRITON
    monkeypatch.setattr(backend, "INTERPRET", False)
    assert run_all("auto") == REFERENCE


def test_forcing_a_backend(spies, monkeypatch):
    monkeypatch.setattr(backend, "INTERPRET", True)
    assert run_all("torch") == REFERENCE
    assert run_all("triton") == TRITON


def test_triton_where_it_cannot_run_is_an_error_not_a_fallback(spies, monkeypatch):
    monkeypatch.setattr(backend, "INTERPRET", False)
    with pytest.raises(ValueError, match="backend='triton' cannot run here: CPU tensors need the Triton interpreter"):
        run_all("triton")
    monkeypatch.setattr(backend, "HAS_TRITON", False)
    with pytest.raises(ValueError, match="triton is not installed"):
        run_all("triton")
    with pytest.raises(ValueError, match="CUDA tensors run on the Triton kernels but triton is not installed"):
        backend.use_triton("auto", torch.device("cuda", 0), "nft_loss")
    assert spies == []


def test_cuda_tensors_go_to_triton():
    assert backend.use_triton("auto", torch.device("cuda", 0), "nft_loss") is backend.HAS_TRITON
    assert backend.use_triton("auto", torch.device("meta"), "nft_loss") is False
    with pytest.raises(ValueError, match="Triton has no backend for meta tensors"):
        backend.use_triton("triton", torch.device("meta"), "nft_loss")
