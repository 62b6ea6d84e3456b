import pytest
import torch

from core.tiny_fill import TinyFillPolicy


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A small randomly initialised tiny Fill model on disk (its output layer is not zero, so
    different noise gives different images and rewards have spread)."""
    policy = TinyFillPolicy.create(seed=0)
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for p in policy.model.proj_out.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    path = tmp_path_factory.mktemp("tiny_model")
    policy.save_pretrained(path)
    return path


@pytest.fixture
def quick(tiny_model_dir):
    """quick(**overrides) -> --set list of a run small enough for a test."""
    return lambda **extra: quick_overrides(tiny_model_dir, **extra)


def quick_overrides(model_dir, **extra) -> list[str]:
    """A run small enough for a test: 2 groups of 4 images, 4 sampler steps, no held-out eval."""
    base = {
        "model.path": str(model_dir), "nft.groups_per_step": 2, "nft.group_size": 4,
        "sampler.steps": 4, "sampler.eval_steps": 4, "refl.min_step": 1, "refl.max_step": 2,
        "train.steps": 2, "train.eval_per_task": 0, "train.sample_every": 0, "train.checkpoint_every": 1,
        "train.progress": False, "train.tensorboard": False, "nft.tau_mean": "null", "nft.tau_std": "null",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]
