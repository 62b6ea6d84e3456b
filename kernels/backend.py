"""Which implementation runs a call: the Triton kernel or the eager PyTorch reference.

`backend="auto"`: CUDA tensors -> Triton; CPU tensors -> the reference, or Triton when the Triton
interpreter is on (TRITON_INTERPRET=1, read once when `kernels` is imported: `@triton.jit` decides
at import time whether a kernel is compiled or interpreted). Other devices -> the reference.
`"triton"` and `"torch"` force one; forcing Triton where it cannot run is an error, never a quiet
switch to the reference.
"""
from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "triton", "torch")

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # triton is a Linux-only dependency; the references still work elsewhere
    HAS_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(backend: str, device: torch.device, op: str) -> bool:
    """True when `op` should run its Triton kernel on tensors living on `device`."""
    if backend not in BACKENDS:
        raise ValueError(f"{op}: unknown backend {backend!r}; expected one of {list(BACKENDS)}")
    if backend == "torch":
        return False
    runnable = HAS_TRITON and (device.type == "cuda" or (device.type == "cpu" and INTERPRET))
    if backend == "auto":
        if device.type == "cuda" and not HAS_TRITON:
            raise ValueError(f"{op}: CUDA tensors run on the Triton kernels but triton is not installed; "
                             "install it (pip install triton) or pass backend='torch'")
        return runnable
    if not runnable:
        if not HAS_TRITON:
            why = "triton is not installed (pip install triton)"
        elif device.type == "cpu":
            why = ("CPU tensors need the Triton interpreter: set TRITON_INTERPRET=1 before importing "
                   "kernels")
        else:
            why = f"Triton has no backend for {device.type} tensors"
        raise ValueError(f"{op}: backend='triton' cannot run here: {why}; or pass backend='torch'")
    return True
