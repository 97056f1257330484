"""Diffusion teachers through diffusers: load a pipeline, add / save / load a LoRA on its denoiser.

The family is read from the checkpoint's own model_index.json (its pipeline class), never from the
name. This backbone supports the Stable Diffusion 1.x/2.x family (UNet, epsilon or v-prediction);
other families are refused with a clear message.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from proxytune.backends import hub
from proxytune.backends.tokenizer import BOS_ID, EOS_ID, char_vocab_size, write_char_clip_tokenizer
from proxytune.errors import ProxytuneError
from proxytune.files import canonicalize_safetensors

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
SUPPORTED_PIPELINES = {"StableDiffusionPipeline": "sd"}


def _build_tiny_sd(folder: Path) -> None:
    """SD 1.x layout at 64 px: VAE (x4 down), UNet with cross-attention, CLIP text encoder."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=16,
        sample_size=64,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=char_vocab_size(),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            bos_token_id=BOS_ID,
            eos_token_id=EOS_ID,
            pad_token_id=EOS_ID,  # the tokenizer pads with <|endoftext|>
        )
    )
    tokenizer = CLIPTokenizer.from_pretrained(write_char_clip_tokenizer(folder / "_tok"))
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    for leftover in (folder / "_tok").iterdir():
        leftover.unlink()
    (folder / "_tok").rmdir()


TINY_TEACHERS = {"tiny-sd": lambda: hub.materialize("tiny-sd-v1", _build_tiny_sd)}


def resolve(ref: str) -> str:
    return hub.resolve(ref, TINY_TEACHERS, what="teacher model")


def detect_family(path_or_id: str, revision: str | None = None) -> str:
    """Family from the checkpoint's model_index.json `_class_name`.

    Raises:
        ProxytuneError: no model_index.json, or a pipeline class this version does not train.
    """
    local = Path(path_or_id) / "model_index.json"
    if local.exists():
        index = json.loads(local.read_text())
    else:
        from huggingface_hub import hf_hub_download

        try:
            index = json.loads(Path(hf_hub_download(path_or_id, "model_index.json", revision=revision)).read_text())
        except Exception as err:
            raise ProxytuneError(f"teacher model {path_or_id!r}: cannot read model_index.json ({err.__class__.__name__})") from None
    name = index.get("_class_name", "?")
    if name not in SUPPORTED_PIPELINES:
        raise ProxytuneError(
            f"teacher model {path_or_id!r}: pipeline {name} is not supported yet (supported: {', '.join(SUPPORTED_PIPELINES)})"
        )
    return SUPPORTED_PIPELINES[name]


def load_pipeline(ref: str, *, revision: str | None = None, dtype: torch.dtype = torch.float32):
    """The base text-to-image pipeline, frozen, with the progress bar left on for long runs."""
    from diffusers import DiffusionPipeline

    path = resolve(ref)
    detect_family(path, revision)
    pipe = DiffusionPipeline.from_pretrained(path, revision=revision, dtype=dtype)
    for name in ("unet", "vae", "text_encoder"):
        getattr(pipe, name).requires_grad_(False)
    return pipe


def load_pipeline_with_lora(ref: str, lora_dir: Path, *, revision: str | None = None, scale: float = 1.0, fuse: bool = True):
    """Base pipeline + a saved teacher LoRA, fused for generation (no LoRA overhead per step)."""
    pipe = load_pipeline(ref, revision=revision)
    pipe.load_lora_weights(str(lora_dir), weight_name=LORA_WEIGHT_NAME, adapter_name="subject")
    if fuse:
        pipe.fuse_lora(lora_scale=scale)
        pipe.unload_lora_weights()  # keeps the fused weights, drops the LoRA modules
    else:
        pipe.set_adapters(["subject"], adapter_weights=[scale])
    return pipe


def add_lora(unet, *, rank: int, alpha: float, target_modules: list[str]) -> list[torch.nn.Parameter]:
    """Attach a peft LoRA to the denoiser; returns its (fp32) trainable parameters."""
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    unet.add_adapter(
        LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=target_modules)
    )
    cast_training_params(unet, dtype=torch.float32)  # fp16 base + fp16 LoRA cannot be unscaled
    return [p for p in unet.parameters() if p.requires_grad]


def lora_state_dict(unet) -> dict[str, torch.Tensor]:
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))


def save_lora(pipeline_cls, unet, folder: Path, metadata: dict | None = None) -> Path:
    """Write the LoRA in the diffusers format that `pipe.load_lora_weights(folder)` reads."""
    pipeline_cls.save_lora_weights(
        str(folder),
        unet_lora_layers=lora_state_dict(unet),
        weight_name=LORA_WEIGHT_NAME,
        safe_serialization=True,
        unet_lora_adapter_metadata=metadata,
    )
    canonicalize_safetensors(folder / LORA_WEIGHT_NAME)
    return folder / LORA_WEIGHT_NAME


def generate(pipe, prompts: list[str], seeds: list[int], *, steps: int, guidance: float, size: int):
    """One batched pipeline call; image i draws from its own generator seeded with seeds[i]."""
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    out = pipe(
        prompts,
        num_inference_steps=steps,
        guidance_scale=guidance,
        height=size,
        width=size,
        generator=generators,
        output_type="pil",
    )
    return out.images
