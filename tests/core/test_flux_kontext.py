"""FluxKontextPolicy on a tiny FLUX.1 Kontext built from configs (tests/core/tiny_flux_parts.py: a
plain FLUX transformer, in_channels = the 8 packed latent channels), saved and loaded back through
FluxKontextPipeline.from_pretrained (no downloads); the policy is checked against the pipeline."""
import pytest
import torch
from diffusers import FluxKontextPipeline, FluxTransformer2DModel
from tiny_flux_parts import tiny_flux_parts

from core.policies import packing
from core.policies.flux_kontext import FluxKontextPolicy, preferred_resolution
from core.policies.lora import FLUX_ATTENTION_TARGETS
from core.sampling.samplers import sample_policy

SIZE, TEXT_LEN, STEPS = 32, 8, 4
LORA = dict(r=4, alpha=8, init="gaussian")   # targets: FLUX's attention projections (Edit-R1's)


@pytest.fixture(scope="module")
def kontext_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_flux_kontext")
    FluxKontextPipeline(**tiny_flux_parts(SIZE, transformer_in_channels=8)).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def edits():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, SIZE, SIZE, generator=g)
    masks = torch.zeros(2, 1, SIZE, SIZE)
    masks[:, :, 8:24, 4:20] = 1
    return images, masks, ["make it red", "add a cat"]


def load(path, **kw):
    return FluxKontextPolicy.from_pretrained(path, max_sequence_length=TEXT_LEN, image_size=SIZE, **kw)


def load_pipeline(path):
    pipe = FluxKontextPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_call(pipe, edits, noise, guidance=2.5, output_type="latent"):
    """The pipeline call the policy equals: no resizing, the source's size, the same start noise."""
    images, _, prompts = edits
    return pipe(image=images, prompt=prompts, height=SIZE, width=SIZE, max_area=SIZE * SIZE, _auto_resize=False,
                num_inference_steps=STEPS, guidance_scale=guidance, latents=noise, max_sequence_length=TEXT_LEN,
                generator=torch.Generator().manual_seed(5), output_type=output_type).images


def probe(policy, edits, seed=1):
    cond = policy.encode(*edits)
    g = torch.Generator().manual_seed(seed)
    return cond, torch.randn(cond.x0_known.shape, generator=g), torch.tensor([0.8, 0.35])


