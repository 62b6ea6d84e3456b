"""QwenImageEditPolicy on a tiny Qwen-Image-Edit built from configs (the tiny Qwen2.5-VL of
reward.vlm.tiny_vlm as text encoder, a tiny QwenImage VAE and transformer), saved and loaded back
through QwenImageEditPipeline.from_pretrained (no downloads); the policy is checked against the pipeline.
The stock Qwen2VLProcessor needs torchvision for its video processor: the tests use an image-only
subclass in memory and pass it as a component (model_index.json names the stock class)."""
import json

import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit as edit_module
import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImageEditPipeline,
    QwenImageTransformer2DModel,
)
from PIL import Image
from transformers import Qwen2VLProcessor

from core.policies.qwen_image_edit import QwenImageEditPolicy
from core.sampling.samplers import sample_policy

SIZE, STEPS = 32, 3
LORA = dict(r=4, alpha=8, init="gaussian")


class ImageOnlyProcessor(Qwen2VLProcessor):
    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    from reward.vlm.tiny_vlm import build_tiny_vlm

    parts = build_tiny_vlm("test")
    processor = ImageOnlyProcessor(image_processor=parts.image_processor, tokenizer=parts.tokenizer)
    torch.manual_seed(0)
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 1], num_res_blocks=1, temperal_downsample=[False],
                                 latents_mean=[0.1, -0.2, 0.0, 0.3], latents_std=[1.5, 0.8, 1.0, 2.0])
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                              attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                              axes_dims_rope=(4, 6, 6))
    scheduler = FlowMatchEulerDiscreteScheduler(  # Qwen-Image's scheduler config, smaller shifts
        num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
        base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential")
    path = tmp_path_factory.mktemp("tiny_qwen_edit")
    QwenImageEditPipeline(scheduler=scheduler, vae=vae, text_encoder=parts.model, tokenizer=parts.tokenizer,
                          processor=processor, transformer=transformer).save_pretrained(path)
    index = json.loads((path / "model_index.json").read_text())
    index["processor"] = ["transformers", "Qwen2VLProcessor"]
    (path / "model_index.json").write_text(json.dumps(index))
    return str(path), processor


@pytest.fixture(scope="module")
def edits():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2, 3, SIZE, SIZE), generator=g).float() / 255  # 8-bit: PIL round trip exact
    return images, None, ["make it red", "add a small cat on the left"]


def load(qwen, **kw):
    path, processor = qwen
    return QwenImageEditPolicy.from_pretrained(path, image_size=SIZE, components={"processor": processor}, **kw)


def load_pipeline(qwen):
    path, processor = qwen
    pipe = QwenImageEditPipeline.from_pretrained(path, processor=processor)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_call(pipe, edits, noise, monkeypatch, output_type="latent", **kw):
    """The pipeline on PIL images of the source's size (its 1 MP resize patched out), same start noise."""
    images, _, prompts = edits
    monkeypatch.setattr(edit_module, "calculate_dimensions", lambda area, ratio: (SIZE, SIZE, None))
    pil = [Image.fromarray((x.permute(1, 2, 0) * 255).round().byte().numpy()) for x in images]
    return pipe(image=pil, prompt=prompts, height=SIZE, width=SIZE, num_inference_steps=STEPS, latents=noise,
                output_type=output_type, **kw).images


