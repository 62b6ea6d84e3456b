import json
import random

import pytest
import torch
from diffusers import FluxTransformer2DModel
from transformers import AutoTokenizer, CLIPTextModel

from core import packing
from core.metrics import ground_truth_metrics, summarize
from core.policy import swapped_weights
from core.samplers import sample_policy
from core.tasks import TASKS
from core.tiny_fill import SHIPPED_DIR, TinyFillPolicy
from core.tiny_text import PromptEncoder, build_tokenizer
from core.world import SyntheticWorld, collate
from rl import pretrain

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


@pytest.fixture(scope="module")
def world():
    return SyntheticWorld(size=64, seed=0)


@pytest.fixture(scope="module")
def batch(world):
    return collate([world.sample(t, i) for t in TASKS for i in range(2)])


@pytest.fixture()
def policy():
    return TinyFillPolicy.create(seed=0)


# -- tokenizer and text encoder ------------------------------------------------------------------
def test_tokenizer_splits_digits_and_punctuation(world):
    tok = build_tokenizer()
    ids = tok('The text "42"', padding="max_length", max_length=tok.model_max_length)["input_ids"]
    assert tok.convert_ids_to_tokens(ids)[:8] == ["[BOS]", "the", "text", '"', "4", "2", '"', "[EOS]"]
    assert len(ids) == tok.model_max_length and ids[8:] == [tok.pad_token_id] * (len(ids) - 8)
    assert tok.eos_token_id != 2  # CLIP would pool at the highest id instead of at [EOS]
    rng = random.Random(0)
    prompts = [s.prompt for t in TASKS for s in world.batch([t] * 20, rng)]
    enc = PromptEncoder(tok, TinyFillPolicy.create().prompt_encoder.text_model)
    assert (enc.tokenize(prompts) != tok.unk_token_id).all()


def test_prompts_the_tokenizer_cannot_represent_are_errors(policy):
    with pytest.raises(ValueError, match="zebra"):
        policy.encode_prompts(["a red zebra"])
    with pytest.raises(ValueError, match="at most"):
        policy.encode_prompts(["a " * 20])
    with pytest.raises(ValueError, match="list of strings"):
        policy.encode_prompts("a red circle")


def test_pooled_output_is_the_eos_state_and_cache_is_used_only_when_frozen(policy):
    enc = policy.prompt_encoder
    prompts = ["a red circle", 'the text "7"', "a red circle"]
    calls = []
    handle = enc.text_model.register_forward_hook(lambda *a: calls.append(1))
    seq, pooled = enc(prompts)
    ids = enc.tokenize(prompts)
    eos = (ids == enc.tokenizer.eos_token_id).int().argmax(1)
    torch.testing.assert_close(pooled, seq[torch.arange(3), eos])
    torch.testing.assert_close(seq[0], seq[2])
    seq2, _ = enc(prompts[::-1])  # all cached now: no new forward
    assert len(calls) == 1 and torch.equal(seq2[1], seq[1])
    enc.text_model.requires_grad_(True)  # pretraining: trained jointly, no cache, gradients flow
    seq3, pooled3 = enc(prompts)
    (seq3.sum() + pooled3.sum()).backward()
    assert len(calls) == 2 and enc.text_model.embeddings.token_embedding.weight.grad is not None
    handle.remove()


# -- the policy ----------------------------------------------------------------------------------
def test_condition_is_flux_fill_layout(policy, batch):
    cond = policy.encode(batch.images, batch.masks, batch.prompts)
    B = len(batch)
    assert cond.cond_latents.shape == (B, 256, 64) and cond.x0_known.shape == (B, 256, 48)
    assert policy.model.config.in_channels == 48 + 48 + 16 and policy.latent_channels == 48
    assert cond.prompt_embeds.shape == (B, 16, 64) and cond.pooled.shape == (B, 64)
    assert cond.img_ids.shape == (256, 3) and cond.text_ids.shape == (16, 3)
    em = packing.pack(policy.codec.element_mask(batch.masks))
    torch.testing.assert_close(cond.blend_mask, em)
    masked = cond.cond_latents[..., :48]
    torch.testing.assert_close(masked, cond.x0_known * (1 - em))  # masked image: zero in the edit region
    torch.testing.assert_close(cond.cond_latents[..., 48:], packing.pack(packing.fold_mask(batch.masks, 2)))
    torch.testing.assert_close(policy.decode(cond.x0_known, cond), batch.images, atol=1e-6, rtol=0)


