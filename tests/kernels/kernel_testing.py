"""Helpers of the kernel tests: guard bands around every buffer, tolerances, random inputs.

Guard bands: the launchers allocate through kernels.launch.empty; `guarded_buffers` swaps
those for views into larger buffers whose margins hold NaN (floats) or a sentinel (integers), and
`guarded` puts inputs in NaN margins too. An out-of-bounds write changes a margin (checked after
the call); an out-of-bounds read pulls a NaN into the result.
"""
from __future__ import annotations

import contextlib
import math

import torch
from hypothesis import settings

from kernels import launch

# The Triton tests run on CUDA tensors when a GPU is present (compiled kernels) and on CPU tensors
# under the interpreter otherwise (tests/conftest.py sets TRITON_INTERPRET=1 without CUDA).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EXACT_FP = DEVICE == "cpu"  # the interpreter does not contract a * b + c into an fma; a GPU may

PAD = 67  # elements of margin on each side (odd, so no alignment hides an overrun)
SENTINEL = 77


def _margin_value(dtype: torch.dtype):
    return float("nan") if dtype.is_floating_point else SENTINEL


class GuardedBuffers:
    def __init__(self):
        self.blocks: list[tuple[torch.Tensor, int]] = []

    def make(self, shape, dtype, device) -> torch.Tensor:
        n = math.prod(shape)
        buf = torch.full((n + 2 * PAD,), _margin_value(dtype), dtype=dtype, device=device)
        self.blocks.append((buf, n))
        return buf[PAD:PAD + n].view(shape)

    def check(self) -> None:
        for buf, n in self.blocks:
            for margin in (buf[:PAD], buf[PAD + n:]):
                intact = torch.isnan(margin).all() if buf.dtype.is_floating_point else (margin == SENTINEL).all()
                assert bool(intact), f"a kernel wrote outside a {buf.dtype} buffer of {n} elements"


@contextlib.contextmanager
def guarded_buffers():
    """Within the block every launcher buffer is guard-banded; margins are checked at exit.
    (A plain swap, not pytest's monkeypatch: hypothesis tests cannot take function fixtures.)"""
    g = GuardedBuffers()
    saved = launch.empty
    launch.empty = lambda shape, dtype, device: g.make(shape, dtype, device)
    try:
        yield g
    finally:
        launch.empty = saved
    g.check()


def guarded(x: torch.Tensor) -> torch.Tensor:
    """x's values in a contiguous view with NaN margins (keeps requires_grad as a leaf)."""
    n = x.numel()
    buf = torch.full((n + 2 * PAD,), float("nan"), dtype=x.dtype, device=x.device)
    buf[PAD:PAD + n] = x.detach().reshape(-1)
    out = buf[PAD:PAD + n].view(x.shape)
    return out.requires_grad_(x.requires_grad)


def randn(shape, dtype=torch.float64, seed=0, device=DEVICE, scale=1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64, device="cpu") * scale).to(dtype=dtype, device=device)


def rand(shape, dtype=torch.float64, seed=0, device=DEVICE) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g, dtype=torch.float64, device="cpu").to(dtype=dtype, device=device)


def per_combination(share: float) -> settings:
    """Settings for a hypothesis test that pytest runs once per combination of a kernel's options
    (each combination is its own test, so none can be left out by chance): every combination draws
    `share` of the profile's max_examples, at least 3. Under the "ci" profile (tests/conftest.py)
    that is a few distinct shapes and values per combination; "thorough" scales them all."""
    return settings(max_examples=max(3, round(settings.default.max_examples * share)))


TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-6)}


def ulp(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).eps)


def assert_low_precision(kernel: torch.Tensor, eager: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype,
                         scale: float = 1.0) -> None:
    """kernels.md's rule: the kernel's error against an fp64 result is at most twice eager
    PyTorch's at the same precision, plus a small atol (one ulp of `dtype` at `scale`, and one more
    under the Triton interpreter, whose fp32 -> bf16 stores truncate instead of rounding)."""
    exact = exact.double()
    err_kernel = (kernel.double() - exact).abs().max().item()
    err_eager = (eager.double() - exact).abs().max().item()
    atol = 2 * ulp(dtype) * scale
    assert err_kernel <= 2 * err_eager + atol, (err_kernel, err_eager, atol)