def test_euler_rollout_reproduces_the_pipeline(qwen_dir, edits, monkeypatch):
    policy = load(qwen_dir)
    cond = policy.encode(*edits)
    assert cond.pooled is None and cond.x0_known.shape == (2, (SIZE // 4) ** 2, 16)
    assert cond.extra["prompt_mask"].shape == cond.prompt_embeds.shape[:2]
    assert not bool(cond.extra["prompt_mask"].all())  # two prompt lengths: padded with a mask
    sub = cond.index([1])  # the mask follows indexing
    assert torch.equal(sub.extra["prompt_mask"], cond.extra["prompt_mask"][1:])
    noise = torch.randn(cond.x0_known.shape, generator=torch.Generator().manual_seed(3))
    sigmas = policy.schedule(STEPS)
    with torch.no_grad():
        ours = sample_policy(policy, cond, sigmas=sigmas, method="euler", blend=False, noise=noise)
        ours_images = policy.decode(ours, cond)
    pipe = load_pipeline(qwen_dir)
    latents = pipeline_call(pipe, edits, noise, monkeypatch)
    torch.testing.assert_close(sigmas, pipe.scheduler.sigmas.float(), rtol=0, atol=1e-6)
    assert (latents - noise).abs().max() > 0.5
    torch.testing.assert_close(ours, latents, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(ours_images, pipeline_call(pipe, edits, noise, monkeypatch, output_type="pt"),
                               rtol=1e-5, atol=2e-5)
    # true CFG with the pipeline's norm rescale
    cfg = load(qwen_dir, true_cfg_scale=3.0, negative_prompt="blurry")
    with torch.no_grad():
        guided = sample_policy(cfg, cfg.encode(*edits), sigmas=sigmas, method="euler", blend=False, noise=noise)
    assert not torch.allclose(guided, ours, atol=1e-3)
    torch.testing.assert_close(guided, pipeline_call(pipe, edits, noise, monkeypatch, true_cfg_scale=3.0,
                                                     negative_prompt=["blurry"] * 2), rtol=1e-5, atol=2e-5)


def test_velocity_has_gradients_into_the_transformer(qwen_dir, edits):
    def grads(policy):
        policy.model.train()
        cond = policy.encode(*edits)
        x = torch.randn(cond.x0_known.shape, generator=torch.Generator().manual_seed(1))
        t = torch.tensor([0.8, 0.35])
        v = policy.velocity(x, t, cond)
        policy.decode(x - t.view(-1, 1, 1) * v, cond).mean().backward()
        assert all(p.grad is None for part in (policy.pipe.vae, policy.pipe.text_encoder) for p in part.parameters())
        return {k: p.grad for k, p in policy.trainable_parameters().items()}

    ref = grads(load(qwen_dir))
    for name in ("img_in.weight", "txt_in.weight", "transformer_blocks.0.attn.to_q.weight", "proj_out.weight"):
        assert ref[name] is not None and ref[name].abs().sum() > 0, name
    checkpointed = load(qwen_dir, gradient_checkpointing=True)
    assert checkpointed.model.is_gradient_checkpointing
    for k, g in grads(checkpointed).items():
        torch.testing.assert_close(g, ref[k], rtol=1e-5, atol=1e-7)


def test_lora_in_diffusers_format_loads_into_the_pipeline(qwen_dir, edits, monkeypatch, tmp_path):
    policy = load(qwen_dir, lora=LORA)
    with torch.no_grad():
        for p in policy.trainable_parameters().values():
            p.add_(0.1 * torch.randn_like(p))
    cond = policy.encode(*edits)
    noise = torch.randn(cond.x0_known.shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = sample_policy(policy, cond, sigmas=policy.schedule(STEPS), method="euler", noise=noise)
        with policy.base():
            base = sample_policy(policy, cond, sigmas=policy.schedule(STEPS), method="euler", noise=noise)
    assert (ours - base).abs().max() > 1e-3
    policy.save_lora_weights(tmp_path / "lora")
    pipe = load_pipeline(qwen_dir)
    pipe.load_lora_weights(str(tmp_path / "lora"))
    torch.testing.assert_close(pipeline_call(pipe, edits, noise, monkeypatch), ours, rtol=1e-5, atol=2e-5)
    fresh = load(qwen_dir)
    fresh.load_lora_weights(tmp_path / "lora")
    with torch.no_grad():
        again = sample_policy(fresh, cond, sigmas=policy.schedule(STEPS), method="euler", noise=noise)
    torch.testing.assert_close(again, ours, rtol=0, atol=1e-6)


def test_missing_model_path_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_qwen.*Qwen/Qwen-Image-Edit"):
        QwenImageEditPolicy.from_pretrained(tmp_path / "no_such_qwen")
    with pytest.raises(FileNotFoundError, match="model_index.json.*QwenImageEditPipeline"):
        QwenImageEditPolicy.from_pretrained(tmp_path)


def test_model_kind_qwen_image_edit():
    from rl.plumbing.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="model.kind 'qwen_image_edit' needs model.path"):
        load_config(None, ["model.kind=qwen_image_edit"])
