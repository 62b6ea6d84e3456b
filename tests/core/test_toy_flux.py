"""The toy FLUX.1 Fill (core/toy_flux): locally built tokenizers, a genuine FluxFillPipeline that
diffusers saves, loads and runs, FluxFillPolicy on it at the world's 64x64, and exactly resumable
VAE training. Everything at tiny widths: seconds on a CPU, no downloads."""
import itertools
import json
import math
import random

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, FluxFillPipeline
from diffusers.pipelines.flux.pipeline_flux_fill import calculate_shift
from PIL import Image
from transformers import CLIPTokenizer, T5TokenizerFast

from core.io.tensor_store import StoreError
from core.policies.flux_fill import FluxFillPolicy
from core.sampling.schedules import flux_sigmas
from core.synthetic.glyphs import GLYPHS
from core.synthetic.world import BACKGROUNDS, COLOURS, SHAPES, SyntheticWorld, collate
from core.tasks import EXTEND_NO_PROMPT, REMOVAL_PROMPT, TASKS
from core.toy_flux.build import (
    ClipSpec,
    T5Spec,
    ToyFluxSpec,
    TransformerSpec,
    VAESpec,
    build_toy_pipeline,
    check_spec,
    rope_axes,
    save_toy_pipeline,
)
from core.toy_flux.state import find_checkpoint, load_state, save_checkpoint, save_state
from core.toy_flux.tokenizers import (
    build_clip_tokenizer,
    build_t5_tokenizer,
    learn_merges,
    world_words,
)
from core.toy_flux.vae_training import CHECKPOINT, VAETrainConfig, train_vae

SIZE, TEXT_LEN = 64, 16
TINY_VAE = VAESpec(block_out_channels=(8, 8, 8), latent_channels=4, norm_num_groups=4)
TINY = ToyFluxSpec(
    image_size=SIZE, vae=TINY_VAE, clip=ClipSpec(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=37),
    t5=T5Spec(d_model=32, num_layers=1, num_heads=2, d_ff=37),
    transformer=TransformerSpec(num_layers=1, num_single_layers=1, num_attention_heads=2, attention_head_dim=16))


def world_prompts() -> list[str]:
    """Every prompt the world can write (core/synthetic/world.py's templates over its words)."""
    objects = [f"{c} {s}" for c, s in itertools.product(COLOURS, SHAPES)]
    prompts = [f"a {o}" for o in objects] + [REMOVAL_PROMPT, EXTEND_NO_PROMPT]
    for bg in BACKGROUNDS.values():
        prompts += [f"a {bg} background"] + [f"a {bg} background with a {o}" for o in objects]
    texts = list(GLYPHS) + ["".join(p) for p in itertools.product(GLYPHS, repeat=2)]
    return prompts + [f'the text "{t}"' for t in texts]


def test_world_prompts_cover_the_world():
    world, rng = SyntheticWorld(), random.Random(0)
    assert {world.sample(t, rng.randrange(10**6)).prompt for t in TASKS for _ in range(25)} <= set(world_prompts())


def test_tokenizers_round_trip_and_keep_world_words_whole(tmp_path):
    clip, t5 = build_clip_tokenizer(max_length=TEXT_LEN), build_t5_tokenizer(max_length=TEXT_LEN)
    clip.save_pretrained(tmp_path / "clip")
    t5.save_pretrained(tmp_path / "t5")
    clip2 = CLIPTokenizer.from_pretrained(tmp_path / "clip")
    t5_2 = T5TokenizerFast.from_pretrained(tmp_path / "t5")
    assert (clip2.model_max_length, t5_2.model_max_length) == (TEXT_LEN, TEXT_LEN)
    assert (t5_2.pad_token_id, t5_2.eos_token_id, t5_2.unk_token_id) == (0, 1, 2)
    assert clip2.bos_token_id != clip2.eos_token_id == clip2.pad_token_id != 2  # CLIP pools at the first eos
    prompts = world_prompts()
    for name, a, b in (("clip", clip, clip2), ("t5", t5, t5_2)):
        ids = b(prompts, padding="max_length", max_length=TEXT_LEN, truncation=False).input_ids
        assert ids == a(prompts, padding="max_length", max_length=TEXT_LEN, truncation=False).input_ids, name
        assert all(len(row) == TEXT_LEN for row in ids), name  # nothing longer than the padded length
    for prompt in prompts:
        # one token per word, digit and punctuation mark: nothing unknown, nothing spelt out
        pieces = prompt.replace('"', ' " ').replace(",", " , ").split()
        pieces = [c for p in pieces for c in (list(p) if p.isdigit() else [p])]
        clip_tokens = clip2.tokenize(prompt)
        assert [t.removesuffix("</w>") for t in clip_tokens] == pieces, prompt
        t5_ids = t5_2(prompt).input_ids
        assert t5_2.unk_token_id not in t5_ids and t5_ids[-1] == t5_2.eos_token_id
        assert t5_2.decode(t5_ids, skip_special_tokens=True) == prompt
    assert set(world_words()) >= {w for w in " ".join(prompts).replace('"', " ").replace(",", " ").split()
                                  if w.isalpha()}
    # words outside the world still encode: CLIP spells them in bytes, T5 in characters
    assert clip2.eos_token_id not in clip2("zebra!").input_ids[1:-1]
    assert t5_2.unk_token_id not in t5_2("Zebra!").input_ids


