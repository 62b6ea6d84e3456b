"""The toy instruction editor's pretraining (core.toy_flux.instruction_training) at test size: the warm
start from a Fill toy keeps what both models share, training resumes exactly in pieces, and
`python -m rl.pretrain --instruction` writes a FluxKontextPipeline directory with quality.json."""
import json

import pytest
import torch
from diffusers import FluxFillPipeline, FluxKontextPipeline

import rl.pretrain
from core.policies.flux_kontext import FluxKontextPolicy
from core.synthetic.instruction_world import INSTRUCTION_WORDS
from core.tasks import INSTRUCTION_TASKS
from core.toy_flux.build import (
    ToyFluxSpec,
    TransformerSpec,
    VAESpec,
    build_toy_pipeline,
    save_toy_pipeline,
)
from core.toy_flux.editor_training import CHECKPOINT, MODEL
from core.toy_flux.instruction_training import (
    InstructionTrainConfig,
    kontext_from_fill,
    token_mask,
    train_instruction_editor,
)
from core.toy_flux.state import load_state

SMALL = ToyFluxSpec(image_size=32, vae=VAESpec(block_out_channels=(8, 8, 8), latent_channels=4, norm_num_groups=4),
                    transformer=TransformerSpec(num_layers=1, num_single_layers=1, num_attention_heads=2,
                                                attention_head_dim=16))


@pytest.fixture(scope="module")
def small_fill(tmp_path_factory):
    """A small random toy Fill pipeline on disk (the warm start's base)."""
    out = tmp_path_factory.mktemp("fill")
    save_toy_pipeline(build_toy_pipeline(SMALL), out, SMALL)
    return out


def config(**kw) -> InstructionTrainConfig:
    base = dict(steps=4, batch_size=2, warmup=1, eval_every=2, eval_per_task=1, eval_steps=2, checkpoint_every=2)
    return InstructionTrainConfig(**{**base, **kw})


def test_warm_start_keeps_what_fill_and_kontext_share(small_fill):
    fill = FluxFillPipeline.from_pretrained(small_fill)
    pipe, spec = kontext_from_fill(small_fill)
    assert isinstance(pipe, FluxKontextPipeline) and spec.pipeline == "kontext"
    c = SMALL.vae.latent_channels
    assert pipe.transformer.config.in_channels == 4 * c == pipe.transformer.config.out_channels
    # the noisy latents' input columns and every block are Fill's; the masked-image / mask columns are gone
    assert torch.equal(pipe.transformer.x_embedder.weight, fill.transformer.x_embedder.weight[:, :4 * c])
    assert torch.equal(pipe.transformer.proj_out.weight, fill.transformer.proj_out.weight)
    # a world word keeps its trained row in both encoders; an instruction word is one new token
    for enc, tok in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
        new_vocab, old_vocab = getattr(pipe, tok).get_vocab(), getattr(fill, tok).get_vocab()
        word = next(t for t in old_vocab if "circle" in t)
        new_row = getattr(pipe, enc).get_input_embeddings().weight[new_vocab[word]]
        assert torch.equal(new_row, getattr(fill, enc).get_input_embeddings().weight[old_vocab[word]])
        assert len(getattr(pipe, tok).tokenize("make")) == 1 and not any("make" in t for t in old_vocab)
    with pytest.raises(FileNotFoundError, match="no toy Fill pipeline"):
        kontext_from_fill(small_fill / "nowhere")


def test_token_mask_marks_the_tokens_a_region_touches(small_fill):
    pipe, spec = kontext_from_fill(small_fill)
    policy = FluxKontextPolicy(pipe, image_size=32)
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 0, 0] = 1  # one pixel: the first token only (a token packs 2f x 2f = 8 x 8 pixels)
    mask[..., 31, 31] = 1
    tokens = token_mask(mask, policy)
    assert tokens.shape == (1, 16, 1) and tokens.sum() == 2 and tokens[0, 0, 0] == 1 and tokens[0, 15, 0] == 1


def test_instruction_training_resumes_exactly_and_saves_a_kontext_pipeline(small_fill, tmp_path):
    from tests.core.test_toy_flux_training import same_tree

    cfg = config()
    straight = train_instruction_editor(tmp_path / "straight", small_fill, cfg, progress=False)
    assert straight["done"] and [h["step"] for h in straight["history"]] == [2, 4]
    assert set(straight["history"][-1]["eval"]) == set(INSTRUCTION_TASKS)
    assert {"colour_acc", "psnr_keep"} <= set(straight["history"][-1]["eval"]["recolour"])
    for stop in (1, 2, None):
        split = train_instruction_editor(tmp_path / "split", small_fill, cfg, stop_after=stop, progress=False)
    assert split["done"] and split["step"] == 4 and split["ran"] == 1
    same_tree(load_state(tmp_path / "straight" / CHECKPOINT), load_state(tmp_path / "split" / CHECKPOINT))
    with pytest.raises(ValueError, match="another config"):
        train_instruction_editor(tmp_path / "split", small_fill, config(keep_weight=1.0), progress=False)
    state = load_state(tmp_path / "straight" / CHECKPOINT)
    policy = FluxKontextPolicy.from_pretrained(tmp_path / "straight" / MODEL)
    for name, p in policy.model.named_parameters():
        assert torch.equal(p, state["ema"][f"transformer.{name}"]), name
    # the toy's closed vocabulary is the instruction one: instruction words pass, others are named
    assert set(INSTRUCTION_WORDS) <= policy.known_words
    assert policy.prompt_problem("make the red circle blue") is None
    assert "outside the toy model's vocabulary" in policy.prompt_problem("paint the red circle blue")


def test_rl_pretrain_instruction_writes_a_model_with_quality(small_fill, tmp_path):
    out, work = tmp_path / "toy_kontext", tmp_path / "work"
    args = ["--instruction", "--base", str(small_fill), "--out", str(out), "--work", str(work),
            "--set", "instruction.steps=2", "--set", "instruction.batch_size=2", "--set", "instruction.warmup=1",
            "--set", "instruction.eval_every=0", "--set", "instruction.eval_per_task=1",
            "--set", "instruction.eval_steps=2", "--set", "eval_per_task=1", "--set", "eval_steps=2"]
    rl.pretrain.main(args + ["--stop-after", "1"])
    assert not out.exists()  # a piece: nothing written yet
    rl.pretrain.main(args)
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "FluxKontextPipeline"
    quality = json.loads((out / "quality.json").read_text())
    assert set(quality["metrics"]) == set(INSTRUCTION_TASKS) and quality["training"]["steps"] == 2
    assert (out / "samples.png").is_file()
    assert json.loads((out / "toy_flux.json").read_text())["pipeline"] == "kontext"
