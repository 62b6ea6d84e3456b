"""rl.plan on Qwen-Image-Edit: its architecture (known and from a directory of config files), its
text tokens, and the activation formula against a measured QwenImageTransformer2DModel forward."""
import json
from pathlib import Path

import pytest
import torch
from activation_probe import Storages, measure_kept_bytes
from diffusers import QwenImageTransformer2DModel

from core.policies.lora import lora_config
from rl.planning.architectures import QWEN_TEXT_OVERHEAD, pipeline_architecture
from rl.planning.flux_activations import (
    Batch,
    FluxDims,
    Training,
    backward_working_bytes,
    no_grad_peak_bytes,
    saved_bytes,
)
from rl.planning.known_models import KNOWN_PIPELINES
from rl.planning.loading import load_for_plan
from rl.planning.memory_plan import make_plan

ROOT = Path(__file__).resolve().parents[2]
QWEN = str(ROOT / "configs" / "qwen_image_edit_nft_vllm.yaml")
ACTIVATION_TOLERANCE = 0.10  # measured: within 5.2% over these shapes, dtypes and trainings
TINY = {"patch_size": 2, "in_channels": 16, "out_channels": 4, "num_layers": 3, "attention_head_dim": 32,
        "num_attention_heads": 2, "joint_attention_dim": 40, "axes_dims_rope": (8, 12, 12)}
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


def test_known_qwen_image_edit_matches_the_published_size():
    cfg, _ = load_for_plan(QWEN)
    plan = make_plan(cfg, gpus=8)
    params = {r.label.split(" (")[0]: r.params for r in plan.rows if r.group == "weights"}
    assert round(params["transformer"] / 1e9, 2) == 20.43  # "Qwen-Image, a 20B MMDiT"
    assert round(params["text encoder"] / 1e9, 2) == 8.29   # Qwen2.5-VL-7B-Instruct
    assert round(params["VAE"] / 1e6) == 127
    assert plan.verdict == "fits"


def test_qwen_text_and_image_tokens():
    arch = pipeline_architecture("Qwen/Qwen-Image-Edit", "qwen_image_edit")
    assert arch.pipeline == "QwenImageEditPipeline" and arch.latent_factor() == 16
    # 512 px: Qwen2.5-VL's processor rounds to 504 = 18 x 28, 324 image tokens
    assert arch.text_tokens_at(512) == 18 * 18 + QWEN_TEXT_OVERHEAD
    assert arch.text_tokens_at(4096) == 1024  # the policy's cap
    cfg, _ = load_for_plan(QWEN)
    plan = make_plan(cfg)
    # the source image's tokens are appended to the generated ones, as the pipeline does
    assert "2048 image + 388 text tokens" in " ".join(plan.header)


def test_a_local_qwen_directory_of_config_files_is_read(tmp_path):
    known = {k: v for k, v in KNOWN_PIPELINES["Qwen/Qwen-Image-Edit"].items() if k != "pipeline"}
    (tmp_path / "model_index.json").write_text(json.dumps(
        {"_class_name": "QwenImageEditPipeline", **{name: [lib, cls] for name, (lib, cls, _) in known.items()}}))
    for name, (_, _, config) in known.items():
        (tmp_path / name).mkdir()
        small = {**config, "num_layers": 2} if name == "transformer" else config
        (tmp_path / name / "config.json").write_text(json.dumps(small))
    arch = pipeline_architecture(str(tmp_path), "qwen_image_edit")
    assert [c.name for c in arch.components] == ["transformer", "text_encoder", "vae"]
    cfg, _ = load_for_plan(QWEN, [f"model.path={tmp_path}"])
    with torch.device("meta"):
        transformer = QwenImageTransformer2DModel.from_config({**known["transformer"][2], "num_layers": 2})
    expected = sum(p.numel() for p in transformer.parameters())
    assert make_plan(cfg).row("transformer").params == expected < 1e9


def tiny_qwen(dtype, lora: bool, checkpointing: bool):
    torch.manual_seed(0)
    model = QwenImageTransformer2DModel(**TINY).to(dtype)
    training = Training()
    if lora:  # as Policy.add_lora: only adapters train, kept in float32
        model.requires_grad_(False)
        model.add_adapter(lora_config(model, r=4, alpha=8, targets=TARGETS), adapter_name="default")
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        training = Training(frozenset(TARGETS), 4, torch.float32)
    if checkpointing:
        model.enable_gradient_checkpointing()
    return model, training


def qwen_inputs(model, batch: int, image_tokens: int, text_tokens: int, dtype, rows: int = 8) -> dict:
    c = model.config
    return {"hidden_states": torch.randn(batch, image_tokens, c.in_channels, dtype=dtype),
            "encoder_hidden_states": torch.randn(batch, text_tokens, c.joint_attention_dim, dtype=dtype),
            "encoder_hidden_states_mask": torch.ones(batch, text_tokens, dtype=dtype),
            "timestep": torch.rand(batch, dtype=dtype), "img_shapes": [[(1, rows, image_tokens // rows)]] * batch,
            "return_dict": False}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_activation_formula_matches_a_measured_qwen_forward(dtype, lora, checkpointing):
    model, training = tiny_qwen(dtype, lora, checkpointing)
    dims = FluxDims.from_config(TINY, "QwenImageTransformer2DModel")
    assert dims.single_blocks == 0 and dims.double_blocks == 3
    grads = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    for batch, image_tokens, text_tokens, check_update in ((1, 64, 16, False), (3, 128, 8, True)):
        alive, saved, peak = measure_kept_bytes(
            model, lambda: qwen_inputs(model, batch, image_tokens, text_tokens, dtype))
        assert alive >= saved > 0
        shape = Batch(batch, image_tokens, text_tokens, dtype, checkpointing, fused_rms_norm=False)
        formula = saved_bytes(dims, training, shape)
        assert abs(formula / alive - 1) < ACTIVATION_TOLERANCE, (batch, image_tokens, text_tokens, formula, alive)
        if check_update:
            update = formula + backward_working_bytes(dims, training, shape) + grads
            assert 0.9 * peak < update < 1.5 * peak, (update, peak)
        model.zero_grad(set_to_none=True)


def test_no_grad_estimate_is_near_a_measured_qwen_peak():
    model, _ = tiny_qwen(torch.bfloat16, lora=False, checkpointing=False)
    dims = FluxDims.from_config(TINY, "QwenImageTransformer2DModel")
    for batch, image_tokens, text_tokens in ((2, 128, 16), (4, 256, 32)):
        inputs = qwen_inputs(model, batch, image_tokens, text_tokens, torch.bfloat16)
        mode = Storages(model)
        with torch.no_grad(), mode:
            model(**inputs)
        estimate = no_grad_peak_bytes(dims, batch, image_tokens, text_tokens, torch.bfloat16)
        assert abs(estimate / mode.peak - 1) < 0.25, (estimate, mode.peak)
