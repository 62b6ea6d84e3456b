"""Shared fixtures of the VLM-judge tests: one tiny Qwen2.5-VL per session, and a request factory.

tests/ is not a package (a tests/reward package would shadow the real `reward`), so helpers are
fixtures rather than importable functions.
"""
import pytest
import torch

from reward.judge import JudgeRequest

# (task, dimension, H, W, instruction): prompts and image sizes differ, so batches need padding
MIXED_SPECS = (
    ("fill", "text_alignment", 56, 56, "a red circle on a striped background"),
    ("removal", "consistency", 40, 60, ""),
    ("text", "text_accuracy", 56, 56, '"AB"'),
    ("extend", "aesthetics", 30, 30, ""),
)


@pytest.fixture(scope="session")
def tiny_vlm():
    """A frozen tiny Qwen2.5-VL whose answers depend on its input (init_std 0.2, see build_tiny_vlm)."""
    from reward.vlm.tiny_vlm import build_tiny_vlm

    parts = build_tiny_vlm(init_std=0.2, seed=0)
    parts.model.requires_grad_(False)
    return parts


def _quantised(x: torch.Tensor) -> torch.Tensor:
    # values on the 8-bit grid, so a PNG round trip (the API path) is exact
    return (x * 255).round() / 255


def _make_requests(specs=MIXED_SPECS, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    out = []
    for task, dim, h, w, instruction in specs:
        imgs = [_quantised(torch.rand(3, h, w, generator=g, dtype=dtype)) for _ in range(3)]
        mask = torch.zeros(1, h, w, dtype=dtype)
        mask[:, h // 4: h // 2 + 3, w // 5: w // 2] = 1
        out.append(JudgeRequest(task, dim, imgs[0], imgs[1], mask, instruction, other=imgs[2]))
    return out


@pytest.fixture
def make_requests():
    """make_requests(specs=MIXED_SPECS, seed=0) -> JudgeRequests with random 8-bit images and a box mask."""
    return _make_requests


@pytest.fixture
def mixed_specs():
    return list(MIXED_SPECS)
