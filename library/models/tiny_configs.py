"""Configs of the tiny SDXL-shaped models used by tests, the demo and benchmarks.

They keep SDXL's real block layout (three levels, two layers per block, no attention at the first level, 8x VAE,
two CLIP text encoders with the real vocabulary) so that module paths, LoRA and LLLite names are the real ones;
only widths, head counts and depths shrink.
"""
from __future__ import annotations

TINY_SDXL_TE1 = dict(
    vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=32,
    bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
)
TINY_SDXL_TE2 = dict(
    vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
    max_position_embeddings=77, hidden_act="gelu", projection_dim=32,
    bos_token_id=49406, eos_token_id=49407, pad_token_id=0,
)
TINY_SDXL_UNET = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(32, 64, 64),
    layers_per_block=2,
    transformer_layers_per_block=(1, 1, 1),
    attention_head_dim=(2, 4, 4),
    cross_attention_dim=64,  # te1 hidden + te2 hidden, as SDXL concatenates them
    norm_num_groups=16,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=6 * 8 + 32,  # six size/crop numbers + te2 pooled projection
)
TINY_SDXL_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(16, 32, 32, 32),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=64,
    scaling_factor=0.13025,
)
