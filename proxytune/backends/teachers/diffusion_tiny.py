"""Built-in tiny teachers, one per diffusers family, random-initialised with a fixed seed.

Each is a complete pipeline folder written by `save_pretrained` (model_index.json, one subfolder per
component), so it loads through `DiffusionPipeline.from_pretrained` exactly as a hub checkpoint does.
64 px images, a x4 VAE (16x16 latents), char-level CLIP tokenizers (tokenizer.py) for every text
encoder including T5 (a real T5 ships a sentencepiece tokenizer; the pipeline only calls it).
"""

from __future__ import annotations

from pathlib import Path

import torch

from proxytune.backends.tokenizer import BOS_ID, EOS_ID, char_vocab_size, write_char_clip_tokenizer

T5_MAX_LENGTH = 32  # tiny T5 prompt length (SD3/FLUX pass it as max_sequence_length)


def _tokenizer(folder: Path, name: str, max_length: int = 77):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(write_char_clip_tokenizer(folder / f"_{name}", model_max_length=max_length))


def _clip_config(hidden: int = 32, projection: int | None = None):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=char_vocab_size(), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
        pad_token_id=EOS_ID, projection_dim=projection or hidden,
    )


def _t5(d_model: int = 32):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=char_vocab_size(), d_model=d_model, d_kv=16, d_ff=2 * d_model,
                                   num_layers=2, num_heads=2, pad_token_id=EOS_ID, eos_token_id=EOS_ID,
                                   decoder_start_token_id=EOS_ID))


def _vae(**kwargs):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=4, layers_per_block=1, norm_num_groups=16,
        sample_size=64, **kwargs,
    )
    # A random encoder's posterior has std ~1, so a latent "of an image" would be mostly noise and
    # there would be nothing to learn; a trained VAE's posterior is sharp. Fix log-variance at -10.
    last = vae.quant_conv if vae.quant_conv is not None else vae.encoder.conv_out
    with torch.no_grad():
        last.weight[4:].zero_()
        last.bias[4:].fill_(-10.0)
    return vae


def _save(pipe, folder: Path) -> None:
    pipe.save_pretrained(folder, safe_serialization=True)
    for scratch in folder.glob("_*"):
        for leftover in scratch.iterdir():
            leftover.unlink()
        scratch.rmdir()


def build_tiny_sd(folder: Path) -> None:
    """SD 1.x: UNet with cross-attention, one CLIP text encoder, DDIM (epsilon prediction)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=16,
    )
    vae = _vae()
    text_encoder = CLIPTextModel(_clip_config())
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=_tokenizer(folder, "tok"), unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    _save(pipe, folder)


def build_tiny_sdxl(folder: Path) -> None:
    """SDXL: two CLIP text encoders (the second with projection), size/crop micro-conditioning."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=32 + 6 * 8,  # pooled text (32) + 6 size/crop numbers x 8
        cross_attention_dim=64, norm_num_groups=16,  # the two encoders' 32 + 32 features, concatenated
    )
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       timestep_spacing="leading", steps_offset=1)
    pipe = StableDiffusionXLPipeline(
        vae=_vae(force_upcast=True), text_encoder=CLIPTextModel(_clip_config()),
        text_encoder_2=CLIPTextModelWithProjection(_clip_config()), tokenizer=_tokenizer(folder, "tok"),
        tokenizer_2=_tokenizer(folder, "tok2"), unet=unet, scheduler=scheduler,
    )
    _save(pipe, folder)


def build_tiny_sd3(folder: Path) -> None:
    """SD3: MMDiT over patches, CLIP-L + CLIP-G (pooled, projected) + T5, flow matching."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=32,
        pooled_projection_dim=64,  # CLIP-L pooled (32) + CLIP-G pooled (32)
        pos_embed_max_size=32,
    )
    with torch.no_grad():  # a random MMDiT's output is far larger than a trained one's; damp it so
        transformer.proj_out.weight.mul_(0.1)  # adapters fine-tune from a sane start (as trained models give)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(shift_factor=0.0609, scaling_factor=1.5305),
        text_encoder=CLIPTextModelWithProjection(_clip_config()), tokenizer=_tokenizer(folder, "tok"),
        text_encoder_2=CLIPTextModelWithProjection(_clip_config()), tokenizer_2=_tokenizer(folder, "tok2"),
        text_encoder_3=_t5(32), tokenizer_3=_tokenizer(folder, "tok3", T5_MAX_LENGTH),
    )
    _save(pipe, folder)


def build_tiny_flux(folder: Path) -> None:
    """FLUX.1: double- and single-stream transformer over 2x2-packed latents, CLIP pooled + T5,
    guidance embedding (as FLUX.1-dev), flow matching with resolution-dependent shift."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, out_channels=None, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),  # sums to the head dim
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=16,
        max_image_seq_len=256,
    )
    pipe = FluxPipeline(
        scheduler=scheduler, vae=_vae(shift_factor=0.1159, scaling_factor=0.3611, use_quant_conv=False,
                                      use_post_quant_conv=False),
        text_encoder=CLIPTextModel(_clip_config()), tokenizer=_tokenizer(folder, "tok"),
        text_encoder_2=_t5(32), tokenizer_2=_tokenizer(folder, "tok2", T5_MAX_LENGTH), transformer=transformer,
    )
    _save(pipe, folder)


BUILDERS = {
    "tiny-sd": ("tiny-sd-v2", build_tiny_sd),
    "tiny-sdxl": ("tiny-sdxl-v2", build_tiny_sdxl),
    "tiny-sd3": ("tiny-sd3-v2", build_tiny_sd3),
    "tiny-flux": ("tiny-flux-v2", build_tiny_flux),
}
