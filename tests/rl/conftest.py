import dataclasses

import pytest
import torch
from diffusers import AutoencoderKL

from core.toy_flux import (
    SHIPPED_DIR,
    ClipSpec,
    T5Spec,
    ToyFluxSpec,
    TransformerSpec,
    VAESpec,
    build_toy_pipeline,
    save_toy_pipeline,
)

#: the toy FLUX.1 Fill at test size: every part a real diffusers / transformers class, the
#: transformer and text encoders far smaller than the shipped ones and random
TEST_SPEC = ToyFluxSpec(
    image_size=64, clip=ClipSpec(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=37),
    t5=T5Spec(d_model=32, num_layers=1, num_heads=2, d_ff=37),
    transformer=TransformerSpec(num_layers=1, num_single_layers=1, num_attention_heads=2, attention_head_dim=16))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A small toy FLUX.1 Fill pipeline on disk: the shipped, trained VAE (a random one cannot
    draw the colours the tests' judges ask for) around a random small transformer whose output
    layer is scaled up, so different noise gives clearly different images and rewards have spread."""
    vae = AutoencoderKL.from_pretrained(SHIPPED_DIR / "vae")
    spec = dataclasses.replace(TEST_SPEC, vae=VAESpec.of(vae))
    pipe = build_toy_pipeline(spec, vae=vae)
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for p in pipe.transformer.proj_out.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    path = tmp_path_factory.mktemp("tiny_model")
    save_toy_pipeline(pipe, path, spec)
    return path


@pytest.fixture
def one_thread():
    """torch on one thread for the test: tiny models (the tiny judge's backward above all) run many times
    faster than on two threads when another process holds one of two cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def quick(tiny_model_dir):
    """quick(**overrides) -> --set list of a run small enough for a test."""
    return lambda **extra: quick_overrides(tiny_model_dir, **extra)


def quick_overrides(model_dir, **extra) -> list[str]:
    """A run small enough for a test: 2 groups of 4 images, 4 sampler steps, no held-out eval."""
    base = {
        # NFT unless a test says otherwise (the default job is ReFL; most trainer tests are about NFT)
        "train.algorithm": "nft", "judge.mode": "score",
        "model.path": str(model_dir), "nft.groups_per_step": 2, "nft.group_size": 4,
        "sampler.steps": 4, "sampler.eval_steps": 4, "refl.min_step": 1, "refl.max_step": 2,
        "train.steps": 2, "train.eval_per_task": 0, "train.sample_every": 0, "train.checkpoint_every": 1,
        "train.progress": False, "train.tensorboard": False, "nft.tau_mean": "null", "nft.tau_std": "null",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]
