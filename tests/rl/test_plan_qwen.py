"""rl.plan on Qwen-Image-Edit: its architecture (known and from a directory of config files) and its
text and image tokens. (Its activation formula is checked beside FLUX's in tests/rl/test_plan.py.)"""
import json
from pathlib import Path

import torch
from diffusers import QwenImageTransformer2DModel

from rl.planning.architectures import QWEN_TEXT_OVERHEAD, pipeline_architecture
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
