"""Measuring what a forward keeps for its backward: every storage ops output, held weakly (tests only).

rl/planning/flux_activations.py's formula is checked against these numbers (tests/rl/test_plan.py
for FLUX, tests/rl/test_plan_qwen.py for Qwen-Image).
"""
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode


class Storages(TorchDispatchMode):
    """Every storage an op outputs, held weakly: the live ones are the memory in use, and `peak`
    their largest total after any op. `model`'s parameters are left out (ops on them, such as a
    transpose, output views of their storage); tensors made before the mode are not seen."""

    def __init__(self, model):
        super().__init__()
        self.params = frozenset(p.untyped_storage().data_ptr() for p in model.parameters())
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0

    def alive(self, skip: frozenset = frozenset()) -> int:
        self.live = {ptr: (ref, n) for ptr, (ref, n) in self.live.items() if not ref.expired()}
        return sum(n for ptr, (_, n) in self.live.items() if ptr not in skip and ptr not in self.params)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                s = t.untyped_storage()
                self.live[s.data_ptr()] = (StorageWeakRef(s), s.nbytes())
        self.peak = max(self.peak, self.alive())
        return out


def measure_kept_bytes(model, make_inputs) -> tuple[int, int, int]:
    """(bytes alive after the forward, bytes saved for backward, peak bytes of forward + backward).

    Alive: storages the forward created and still holds (the output excluded), which is what
    `saved_tensors_hooks` sees (the sum of unique storages, the second number) plus what a
    checkpoint holds by reference. The peak includes the parameters' gradients."""
    mode = Storages(model)
    saved = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in mode.params:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    with mode:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(**make_inputs())[0]  # the inputs are made inside: the embedders keep them
        alive = mode.alive(skip=frozenset({out.untyped_storage().data_ptr()}))
        out.float().square().mean().backward()
    return alive, sum(saved.values()), mode.peak
