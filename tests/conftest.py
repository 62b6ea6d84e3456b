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
from hypothesis import HealthCheck, is_hypothesis_test, settings  # noqa: E402

# Hypothesis profiles, chosen with the environment variable HYPOTHESIS_PROFILE (default "ci") and
# loaded explicitly here (hypothesis would otherwise auto-load its own "ci" profile, 100 examples,
# whenever CI is set; registering "ci" below replaces it).
#   ci        `make test`, CI, a laptop: derandomised, so every run draws the same examples and a
#             failure reproduces exactly; 30 examples per test. Tests parametrized over an option
#             product draw a share of that per combination (tests/kernels/kernel_testing.py:
#             per_combination), so every combination gets several distinct shapes and values.
#   thorough  a nightly run or a GPU machine: 20x the examples, fresh random draws each run (a
#             failure prints a reproduction blob and lands in .hypothesis/), no deadline. For example:
#                 HYPOTHESIS_PROFILE=thorough .venv/bin/python -m pytest tests/kernels
_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=30, derandomize=True, **_COMMON)
settings.register_profile("thorough", max_examples=600, derandomize=False, print_blob=True, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# pytest-timeout: every test gets `timeout` from [tool.pytest.ini_options] (120 s). Tests marked
# `slow` get SLOW_TIMEOUT, and so do hypothesis tests: the thorough profile runs 20x the examples,
# and on a failure hypothesis may shrink for up to 5 minutes, which a 120 s timeout would cut short
# (reporting a timeout instead of the minimal failing example). A test's own
# @pytest.mark.timeout wins; a timeout of 0 on the command line or in PYTEST_TIMEOUT turns them
# all off.
SLOW_TIMEOUT = 600


def _timeouts_off(config) -> bool:
    value = config.getoption("timeout", None)
    if value is None:
        value = os.environ.get("PYTEST_TIMEOUT")
    return value is not None and float(value) == 0


def pytest_collection_modifyitems(config, items):
    if config.pluginmanager.hasplugin("timeout") and not _timeouts_off(config):
        slow_timeout = pytest.mark.timeout(SLOW_TIMEOUT)
        for item in items:
            if item.get_closest_marker("timeout") is not None:
                continue
            if item.get_closest_marker("slow") is not None or is_hypothesis_test(getattr(item, "obj", None)):
                item.add_marker(slow_timeout)
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