def test_learned_merges_are_deterministic_and_complete():
    words = ["red", "remove", "region", "textured", "text", "the"]
    assert learn_merges(words) == learn_merges(list(reversed(words)))
    assert {a + b for a, b in learn_merges(words)} >= {w[:-1] + w[-1] + "</w>" for w in words}


def test_spec_checks_and_rope_axes():
    assert rope_axes(128) == (16, 56, 56) and rope_axes(32) == (4, 14, 14) and sum(rope_axes(48)) == 48
    assert ToyFluxSpec().transformer_channels == (8 * 8 + 4 * 16, 4 * 8)
    assert ToyFluxSpec().image_seq_len == 64
    with pytest.raises(ValueError, match="divisible by norm_num_groups"):
        check_spec(ToyFluxSpec(vae=VAESpec(block_out_channels=(12, 16, 16))))
    with pytest.raises(ValueError, match="image_size 36"):
        check_spec(ToyFluxSpec(image_size=36))
    with pytest.raises(ValueError, match="sum to attention_head_dim"):
        check_spec(ToyFluxSpec(transformer=TransformerSpec(axes_dims_rope=(4, 8, 8))))
    assert ToyFluxSpec.from_dict(json.loads(json.dumps(TINY.to_dict()))) == TINY


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("toy_flux")
    save_toy_pipeline(build_toy_pipeline(TINY), path, TINY)
    return path


def edit_call(seed=0):
    image = Image.new("RGB", (SIZE, SIZE), (90, 140, 200))
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (16, 12, 44, 40))
    return dict(prompt="a red circle", image=image, mask_image=mask, height=SIZE, width=SIZE, num_inference_steps=4,
                guidance_scale=30.0, max_sequence_length=TEXT_LEN, generator=torch.Generator().manual_seed(seed))


def test_pipeline_saves_loads_and_runs_with_diffusers(toy_dir):
    assert (toy_dir / "model_index.json").is_file()
    assert ToyFluxSpec.from_dict(json.loads((toy_dir / "toy_flux.json").read_text())) == TINY
    built = build_toy_pipeline(TINY)
    pipe = FluxFillPipeline.from_pretrained(toy_dir)
    pipe.set_progress_bar_config(disable=True)
    built.set_progress_bar_config(disable=True)
    for name in ("vae", "text_encoder", "text_encoder_2", "transformer"):
        saved, fresh = getattr(pipe, name).state_dict(), getattr(built, name).state_dict()
        assert saved.keys() == fresh.keys() and all(torch.equal(saved[k], fresh[k]) for k in saved), name
    assert pipe.vae_scale_factor == 4 and pipe.tokenizer_max_length == TEXT_LEN
    assert pipe.vae.config.shift_factor == 0.0 and pipe.vae.config.scaling_factor == 1.0
    out = pipe(**edit_call()).images[0]
    assert isinstance(out, Image.Image) and out.size == (SIZE, SIZE)
    again = built(**edit_call(), output_type="pt").images
    torch.testing.assert_close(pipe(**edit_call(), output_type="pt").images, again)


def test_scheduler_gives_shift_3_at_native_size(toy_dir):
    pipe = FluxFillPipeline.from_pretrained(toy_dir)
    sc = pipe.scheduler.config
    assert sc.use_dynamic_shifting and (sc.base_image_seq_len, sc.max_image_seq_len) == (16 * 16 // 4, 1024)
    assert math.isclose(sc.max_shift - sc.base_shift, 0.65)
    # as FluxFillPipeline sets it for a 64x64 image (64 tokens, so mu = base_shift)
    mu = calculate_shift(64, sc.base_image_seq_len, sc.max_image_seq_len, sc.base_shift, sc.max_shift)
    pipe.scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 8, 8), mu=mu)
    torch.testing.assert_close(pipe.scheduler.sigmas, flux_sigmas(8, shift=3.0), rtol=0, atol=1e-6)