def test_velocity_runs_the_transformer_and_weights_swap_by_name(policy, batch):
    cond = policy.encode(batch.images[:3], batch.masks[:3], batch.prompts[:3])
    x = policy.initial_noise(cond, torch.Generator().manual_seed(0))
    t = torch.tensor([0.9, 0.5, 0.1])
    with torch.no_grad():
        v = policy.velocity(x, t, cond)
        assert v.shape == x.shape and torch.isfinite(v).all()
        assert not torch.allclose(v, policy.velocity(x, t.flip(0), cond))  # time matters
        snap = policy.snapshot()
        assert set(snap) == {n for n, _ in policy.model.named_parameters()}
        torch.testing.assert_close(policy.velocity(x, t, cond, weights=snap), v)
        moved = {n: w + 0.05 for n, w in snap.items()}
        assert not torch.allclose(policy.velocity(x, t, cond, weights=moved), v)
        torch.testing.assert_close(policy.velocity(x, t, cond), v)  # restored
    trainable = policy.trainable_parameters()
    assert all(not n.startswith("text") for n in trainable)  # the text encoder is frozen for RL
    assert not any(p.requires_grad for p in policy.prompt_encoder.parameters())


def test_bad_inputs_are_clear_errors(policy, batch):
    imgs, masks, prompts = batch.images[:2], batch.masks[:2], batch.prompts[:2]
    with pytest.raises(ValueError, match=r"64x64.*resize"):
        policy.encode(torch.rand(2, 3, 48, 48), torch.ones(2, 1, 48, 48), prompts)
    with pytest.raises(ValueError, match=r"\[B, 1, H, W\]"):
        policy.encode(imgs, masks[:, 0], prompts)
    with pytest.raises(ValueError, match="batch sizes differ"):
        policy.encode(imgs, masks, prompts[:1])
    with pytest.raises(ValueError, match="batch sizes differ"):
        policy.encode(imgs, masks[:1], prompts)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        policy.encode(imgs * 255, masks, prompts)
    with pytest.raises(ValueError, match="not binary"):
        policy.encode(imgs, torch.full_like(masks, 0.5), prompts)


def test_save_load_round_trip_with_the_libraries_own_loaders(policy, batch, tmp_path):
    policy.default_shift = 2.0
    policy.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "tiny_fill.json").read_text())["default_shift"] == 2.0
    FluxTransformer2DModel.from_pretrained(tmp_path / "transformer")
    CLIPTextModel.from_pretrained(tmp_path / "text_encoder")
    assert AutoTokenizer.from_pretrained(tmp_path / "tokenizer")("4 2")["input_ids"] == \
        policy.prompt_encoder.tokenizer("4 2")["input_ids"]
    loaded = TinyFillPolicy.from_pretrained(tmp_path)
    assert loaded.default_shift == 2.0 and loaded.image_size == 64
    args = (batch.images[:2], batch.masks[:2], batch.prompts[:2])
    x = torch.randn(2, 256, 48, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded.velocity(x, 0.3, loaded.encode(*args)),
                                   policy.velocity(x, 0.3, policy.encode(*args)), atol=0, rtol=0)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        TinyFillPolicy.from_pretrained(tmp_path / "nowhere")


