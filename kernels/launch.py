"""Small helpers shared by the Triton launchers: accumulation dtype, cached constant tensors,
block sizes and the device's SM count. Everything here is host-side and cheap on the hot path."""
from __future__ import annotations

import functools

import torch

try:
    import triton.language as tl
except ImportError:  # kernels still imports without triton; the launchers are then never called
    tl = None


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of the kernels: fp32, or fp64 for fp64 inputs (as the references)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tl_dtype(dtype: torch.dtype):
    """The triton.language dtype matching an accumulation dtype (a kernel constexpr)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


@functools.lru_cache(maxsize=512)
def constants(values: tuple[float, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A read-only device tensor holding `values`, cached by value.

    Hyper-parameters reach the kernels as tensors, not Python floats: a float argument would be
    rounded to fp32 (wrong for fp64 runs) and would be a changing fp64 scalar under torch.compile.
    Values fixed for a run (beta, clip, sampler times) hit the cache, so no host-to-device copy
    happens on the hot path.
    """
    return torch.tensor(values, dtype=dtype, device=device)


def empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer a launcher writes comes from here (tests swap it for guard-banded buffers)."""
    return torch.empty(shape, dtype=dtype, device=device)


@functools.lru_cache(maxsize=16)
def sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def split_rows(n: int, rows: int, block: int, device: torch.device, chunks: int | None = None) -> tuple[int, int]:
    """Split each of `rows` rows of `n` elements into chunks, one program per (row, chunk).

    Returns (chunk, chunks): `chunk` elements per program (a multiple of `block`) and the number of
    chunks per row. On a GPU there are enough programs to fill the device about four times over; in
    the interpreter (where each program costs milliseconds) one chunk per row unless told.
    """
    tiles = -(-n // block)
    if chunks is None:
        chunks = -(-4 * sm_count(device) // rows) if device.type == "cuda" else 1
    chunks = max(1, min(int(chunks), tiles))
    chunk = -(-tiles // chunks) * block
    return chunk, -(-n // chunk)
