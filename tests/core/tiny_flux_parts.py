"""Tiny FLUX pipeline parts built from configs for the policy tests (no downloads): CLIP and T5
with tokenizers built in memory over single letters, a two-level AutoencoderKL (scale factor 2,
2 latent channels: 8 packed channels per token), a one-block FluxTransformer2DModel with FLUX dev's
guidance embedding, and FLUX.1's scheduler config. test_flux_fill and test_flux_kontext share it."""
import string

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

LATENT_CHANNELS = 2   # packed: 8 per token
VAE_FACTOR = 2


def tiny_flux_parts(size: int, transformer_in_channels: int) -> dict:
    """Keyword arguments of a FLUX pipeline class (FluxFillPipeline, FluxKontextPipeline, ...)
    whose transformer takes `transformer_in_channels` per token and predicts 8."""
    letters = string.ascii_lowercase
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in letters:
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    clip_tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16)
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    pieces += [(c, -2.0) for c in letters] + [("\u2581" + c, -1.5) for c in letters]
    t5_tokenizer = T5Tokenizer(vocab=pieces, extra_ids=0)
    torch.manual_seed(0)
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=16, projection_dim=32, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    t5 = T5EncoderModel(T5Config(vocab_size=len(pieces), d_model=32, d_ff=37, d_kv=8, num_layers=2, num_heads=4,
                                 relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1))
    # two VAE levels: scale factor 2, so a Fill mask folds 2x2 -> 4 channels, packed -> 16
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=(8, 8), layers_per_block=1,
                        latent_channels=LATENT_CHANNELS, norm_num_groups=2, sample_size=size, scaling_factor=1.5,
                        shift_factor=0.1, use_quant_conv=True, use_post_quant_conv=False)
    with torch.no_grad():  # posterior std ~ e^-15: a pipeline's posterior sample equals our mode
        vae.quant_conv.weight[2:] = 0
        vae.quant_conv.bias[2:] = -30.0
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=transformer_in_channels, out_channels=4 * LATENT_CHANNELS, num_layers=1,
        num_single_layers=1, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
        pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=[4, 4, 8])
    scheduler = FlowMatchEulerDiscreteScheduler(  # FLUX.1 [dev]'s (and Fill's, Kontext's) scheduler config
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096)
    return dict(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=clip_tokenizer,
                text_encoder_2=t5, tokenizer_2=t5_tokenizer, transformer=transformer)