def test_lora_trains_only_adapters_and_exports_merged(policy, batch, tmp_path):
    args = (batch.images[:2], batch.masks[:2], batch.prompts[:2])
    cond = policy.encode(*args)
    x = torch.randn(2, 256, 48, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        v0 = policy.velocity(x, 0.5, cond)
    policy.add_lora(r=4, alpha=8, targets=LORA_TARGETS)
    snap = policy.snapshot()
    assert snap and all("lora_" in n for n in snap)
    moved = {n: w + 0.1 * torch.randn(w.shape, generator=torch.Generator().manual_seed(3)) for n, w in snap.items()}
    with torch.no_grad():
        torch.testing.assert_close(policy.velocity(x, 0.5, cond), v0)  # B starts at zero
        v1 = policy.velocity(x, 0.5, cond, weights=moved)
        assert not torch.allclose(v1, v0)
        with swapped_weights(policy.model, moved):  # how trainers export an EMA weight set
            policy.save_pretrained(tmp_path)
        with policy.base():
            torch.testing.assert_close(policy.velocity(x, 0.5, cond, weights=moved), v0)
    merged = TinyFillPolicy.from_pretrained(tmp_path)
    assert not merged.has_lora and policy.has_lora
    with torch.no_grad():
        torch.testing.assert_close(merged.velocity(x, 0.5, merged.encode(*args)), v1, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="already"):
        policy.add_lora(r=4, alpha=8, targets=LORA_TARGETS)
    with pytest.raises(ValueError, match="name no module"):
        TinyFillPolicy.create().add_lora(r=4, alpha=8, targets=["to_qq"])


def test_bfloat16_path_returns_float32_velocities(policy, batch):
    args = (batch.images[:2], batch.masks[:2], batch.prompts[:2])
    x = torch.randn(2, 256, 48, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        v32 = policy.velocity(x, 0.5, policy.encode(*args))
        policy.add_lora(r=2, alpha=2, targets=["to_q"])
        policy.to(dtype=torch.bfloat16)
        assert policy.dtype == torch.bfloat16
        assert all(p.dtype == torch.float32 for p in policy.trainable_parameters().values())
        v16 = policy.velocity(x, 0.5, policy.encode(*args))
    assert v16.dtype == torch.float32
    assert (v16 - v32).abs().mean() < 0.05 * v32.abs().mean()


# -- pretraining --------------------------------------------------------------------------------
def test_flow_matching_loss_learns_a_fixed_batch(world):
    batch = collate([world.sample(t, 0) for t in TASKS])
    torch.manual_seed(0)
    policy = TinyFillPolicy.create(seed=1)
    policy.prompt_encoder.text_model.requires_grad_(True)
    params = list(policy.model.parameters()) + list(policy.prompt_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=3e-3)
    losses = []
    for _ in range(12):  # same noise and times every step: plain regression that must go down
        loss = pretrain.flow_matching_loss(policy, batch, torch.Generator().manual_seed(0), 0.1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0]


def test_pretrain_command_resumes_exactly_and_writes_a_loadable_model(tmp_path):
    argv = [a for kv in ("steps=4", "batch=3", "eval_per_task=2", "eval_steps=2", "log_every=1") for a in ("--set", kv)]
    pretrain.main(argv + ["--out", str(tmp_path / "a")])
    pretrain.main(argv + ["--out", str(tmp_path / "b"), "--stop-after", "2"])
    assert not (tmp_path / "b").exists() and pretrain.state_path(tmp_path / "b").is_dir()
    with pytest.raises(ValueError, match="other settings"):
        pretrain.main(argv + ["--out", str(tmp_path / "b"), "--resume", "--set", "lr=0.1"])
    pretrain.main(argv + ["--out", str(tmp_path / "b"), "--resume"])
    quality = json.loads((tmp_path / "a" / "quality.json").read_text())
    assert set(quality["metrics"]) == set(TASKS) and quality["training"]["steps"] == 4
    assert (tmp_path / "a" / "samples.png").is_file()
    a, b = (TinyFillPolicy.from_pretrained(tmp_path / d) for d in "ab")
    for (n, pa), (_, pb) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert torch.equal(pa, pb), n  # interrupted + resumed == straight through
    assert torch.equal(a.prompt_encoder.text_model.embeddings.token_embedding.weight,
                       b.prompt_encoder.text_model.embeddings.token_embedding.weight)
    assert a.default_steps == 2 and not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_atomic_write_keeps_the_old_directory_on_failure(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "keep.txt").write_text("old")

    def failing(tmp):
        tmp.mkdir()
        (tmp / "half.txt").write_text("new")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        pretrain.write_atomically(out, failing)
    assert [p.name for p in tmp_path.iterdir()] == ["model"] and (out / "keep.txt").read_text() == "old"


# -- the shipped model --------------------------------------------------------------------------
def test_shipped_model_edits_held_out_conditions_well_above_chance(world):
    assert (SHIPPED_DIR / "tiny_fill.json").is_file(), "shipped weights missing: run python -m rl.pretrain"
    policy = TinyFillPolicy.from_pretrained()
    samples = world.held_out("fill", 24) + world.held_out("removal", 8)
    b = collate(samples)
    cond = policy.encode(b.images, b.masks, b.prompts)
    x0 = sample_policy(policy, cond, sigmas=policy.schedule(), method="dpm2",
                       generator=torch.Generator().manual_seed(0))
    edited = policy.decode(x0, cond)
    keep = (1 - b.masks).expand_as(edited)
    torch.testing.assert_close(edited * keep, b.images * keep, atol=1e-5, rtol=0)  # blended exactly
    m = summarize(ground_truth_metrics(samples, edited))
    assert m["fill"]["colour_acc"] > 0.4  # chance is 1/6
    assert m["removal"]["residue"] < 0.2