def test_encode_appends_source_tokens_and_generates_everywhere(kontext_dir, edits):
    policy = load(kontext_dir)
    images, masks, prompts = edits
    cond = policy.encode(*edits)
    L = (SIZE // 4) ** 2  # VAE factor 2, 2x2 packing
    assert cond.x0_known.shape == cond.cond_latents.shape == (2, L, 8) and cond.x0_known.dtype == torch.float32
    vae = policy.pipe.vae
    z = vae.encode(images * 2 - 1).latent_dist.mode()
    torch.testing.assert_close(cond.cond_latents, packing.pack((z - 0.1) * 1.5))
    # generated tokens (0, i, j), then the source tokens (1, i, j): the pipeline's latent_ids
    ids = packing.image_ids(16, 16)
    assert cond.img_ids.shape == (2 * L, 3) and torch.equal(cond.img_ids[:L], ids)
    assert torch.equal(cond.img_ids[L:, 0], torch.ones(L)) and torch.equal(cond.img_ids[L:, 1:], ids[:, 1:])
    assert cond.blend_mask.shape == (2, L, 1) and bool((cond.blend_mask == 1).all())
    assert cond.guidance.tolist() == [2.5, 2.5] and cond.prompt_embeds.shape == (2, TEXT_LEN, 32)
    assert cond.latent_hw == (16, 16) and cond.image_hw == (SIZE, SIZE) and cond.batch_size == 2
    # the mask is checked, not used: masks=None encodes the same condition
    bare = policy.encode(images, None, prompts)
    assert all(torch.equal(getattr(bare, k), getattr(cond, k)) for k in cond.BATCHED + ("img_ids", "text_ids"))
    with pytest.raises(ValueError, match="batch sizes differ"):
        policy.encode(images, masks[:1], prompts)
    with pytest.raises(ValueError, match="divisible by 4.*resize_to_multiple"):
        policy.encode(images[..., :30, :30], None, prompts)
    assert preferred_resolution(1024, 1024) == (1024, 1024) and preferred_resolution(600, 1200) == (720, 1456)


def test_euler_rollout_reproduces_flux_kontext_pipeline(kontext_dir, edits):
    policy = load(kontext_dir)
    cond = policy.encode(*edits)
    noise = torch.randn(cond.x0_known.shape, generator=torch.Generator().manual_seed(3))
    sigmas = policy.schedule(STEPS)
    with torch.no_grad():
        ours = sample_policy(policy, cond, sigmas=sigmas, method="euler", blend=False, noise=noise)
        # the library's blend step with a blend mask of ones is the plain step, exactly
        assert torch.equal(sample_policy(policy, cond, sigmas=sigmas, method="euler", noise=noise), ours)
        ours_images = policy.decode(ours, cond)
    pipe = load_pipeline(kontext_dir)
    latents = pipeline_call(pipe, edits, noise)
    torch.testing.assert_close(sigmas, pipe.scheduler.sigmas, rtol=0, atol=1e-6)
    assert (latents - noise).abs().max() > 0.5  # the sampler did move
    torch.testing.assert_close(ours, latents, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(ours_images, pipeline_call(pipe, edits, noise, output_type="pt"), rtol=1e-5, atol=2e-5)
    # the source reaches the model: another source image, another edit
    other_source = policy.encode(edits[0].flip(-1), None, edits[2])
    with torch.no_grad():
        assert not torch.allclose(sample_policy(policy, other_source, sigmas=sigmas, method="euler", noise=noise),
                                  ours, atol=1e-3)
    # and so does the guidance value (FLUX dev's distilled guidance)
    other = load(kontext_dir, guidance=4.0)
    with torch.no_grad():
        theirs = sample_policy(other, other.encode(*edits), sigmas=sigmas, method="euler", noise=noise)
    assert not torch.allclose(theirs, ours, atol=1e-3)
    torch.testing.assert_close(theirs, pipeline_call(pipe, edits, noise, guidance=4.0), rtol=1e-5, atol=2e-5)


def full_gradients(policy, edits):
    policy.model.train()  # diffusers checkpoints only in training mode with grad enabled
    cond, x, t = probe(policy, edits)
    source = cond.cond_latents.clone().requires_grad_(True)
    cond.cond_latents = source
    v = policy.velocity(x, t, cond)
    assert v.shape == x.shape  # the source tokens' outputs are dropped
    x0 = x - t.view(-1, 1, 1) * v  # ReFL's one-step prediction, through the decoder
    (policy.decode(x0, cond) * edits[1]).mean().backward()
    assert all(p.grad is None for part in (policy.pipe.vae, policy.pipe.text_encoder, policy.pipe.text_encoder_2)
               for p in part.parameters())
    return {k: p.grad for k, p in policy.trainable_parameters().items()}, source.grad


def test_velocity_has_gradients_into_the_transformer(kontext_dir, edits):
    policy = load(kontext_dir)
    grads, source_grad = full_gradients(policy, edits)
    assert set(grads) == {k for k, _ in policy.model.named_parameters()}
    for name in ("x_embedder.weight", "transformer_blocks.0.attn.to_q.weight", "single_transformer_blocks.0.proj_out.weight",
                 "proj_out.weight", "time_text_embed.guidance_embedder.linear_1.weight"):
        assert grads[name] is not None and grads[name].abs().sum() > 0, name
    assert source_grad.abs().sum() > 0  # the edit attends to the source tokens
    checkpointed = load(kontext_dir, gradient_checkpointing=True)
    assert checkpointed.model.is_gradient_checkpointing
    for k, g in full_gradients(checkpointed, edits)[0].items():
        torch.testing.assert_close(g, grads[k], rtol=1e-5, atol=1e-7)


def test_lora_in_diffusers_format_loads_into_the_pipeline(kontext_dir, edits, tmp_path):
    policy = load(kontext_dir, lora=LORA)
    assert set(policy.model.peft_config["default"].target_modules) == set(FLUX_ATTENTION_TARGETS)
    with torch.no_grad():
        for p in policy.trainable_parameters().values():
            p.add_(0.1 * torch.randn_like(p))
    cond, x, t = probe(policy, edits)
    noise = torch.randn(cond.x0_known.shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        v = policy.velocity(x, t, cond)
        ours = sample_policy(policy, cond, sigmas=policy.schedule(STEPS), method="euler", noise=noise)
        with policy.base():
            base = sample_policy(policy, cond, sigmas=policy.schedule(STEPS), method="euler", noise=noise)
    assert (ours - base).abs().max() > 1e-3
    policy.save_lora_weights(tmp_path / "lora")
    pipe = load_pipeline(kontext_dir)
    pipe.load_lora_weights(str(tmp_path / "lora"))
    torch.testing.assert_close(pipeline_call(pipe, edits, noise), ours, rtol=1e-5, atol=2e-5)
    fresh = load(kontext_dir)  # the adapter's config comes from the file
    fresh.load_lora_weights(tmp_path / "lora")
    with torch.no_grad():
        assert torch.equal(fresh.velocity(x, t, cond), v)


def test_missing_model_path_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_kontext.*FLUX.1-Kontext-dev"):
        FluxKontextPolicy.from_pretrained(tmp_path / "no_such_kontext")
    with pytest.raises(FileNotFoundError, match="model_index.json.*FluxKontextPipeline"):
        FluxKontextPolicy.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="onejudge-tests/not-a-model.*cache"):
        FluxKontextPolicy.from_pretrained("onejudge-tests/not-a-model")


def test_fill_transformer_is_rejected(kontext_dir):
    pipe = load_pipeline(kontext_dir)
    pipe.transformer = FluxTransformer2DModel(patch_size=1, in_channels=32, out_channels=8, num_layers=1,
                                              num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                                              joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])
    with pytest.raises(ValueError, match="not FLUX Kontext"):
        FluxKontextPolicy(pipe)


def test_model_kind_flux_kontext(kontext_dir):
    from rl.plumbing.builders import build_policy
    from rl.plumbing.config import ConfigError, ModelConfig, load_config

    with pytest.raises(ConfigError, match="model.kind 'flux_kontext' needs model.path"):
        load_config(None, ["model.kind=flux_kontext", "data.mixture={recolour: 1.0}"])
    policy = build_policy(ModelConfig(kind="flux_kontext", path=kontext_dir), torch.device("cpu"), image_size=SIZE)
    assert isinstance(policy, FluxKontextPolicy) and policy.guidance == 2.5 and policy.image_size == (SIZE, SIZE)


def test_reduced_precision(kontext_dir, edits):
    ref = load(kontext_dir)
    policy = load(kontext_dir, dtype=torch.bfloat16, lora=LORA, attention_backend="native")
    assert all(p.dtype == torch.float32 for p in policy.trainable_parameters().values())
    cond, x, t = probe(ref, edits)
    with torch.no_grad():
        v, v_ref = policy.velocity(x, t, cond), ref.velocity(x, t, cond)
        bf16_cond = policy.encode(*edits)
    assert v.dtype == torch.float32 and bf16_cond.cond_latents.dtype == torch.float32
    # bf16 rounding of t, the inputs and the weights (as in test_flux_fill)
    assert float((v - v_ref).norm()) < 0.08 * float(v_ref.norm())


@pytest.mark.cuda
def test_cuda_bf16_sampling_matches_float32(kontext_dir, edits):
    ref = load(kontext_dir, device="cuda")
    policy = load(kontext_dir, device="cuda", dtype=torch.bfloat16, lora=LORA, attention_backend="native")
    cond = ref.encode(*edits)
    noise = torch.randn(cond.x0_known.shape, generator=torch.Generator().manual_seed(3)).cuda()
    with torch.no_grad():
        a = sample_policy(ref, cond, sigmas=ref.schedule(6), noise=noise)
        b = sample_policy(policy, policy.encode(*edits), sigmas=ref.schedule(6), noise=noise)
    assert a.is_cuda and float((a - b).abs().max()) < 0.1 * float(a.abs().max())
