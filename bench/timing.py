"""Timing helpers: wall time per call (host + device, what a training loop sees), device time per
call with a cold L2 (what the memory system sees), launches per call and extra peak memory."""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wall_us(fn: Callable[[], object], device: torch.device, budget_s: float, repeats: int = 5) -> float:
    """Median over `repeats` of the mean wall time of back-to-back calls (a sync before and after
    each batch); the batch size fills about budget_s / repeats."""
    fn()
    _sync(device)
    tic = time.perf_counter()
    fn()
    _sync(device)
    one = max(time.perf_counter() - tic, 1e-7)
    calls = max(1, min(10_000, int(budget_s / repeats / one)))
    samples = []
    for _ in range(repeats):
        _sync(device)
        tic = time.perf_counter()
        for _ in range(calls):
            fn()
        _sync(device)
        samples.append((time.perf_counter() - tic) / calls)
    return statistics.median(samples) * 1e6


def device_us(fn: Callable[[], object], device: torch.device, repeats: int = 25) -> float | None:
    """Median device time of one call with L2 flushed before it (CUDA events); None on CPU."""
    if device.type != "cuda":
        return None
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device=device)
    times = []
    fn()
    for _ in range(repeats):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def launches(fn: Callable[[], object], device: torch.device) -> int | None:
    """Device kernels (and memsets / copies) one call issues, from the profiler; None on CPU."""
    if device.type != "cuda":
        return None
    fn()
    _sync(device)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        _sync(device)
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def extra_peak_mb(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak memory one call allocates beyond what was allocated before it; None on CPU."""
    if device.type != "cuda":
        return None
    fn()
    _sync(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    _sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20