def test_flux_fill_policy_runs_the_toy_on_world_batches(toy_dir):
    policy = FluxFillPolicy.from_pretrained(toy_dir, max_sequence_length=TEXT_LEN, image_size=SIZE)
    world = SyntheticWorld(size=SIZE)
    batch = collate([world.sample(task, i) for task in TASKS for i in range(2)])
    cond = policy.encode(batch.images, batch.masks, batch.prompts)
    c, f = TINY.vae.latent_channels, TINY.vae.scale_factor
    tokens = (SIZE // (2 * f)) ** 2
    assert cond.x0_known.shape == (8, tokens, 4 * c) and cond.cond_latents.shape == (8, tokens, 4 * c + 4 * f * f)
    assert cond.prompt_embeds.shape == (8, TEXT_LEN, TINY.t5.d_model)
    assert cond.pooled.shape == (8, TINY.clip.hidden_size)
    assert cond.guidance.tolist() == [30.0] * 8 and cond.latent_hw == (SIZE // f,) * 2
    x = torch.randn(cond.x0_known.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        v = policy.velocity(x, torch.full((8,), 0.6), cond)
        images = policy.decode(cond.x0_known, cond)
    assert v.shape == x.shape and torch.isfinite(v).all()
    assert images.shape == (8, 3, SIZE, SIZE) and 0 <= float(images.min()) <= float(images.max()) <= 1
    torch.testing.assert_close(policy.schedule(8), flux_sigmas(8, shift=3.0), rtol=0, atol=1e-6)


def test_state_store_round_trips_exactly(tmp_path):
    value = {"step": 3, "lr": 0.1 + 0.2, "nan": float("nan"), "ids": {0: torch.arange(3), 7: (1, "a")},
             "nested": [torch.randn(2, 2, dtype=torch.float64), None, True],
             "bytes": torch.Generator().manual_seed(1).get_state()}
    save_checkpoint(value, tmp_path / "ckpt")
    save_checkpoint({**value, "step": 4}, tmp_path / "ckpt")  # replaces the previous one
    back = load_state(find_checkpoint(tmp_path / "ckpt"))
    assert back["step"] == 4 and back["lr"] == 0.1 + 0.2 and math.isnan(back["nan"])
    assert list(back["ids"]) == [0, 7] and back["ids"][7] == (1, "a") and torch.equal(back["ids"][0], torch.arange(3))
    assert torch.equal(back["nested"][0], value["nested"][0]) and back["nested"][1:] == [None, True]
    assert torch.equal(back["bytes"], value["bytes"]) and back["bytes"].dtype == torch.uint8
    with pytest.raises(StoreError, match="cannot store"):
        save_state({"x": object()}, tmp_path / "bad")


def assert_same_tree(a, b, path=""):
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert list(a) == list(b), path
        for k in a:
            if k != "time":  # wall-clock stamps of the evaluations
                assert_same_tree(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tree(x, y, f"{path}/{i}")
    else:
        assert a == b, (path, a, b)


def test_vae_training_resumes_exactly(tmp_path):
    cfg = VAETrainConfig(vae=TINY_VAE, steps=5, batch_size=3, image_size=32, warmup=2, eval_every=2,
                         eval_per_task=2, checkpoint_every=2)
    straight = train_vae(tmp_path / "straight", cfg, progress=False)
    assert straight["done"] and [h["step"] for h in straight["history"]] == [2, 4, 5]
    for stop in (1, 2, None):  # pieces of 1, 2 and the remaining 2 steps
        split = train_vae(tmp_path / "split", cfg, stop_after=stop, progress=False)
    assert split["done"] and split["step"] == 5
    assert_same_tree(load_state(tmp_path / "straight" / CHECKPOINT), load_state(tmp_path / "split" / CHECKPOINT))
    text = straight["history"][-1]["eval"]["text"]
    assert {"psnr", "psnr_mask", "glyph_acc"} <= set(text)
    with pytest.raises(ValueError, match="another config"):
        train_vae(tmp_path / "split", VAETrainConfig(**{**cfg.__dict__, "lr": 0.5}), progress=False)
    # the exported VAE carries its fitted latent scaling and plugs into a pipeline of its spec
    vae = AutoencoderKL.from_pretrained(tmp_path / "split" / "vae")
    assert vae.config.scaling_factor != 1.0 and vae.config.shift_factor != 0.0
    pipe = build_toy_pipeline(ToyFluxSpec(**{**TINY.__dict__, "image_size": 32}), vae=vae)
    assert pipe.vae is vae
    with pytest.raises(ValueError, match="latent channels"):
        build_toy_pipeline(ToyFluxSpec(**{**TINY.__dict__, "vae": VAESpec(latent_channels=8)}), vae=vae)


def test_the_shipped_toy_runs_with_diffusers_own_pipeline_and_edits_inside_the_mask():
    """core/assets/toy_flux as a user loads it: FluxFillPipeline.from_pretrained and diffusers' call."""
    from core.synthetic.world import SyntheticWorld
    from core.toy_flux import shipped_model_dir

    pipe = FluxFillPipeline.from_pretrained(shipped_model_dir())
    pipe.set_progress_bar_config(disable=True)
    sample = SyntheticWorld(size=64, seed=0).sample("fill", 0, "heldout")
    image = Image.fromarray((sample.source.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    mask = Image.fromarray((sample.mask[0].numpy() * 255).astype(np.uint8))
    out = pipe(prompt=sample.prompt, image=image, mask_image=mask, height=64, width=64, num_inference_steps=8,
               max_sequence_length=pipe.tokenizer_2.model_max_length, guidance_scale=30.0, output_type="pt",
               generator=torch.Generator().manual_seed(0)).images[0]
    assert out.shape == (3, 64, 64) and torch.isfinite(out).all()
    inside = sample.mask.bool().expand_as(out)
    # the edit happens in the mask (the source's masked region is unlike the target), the rest is kept
    changed = (out - sample.source).abs()
    assert float(changed[inside].mean()) > 3 * float(changed[~inside].mean())
    assert float((out - sample.target).abs()[~inside].mean()) < 0.05
