"""Test-wide setup.

TRITON_INTERPRET must be set before any module that defines a `@triton.jit` kernel is imported
(the decorator reads it at import time), so it is set here, at the very top, when no CUDA device
is present: the Triton kernels then run on CPU tensors under the interpreter.
"""
import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# Project profiles, loaded explicitly (hypothesis would otherwise auto-load its own "ci" profile
# with 100 examples when CI is set). "fast" keeps the whole suite inside the CI budget.
settings.register_profile(
    "fast", max_examples=12, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "thorough", max_examples=200, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fast"))


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
