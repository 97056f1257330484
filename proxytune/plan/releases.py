"""Built-in configuration tables of the releases users name, so `plan` needs no download.

Values are the releases' own config files (diffusers/transformers field names); a field left out takes
the class default, which is the release's value. LlamaGen's come from its code (the Hub has only .pt
files), Lumina-mGPT 7B's from Chameleon 7B (the release's config.json is not public without the gated
tokenizer), Janus-Pro's from its language config (its vision tower and VQ are transformers' defaults,
which are Janus's).
"""

from __future__ import annotations

_CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
           "projection_dim": 768, "vocab_size": 49408, "max_position_embeddings": 77, "hidden_act": "quick_gelu"}
_CLIP_BIGG = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
              "projection_dim": 1280, "vocab_size": 49408, "max_position_embeddings": 77, "hidden_act": "gelu"}
_T5_XXL = {"vocab_size": 32128, "d_model": 4096, "d_ff": 10240, "d_kv": 64, "num_layers": 24, "num_heads": 64,
           "feed_forward_proj": "gated-gelu"}
_VAE = {"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "latent_channels": 4,
        "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4}
# sample_size: the releases' VAE tile (`synthesis.vae_tiling`); SD1.5's is 512 px
_VAE16 = {**_VAE, "latent_channels": 16, "use_quant_conv": False, "use_post_quant_conv": False, "sample_size": 1024}

# family, {component: (kind, config)}; the denoiser is "unet" or "transformer"
TEACHERS = {
    "stable-diffusion-v1-5": ("sd", {
        "unet": ("unet", {"block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": 768,
                          "attention_head_dim": 8, "layers_per_block": 2}),
        "text_encoder": ("clip", _CLIP_L),
        "vae": ("vae", {**_VAE, "sample_size": 512}),
    }),
    "stable-diffusion-xl-base-1.0": ("sdxl", {
        "unet": ("unet", {
            "block_out_channels": [320, 640, 1280], "attention_head_dim": [5, 10, 20], "cross_attention_dim": 2048,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "transformer_layers_per_block": [1, 2, 10], "use_linear_projection": True,
            "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256,
            "projection_class_embeddings_input_dim": 2816, "layers_per_block": 2}),
        "text_encoder": ("clip", _CLIP_L),
        "text_encoder_2": ("clip-projection", _CLIP_BIGG),
        "vae": ("vae", {**_VAE, "sample_size": 1024}),
    }),
    "stable-diffusion-3-medium-diffusers": ("sd3", {
        "transformer": ("sd3", {"attention_head_dim": 64, "caption_projection_dim": 1536, "in_channels": 16,
                                "joint_attention_dim": 4096, "num_attention_heads": 24, "num_layers": 24,
                                "out_channels": 16, "patch_size": 2, "pooled_projection_dim": 2048,
                                "pos_embed_max_size": 192, "sample_size": 128}),
        "text_encoder": ("clip-projection", _CLIP_L),
        "text_encoder_2": ("clip-projection", _CLIP_BIGG),
        "text_encoder_3": ("t5", _T5_XXL),
        "vae": ("vae", _VAE16),
    }),
    "FLUX.1-dev": ("flux", {
        "transformer": ("flux", {"attention_head_dim": 128, "guidance_embeds": True, "in_channels": 64,
                                 "joint_attention_dim": 4096, "num_attention_heads": 24, "num_layers": 19,
                                 "num_single_layers": 38, "patch_size": 1, "pooled_projection_dim": 768}),
        "text_encoder": ("clip", _CLIP_L),
        "text_encoder_2": ("t5", _T5_XXL),
        "vae": ("vae", {**_VAE16, "mid_block_add_attention": True}),
    }),
}
TEACHER_IDS = {
    "runwayml/stable-diffusion-v1-5": "stable-diffusion-v1-5",
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "stable-diffusion-v1-5",
    "stabilityai/stable-diffusion-xl-base-1.0": "stable-diffusion-xl-base-1.0",
    "stabilityai/stable-diffusion-3-medium-diffusers": "stable-diffusion-3-medium-diffusers",
    "black-forest-labs/FLUX.1-dev": "FLUX.1-dev",
}
# SD3 and FLUX prompt lengths of their T5 (diffusers' defaults, which proxytune passes)
T5_TOKENS = {"sd3": 256, "flux": 512}

_FLAN_T5_XL = {"vocab_size": 32128, "d_model": 2048, "d_ff": 5120, "d_kv": 64, "num_layers": 24, "num_heads": 32,
               "feed_forward_proj": "gated-gelu"}
_LLAMAGEN_VQ16 = {"in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * 5,
                  "up_block_types": ["UpDecoderBlock2D"] * 5, "block_out_channels": [128, 128, 256, 256, 512],
                  "layers_per_block": 2, "latent_channels": 256, "vq_embed_dim": 8, "num_vq_embeddings": 16384}
_LLAMAGEN_XL = {"codebook_size": 16384, "hidden_size": 1280, "num_hidden_layers": 36, "num_attention_heads": 20,
                "intermediate_size": 3584, "cond_len": 120, "text_dim": 2048}
_CHAMELEON_7B = {"vocab_size": 65536, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                 "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 4096}


def _janus(hidden: int, layers: int, heads: int, ffn: int) -> dict:
    return {"text_config": {"model_type": "llama", "hidden_size": hidden, "num_hidden_layers": layers,
                            "num_attention_heads": heads, "num_key_value_heads": heads, "intermediate_size": ffn,
                            "vocab_size": 102400, "max_position_embeddings": 16384},
            # the image aligners and the generation head are as wide as the language model
            "vision_config": {"projection_dim": hidden},
            "vq_config": {"projection_dim": hidden, "image_token_embed_dim": hidden}}


# backend, image size (px), declared weight dtype, {component: (kind, config)}; "model" is the trained one
STUDENTS = {
    "llamagen/t2i-xl-256": ("llamagen", 256, "float32", {
        "model": ("llamagen", {**_LLAMAGEN_XL, "grid_size": 16}), "text_encoder": ("t5", _FLAN_T5_XL),
        "vq": ("vq", _LLAMAGEN_VQ16)}),
    "llamagen/t2i-xl-512": ("llamagen", 512, "float32", {
        "model": ("llamagen", {**_LLAMAGEN_XL, "grid_size": 32}), "text_encoder": ("t5", _FLAN_T5_XL),
        "vq": ("vq", _LLAMAGEN_VQ16)}),
    "Alpha-VLLM/Lumina-mGPT-7B-512": ("lumina-mgpt", 512, "bfloat16", {"model": ("chameleon", _CHAMELEON_7B)}),
    "Alpha-VLLM/Lumina-mGPT-7B-768": ("lumina-mgpt", 768, "bfloat16", {"model": ("chameleon", _CHAMELEON_7B)}),
    "Alpha-VLLM/Lumina-mGPT-7B-1024": ("lumina-mgpt", 1024, "bfloat16", {"model": ("chameleon", _CHAMELEON_7B)}),
    "deepseek-ai/Janus-Pro-1B": ("janus", 384, "bfloat16", {"model": ("janus", _janus(2048, 24, 16, 5632))}),
    "deepseek-ai/Janus-Pro-7B": ("janus", 384, "bfloat16", {"model": ("janus", _janus(4096, 30, 32, 11008))}),
}
# prompt tokens before the image codes (the backends' defaults for real checkpoints)
PROMPT_TOKENS = {"llamagen": 0, "lumina-mgpt": 128, "janus": 256}
