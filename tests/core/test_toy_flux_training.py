"""Pretraining of the toy FLUX.1 Fill's editor and the whole `python -m rl.pretrain` pipeline, at
test size: exact resume in pieces, a loadable FluxFillPipeline directory, quality.json."""
import json

import numpy as np
import pytest
import torch
from diffusers import FluxFillPipeline
from PIL import Image

import rl.pretrain
from core.policies.flux_fill import FluxFillPolicy
from core.toy_flux.build import TransformerSpec, VAESpec
from core.toy_flux.editor_training import (
    CHECKPOINT,
    MODEL,
    EditorTrainConfig,
    train_editor,
)
from core.toy_flux.state import load_state
from core.toy_flux.vae_training import VAETrainConfig, train_vae

SMALL_VAE = VAESpec(block_out_channels=(8, 8, 8), latent_channels=4, norm_num_groups=4)
SMALL_TRANSFORMER = TransformerSpec(num_layers=1, num_single_layers=1, num_attention_heads=2, attention_head_dim=16)


@pytest.fixture(scope="module")
def small_vae(tmp_path_factory):
    out = tmp_path_factory.mktemp("vae")
    train_vae(out, VAETrainConfig(vae=SMALL_VAE, steps=2, batch_size=2, image_size=32, warmup=1, eval_every=0,
                                  eval_per_task=1), progress=False)
    return out / "vae"


def editor_config(**kw) -> EditorTrainConfig:
    base = dict(transformer=SMALL_TRANSFORMER, steps=4, batch_size=2, warmup=1, eval_every=2, eval_per_task=1,
                eval_steps=2, checkpoint_every=2)
    return EditorTrainConfig(**{**base, **kw})


def same_tree(a, b, path=""):
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert list(a) == list(b), path
        for k in a:
            if k != "time":
                same_tree(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            same_tree(x, y, f"{path}/{i}")
    else:
        assert a == b, (path, a, b)


def test_editor_training_resumes_exactly_and_saves_a_pipeline(small_vae, tmp_path):
    cfg = editor_config()
    straight = train_editor(tmp_path / "straight", small_vae, cfg, progress=False)
    assert straight["done"] and [h["step"] for h in straight["history"]] == [2, 4]
    assert {"glyph_acc", "psnr_mask"} <= set(straight["history"][-1]["eval"]["text"])
    for stop in (1, 2, None):  # pieces of 1, 2 and the remaining step
        split = train_editor(tmp_path / "split", small_vae, cfg, stop_after=stop, progress=False)
    assert split["done"] and split["step"] == 4 and split["ran"] == 1
    same_tree(load_state(tmp_path / "straight" / CHECKPOINT), load_state(tmp_path / "split" / CHECKPOINT))
    with pytest.raises(ValueError, match="another config"):
        train_editor(tmp_path / "split", small_vae, editor_config(lr=0.5), progress=False)

    # the saved model is the EMA of every trained part, in a directory diffusers loads
    state = load_state(tmp_path / "straight" / CHECKPOINT)
    policy = FluxFillPolicy.from_pretrained(tmp_path / "straight" / MODEL)
    assert policy.max_sequence_length == 16 and policy.image_size == (32, 32)
    for name, p in policy.model.named_parameters():
        assert torch.equal(p, state["ema"][f"transformer.{name}"]), name
    for name, p in policy.pipe.text_encoder_2.named_parameters():
        assert torch.equal(p, state["ema"][f"text_encoder_2.{name}"]), name


def test_editor_training_changes_the_text_encoders(small_vae, tmp_path):
    from core.toy_flux.editor_training import build_policy

    fresh, _ = build_policy(small_vae, editor_config())
    trained = train_editor(tmp_path, small_vae, editor_config(steps=2, eval_every=0), progress=False)["policy"]
    for part in ("text_encoder", "text_encoder_2", "transformer"):
        before = dict(getattr(fresh.pipe, part).named_parameters())
        moved = [n for n, p in getattr(trained.pipe, part).named_parameters() if not torch.equal(p, before[n])]
        assert moved, part


def test_pretrain_runs_in_pieces_and_writes_a_loadable_model(tmp_path, capsys):
    out, work = tmp_path / "model", tmp_path / "work"
    sets = ["vae.steps=2", "vae.batch_size=2", "vae.image_size=32", "vae.warmup=1", "vae.eval_every=0",
            "vae.eval_per_task=1", "vae.vae.block_out_channels=[8, 8, 8]", "vae.vae.latent_channels=4",
            "vae.vae.norm_num_groups=4", "editor.steps=3", "editor.batch_size=2", "editor.warmup=1",
            "editor.eval_every=0", "editor.eval_per_task=1", "editor.eval_steps=2",
            "editor.transformer.num_layers=1", "editor.transformer.num_single_layers=1",
            "editor.transformer.num_attention_heads=2", "editor.transformer.attention_head_dim=16",
            "shifts=[1.0, 3.0]", "eval_per_task=2", "eval_steps=2"]
    argv = ["--out", str(out), "--work", str(work)] + [a for s in sets for a in ("--set", s)]
    rl.pretrain.main(argv + ["--stop-after", "1"])
    assert "VAE at step 1/2" in capsys.readouterr().out and not out.exists()
    rl.pretrain.main(argv + ["--stop-after", "2"])  # the VAE's last step, then one editor step
    assert "editor at step 1/3" in capsys.readouterr().out and not out.exists()
    rl.pretrain.main(argv)
    assert f"saved to {out}" in capsys.readouterr().out

    quality = json.loads((out / rl.pretrain.QUALITY_FILE).read_text())
    assert set(quality["metrics"]) == {"fill", "extend", "removal", "text"}
    assert quality["sampler"]["shift"] in (1.0, 3.0)
    assert set(quality["shift_choice"]["scores"]) == {"1.0", "3.0"}
    assert (out / rl.pretrain.GRID_FILE).is_file()
    # diffusers' own pipeline call runs the shipped directory, at the chosen shift
    pipe = FluxFillPipeline.from_pretrained(out)
    assert pipe.scheduler.config.base_shift == pytest.approx(np.log(quality["sampler"]["shift"]))
    image = Image.fromarray(np.full((32, 32, 3), 128, np.uint8))
    mask = Image.fromarray(np.pad(np.full((8, 8), 255, np.uint8), 12))
    edited = pipe(prompt="a red circle", image=image, mask_image=mask, height=32, width=32, max_sequence_length=16,
                  num_inference_steps=2, guidance_scale=30.0, generator=torch.Generator().manual_seed(0)).images[0]
    assert edited.size == (32, 32)

    rl.pretrain.main(argv + ["--eval-only"])  # re-evaluates, keeps the shift
    again = json.loads((out / rl.pretrain.QUALITY_FILE).read_text())
    assert again["metrics"] == quality["metrics"] and again["sampler"] == quality["sampler"]
