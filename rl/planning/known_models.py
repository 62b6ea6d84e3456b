"""Architecture configs of the Hub models the shipped configs name, for planning without a download.

`python -m rl.plan` builds each model on the meta device from its config: a local directory's
config files win, then the Hugging Face cache, then this table. Only the keys that decide the
modules and their sizes are kept (no weights, no tokenizer files).

Sources (architecture keys as published on the Hugging Face Hub):
- black-forest-labs/FLUX.1-Fill-dev: model_index.json and transformer/, vae/, text_encoder/,
  text_encoder_2/ config.json; the text encoders are the text tower of openai/clip-vit-large-patch14
  and the encoder of google/t5-v1_1-xxl; tokenizer_2's model_max_length is 512 (T5 tokens read).
  Cross-check: these configs give 11.90 B (transformer), 4.76 B (T5 encoder), 123 M (CLIP text) and
  83.8 M (VAE) parameters, i.e. 23.8 GB, 9.52 GB, 246 MB and 168 MB in bf16: the sizes reported for
  the bf16 checkpoints.
- black-forest-labs/FLUX.1-Kontext-dev: FLUX.1 [dev]'s transformer (in_channels 64: the source
  image enters as extra tokens, not as channels; guidance embedding), and FLUX.1 Fill's VAE, CLIP and
  T5 encoders and 512 T5 tokens (FluxKontextPipeline's max_sequence_length). 11.90 B transformer
  parameters, as FLUX.1 [dev].
- Qwen/Qwen2.5-VL-7B-Instruct and Qwen/Qwen2.5-VL-3B-Instruct: config.json (text decoder and
  vision_config). Cross-check: they give 8.29 B and 3.75 B parameters, the sizes the Hub lists.
- Qwen/Qwen-Image-Edit: transformer/ (QwenImageTransformer2DModel: 60 dual-stream blocks of 24 x 128,
  Qwen2.5-VL's 3584-wide states in, patch 2) and vae/ (AutoencoderKLQwenImage, z_dim 16, 8x down)
  config.json; its text_encoder is Qwen2.5-VL-7B-Instruct's model. Cross-check: 20.43 B transformer
  parameters ("20B") and a 127 M VAE.
"""
from __future__ import annotations

from typing import Any

_FLUX_VAE: dict[str, Any] = {
    "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3, "out_channels": 3, "latent_channels": 16, "layers_per_block": 2, "norm_num_groups": 32,
    "mid_block_add_attention": True, "sample_size": 1024, "scaling_factor": 0.3611, "shift_factor": 0.1159,
    "use_quant_conv": False, "use_post_quant_conv": False, "force_upcast": True,
}

_CLIP_L_TEXT: dict[str, Any] = {
    "model_type": "clip_text_model", "hidden_act": "quick_gelu", "hidden_size": 768, "intermediate_size": 3072,
    "num_attention_heads": 12, "num_hidden_layers": 12, "max_position_embeddings": 77, "vocab_size": 49408,
    "projection_dim": 768, "layer_norm_eps": 1e-5,
}

_T5_V1_1_XXL_ENCODER: dict[str, Any] = {
    "model_type": "t5", "d_model": 4096, "d_ff": 10240, "d_kv": 64, "num_heads": 64, "num_layers": 24,
    "vocab_size": 32128, "feed_forward_proj": "gated-gelu", "dense_act_fn": "gelu_new", "is_gated_act": True,
    "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128, "tie_word_embeddings": False,
    "layer_norm_epsilon": 1e-6,
}

#: pipelines: "pipeline" (model_index.json's class) and components: name -> (library, class name,
#: config); a FLUX pipeline's "tokenizer_2" holds only model_max_length (the T5 tokens the policy
#: reads: min(512, it))
KNOWN_PIPELINES: dict[str, dict[str, Any]] = {
    "black-forest-labs/FLUX.1-Fill-dev": {
        "pipeline": "FluxFillPipeline",
        "transformer": ("diffusers", "FluxTransformer2DModel", {
            "attention_head_dim": 128, "num_attention_heads": 24, "num_layers": 19, "num_single_layers": 38,
            "in_channels": 384, "out_channels": 64, "joint_attention_dim": 4096, "pooled_projection_dim": 768,
            "guidance_embeds": True, "axes_dims_rope": [16, 56, 56], "patch_size": 1}),
        "vae": ("diffusers", "AutoencoderKL", _FLUX_VAE),
        "text_encoder": ("transformers", "CLIPTextModel", _CLIP_L_TEXT),
        "text_encoder_2": ("transformers", "T5EncoderModel", _T5_V1_1_XXL_ENCODER),
        "tokenizer_2": ("transformers", "T5TokenizerFast", {"model_max_length": 512}),
    },
    "black-forest-labs/FLUX.1-Kontext-dev": {
        "pipeline": "FluxKontextPipeline",
        "transformer": ("diffusers", "FluxTransformer2DModel", {
            "attention_head_dim": 128, "num_attention_heads": 24, "num_layers": 19, "num_single_layers": 38,
            "in_channels": 64, "out_channels": None, "joint_attention_dim": 4096, "pooled_projection_dim": 768,
            "guidance_embeds": True, "axes_dims_rope": [16, 56, 56], "patch_size": 1}),
        "vae": ("diffusers", "AutoencoderKL", _FLUX_VAE),
        "text_encoder": ("transformers", "CLIPTextModel", _CLIP_L_TEXT),
        "text_encoder_2": ("transformers", "T5EncoderModel", _T5_V1_1_XXL_ENCODER),
        "tokenizer_2": ("transformers", "T5TokenizerFast", {"model_max_length": 512}),
    },
}

_QWEN25_VL_VISION: dict[str, Any] = {
    "depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "in_chans": 3, "patch_size": 14,
    "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31],
    "hidden_act": "silu", "tokens_per_second": 2,
}
_QWEN25_VL_COMMON: dict[str, Any] = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl", "hidden_act": "silu",
    "max_position_embeddings": 128000, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
}

#: chat VLM judges (AutoModelForImageTextToText): Hub id -> config.json's architecture keys
KNOWN_VLMS: dict[str, dict[str, Any]] = {
    "Qwen/Qwen2.5-VL-7B-Instruct": {
        **_QWEN25_VL_COMMON, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
        "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064, "tie_word_embeddings": False,
        "vision_config": {**_QWEN25_VL_VISION, "out_hidden_size": 3584}},
    "Qwen/Qwen2.5-VL-3B-Instruct": {
        **_QWEN25_VL_COMMON, "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
        "num_attention_heads": 16, "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True,
        "vision_config": {**_QWEN25_VL_VISION, "out_hidden_size": 2048}},
}

#: Qwen/Qwen-Image-Edit (QwenImageEditPipeline): its text encoder is Qwen2.5-VL-7B-Instruct's model
KNOWN_PIPELINES["Qwen/Qwen-Image-Edit"] = {
    "pipeline": "QwenImageEditPipeline",
    "transformer": ("diffusers", "QwenImageTransformer2DModel", {
        "patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": 60, "attention_head_dim": 128,
        "num_attention_heads": 24, "joint_attention_dim": 3584, "guidance_embeds": False,
        "axes_dims_rope": [16, 56, 56]}),
    "text_encoder": ("transformers", "Qwen2_5_VLForConditionalGeneration", KNOWN_VLMS["Qwen/Qwen2.5-VL-7B-Instruct"]),
    "vae": ("diffusers", "AutoencoderKLQwenImage", {
        "base_dim": 96, "z_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_scales": [],
        "temperal_downsample": [False, True, True], "dropout": 0.0}),
}
