"""Diffusion teachers through diffusers: load a pipeline, encode prompts, run the denoiser, and add /
save / load a LoRA on it, for each family.

The family is read from the checkpoint's own model_index.json (its pipeline class), never from the
name:
- sd    StableDiffusionPipeline     UNet, one CLIP encoder, DDPM (epsilon or v-prediction)
- sdxl  StableDiffusionXLPipeline   UNet, two CLIP encoders + pooled text, size/crop conditioning, DDPM
- sd3   StableDiffusion3Pipeline    MMDiT, CLIP-L + CLIP-G + T5, flow matching
- flux  FluxPipeline                MMDiT over 2x2-packed latents, CLIP pooled + T5, guidance
                                    embedding, flow matching
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from proxytune import builtins
from proxytune.backends import tiny_cache
from proxytune.backends.teachers import quantize as quantization
from proxytune.backends.teachers.diffusion_tiny import BUILDERS
from proxytune.backends.teachers.quantize import weight_bytes  # noqa: F401  (re-exported: stages and tests read it here)
from proxytune.errors import ProxytuneError
from proxytune.files import canonicalize_safetensors

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
FLUX_TRAINING_GUIDANCE = 3.5  # FLUX.1-dev is guidance-distilled: training feeds a fixed guidance value


@dataclass(frozen=True)
class Family:
    name: str
    denoiser: str  # the pipeline attribute holding the denoiser: "unet" or "transformer"
    flow_matching: bool  # x_t = (1 - s) x0 + s e, target e - x0; else DDPM noise / v targets
    text_encoders: tuple[str, ...]
    default_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")


FAMILIES = {
    "StableDiffusionPipeline": Family("sd", "unet", False, ("text_encoder",)),
    "StableDiffusionXLPipeline": Family("sdxl", "unet", False, ("text_encoder", "text_encoder_2")),
    "StableDiffusion3Pipeline": Family("sd3", "transformer", True, ("text_encoder", "text_encoder_2", "text_encoder_3")),
    "FluxPipeline": Family("flux", "transformer", True, ("text_encoder", "text_encoder_2")),
}
SUPPORTED_PIPELINES = {cls: family.name for cls, family in FAMILIES.items()}
TINY_TEACHERS = {name: (lambda key=key, build=build: tiny_cache.materialize(key, build)) for name, (key, build) in BUILDERS.items()}


def resolve(ref: str) -> str:
    """A teacher reference as `from_pretrained` takes it; built-in names (tiny-*, a plugin's) through proxytune.builtins."""
    return tiny_cache.resolve(ref, builtins.builders("teacher"), what="teacher model")


def _model_index(path_or_id: str, revision: str | None) -> dict:
    local = Path(path_or_id) / "model_index.json"
    if local.exists():
        try:
            return json.loads(local.read_text())
        except (OSError, ValueError) as err:
            raise ProxytuneError(f"teacher model {path_or_id!r}: {local}: not readable JSON ({err})") from None
    from huggingface_hub import hf_hub_download

    try:
        return json.loads(Path(hf_hub_download(path_or_id, "model_index.json", revision=revision)).read_text())
    except Exception as err:
        raise ProxytuneError(f"teacher model {path_or_id!r}: cannot read model_index.json ({err.__class__.__name__})") from None


def detect_family(path_or_id: str, revision: str | None = None) -> Family:
    """Family from the checkpoint's model_index.json `_class_name`.

    Raises:
        ProxytuneError: no model_index.json, or a pipeline class proxytune does not train.
    """
    name = _model_index(path_or_id, revision).get("_class_name", "?")
    if name not in FAMILIES:
        raise ProxytuneError(
            f"teacher model {path_or_id!r}: pipeline {name} is not supported (supported: {', '.join(FAMILIES)})"
        )
    return FAMILIES[name]


def family_of(pipe) -> Family:
    return FAMILIES[type(pipe).__name__]


def denoiser(pipe):
    return getattr(pipe, family_of(pipe).denoiser)


def _one_line(err: BaseException, limit: int = 300) -> str:
    """`ClassName: first line of the message`, cut to `limit` characters."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = f"{err.__class__.__name__}: {lines[0]}" if lines else err.__class__.__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _failing_component(err: BaseException) -> str | None:
    """The pipeline component diffusers was loading when `err` was raised (its `load_sub_model(name=...)`
    frame), or None. diffusers' own messages often name a file or class but not the component."""
    tb, name = err.__traceback__, None
    while tb is not None:
        if tb.tb_frame.f_code.co_name == "load_sub_model":
            name = tb.tb_frame.f_locals.get("name")
        tb = tb.tb_next
    return name if isinstance(name, str) else None


def _load_models(ref: str, path: str, revision: str | None, dtype: torch.dtype,
                 quantized: dict[str, Any] | None = None) -> dict[str, torch.nn.Module]:
    """Each diffusers / transformers model the pipeline names, loaded on its own so that its loading report
    is seen: both libraries initialise a weight missing from the files at random and only log it, which
    would train and sample a silently different teacher. `quantized`: component name -> the
    quantization_config it loads with."""
    import importlib

    quantized = quantized or {}
    models = {}
    for name, entry in _model_index(path, revision).items():
        if name.startswith("_") or not isinstance(entry, list) or entry[0] not in ("diffusers", "transformers"):
            continue  # pipeline settings, absent components (null), the SD safety checker's own module
        cls = getattr(importlib.import_module(entry[0]), entry[1], None)
        if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
            continue  # tokenizers, schedulers and image processors: the pipeline loads those
        try:
            extra = {"quantization_config": quantized[name]} if name in quantized else {}
            model, info = cls.from_pretrained(path, subfolder=name, revision=revision, dtype=dtype,
                                              output_loading_info=True, **extra)
        except Exception as err:
            raise ProxytuneError(f"teacher model {ref!r} ({name}/): cannot load: {_one_line(err)}") from None
        missing = sorted(info.get("missing_keys") or ())
        if missing:
            raise ProxytuneError(
                f"teacher model {ref!r} ({name}/): key {missing[0]} is not in the weight files "
                f"({len(missing)} missing); the folder is incomplete or of another architecture than its config.json"
            )
        models[name] = model
    return models


def load_pipeline(ref: str, *, revision: str | None = None, dtype: torch.dtype = torch.float32, quantize: str = "none",
                  quantize_field: str = "teacher.quantize"):
    """The base text-to-image pipeline in `dtype`, every model frozen; `quantize` (int8, fp8, nf4: see
    `quantize.py`) quantises the denoiser's frozen Linear weights as they load (the teacher's QLoRA-style
    training; synthesis loads the unquantised base and fuses the LoRA into it unless synthesis.quantize).

    Raises:
        ProxytuneError: `quantize` cannot run (see `quantize.require`); no readable model_index.json, an
            unsupported pipeline class, or any failure while
            diffusers / transformers load the files (a missing or truncated weight file, a weight missing
            from the files, a shape mismatch, an unreadable tokenizer), as one line naming the checkpoint and
            the component.
    """
    from diffusers import DiffusionPipeline

    path = resolve(ref)
    family = detect_family(path, revision)
    config = quantization.load_config(quantize, quantize_field)
    models = _load_models(ref, path, revision, dtype, {family.denoiser: config} if config else None)
    if quantize == "nf4":  # computed on the GPU where there is one (FLUX.1-dev: CPU-minutes on the CPU)
        work = torch.device("cuda") if torch.cuda.is_available() else None
        quantization.to_nf4(models[family.denoiser].requires_grad_(False), work)
    try:
        pipe = DiffusionPipeline.from_pretrained(path, revision=revision, dtype=dtype, **models)
    except ProxytuneError:
        raise
    except Exception as err:
        component = _failing_component(err)
        where = f" ({component}/)" if component else ""
        raise ProxytuneError(f"teacher model {ref!r}{where}: cannot load: {_one_line(err)}") from None
    for name in (family.denoiser, "vae", *family.text_encoders):
        getattr(pipe, name).requires_grad_(False)
    return pipe


def load_pipeline_with_lora(ref: str, lora_dir: Path, *, revision: str | None = None, scale: float = 1.0,
                            fuse: bool = True, dtype: torch.dtype = torch.float32, quantize: str = "none"):
    """Base pipeline in `dtype` + a saved teacher LoRA, fused for generation (no LoRA overhead per step).

    `quantize` (`synthesis.quantize`, see `quantize.py`) loads the base denoiser quantised; its LoRA then
    stays unfused beside the quantised weights, as the teacher trained it.

    Raises:
        ProxytuneError: the base pipeline does not load (see `load_pipeline`), or the adapter file does not
            load into it.
    """
    pipe = load_pipeline(ref, revision=revision, dtype=dtype, quantize=quantize, quantize_field="synthesis.quantize")
    fuse = fuse and quantize == "none"
    try:
        pipe.load_lora_weights(str(lora_dir), weight_name=LORA_WEIGHT_NAME, adapter_name="subject")
    except Exception as err:
        raise ProxytuneError(f"teacher adapter {Path(lora_dir) / LORA_WEIGHT_NAME}: cannot load into teacher model "
                             f"{ref!r}: {_one_line(err)}") from None
    if fuse:
        pipe.fuse_lora(lora_scale=scale)
        pipe.unload_lora_weights()  # keeps the fused weights, drops the LoRA modules
    else:
        pipe.set_adapters(["subject"], adapter_weights=[scale])
    return pipe


def place_for_generation(pipe, device: torch.device, *, cpu_offload: bool = False, vae_tiling: bool = False) -> str | None:
    """Put a generation pipeline on `device` with the synthesis memory options; returns a note to print, or None.

    cpu_offload: diffusers' `enable_model_cpu_offload`: each model (text encoders, denoiser, VAE) moves to
    the GPU only while it runs, so the peak is the largest model plus activations, not their sum; the
    images are the same. It needs CUDA: on CPU, where everything already lives in host memory, it is
    skipped and the note says so.
    vae_tiling: the VAE decodes (and encodes) overlapping tiles of its config's `sample_size` pixels,
    blended at the seams, so its activation memory stays that of one tile whatever the resolution;
    images differ slightly at the seams. Nothing changes for an image no larger than a tile.
    """
    note = None
    if cpu_offload and device.type == "cuda":
        pipe.enable_model_cpu_offload(device=device)  # hooks move each model to the GPU and back
    else:
        if cpu_offload:
            note = "synthesis.cpu_offload: skipped on CPU (it moves models between the GPU and host memory)"
        pipe.to(device)
    if vae_tiling:
        pipe.vae.enable_tiling()
    return note


# -- the pieces of a training step, per family ----------------------------------------------------
def max_sequence_length(pipe) -> int:
    """T5 prompt length: the family default, capped by the T5 tokenizer's own limit."""
    family = family_of(pipe)
    tokenizer = pipe.tokenizer_3 if family.name == "sd3" else pipe.tokenizer_2
    default = 256 if family.name == "sd3" else 512
    return min(default, tokenizer.model_max_length)


def encode_prompts(pipe, prompts: list[str]) -> dict[str, torch.Tensor]:
    """Text conditioning for `predict`: {"prompt_embeds": (B, T, D)[, "pooled": (B, P)]}."""
    family, device = family_of(pipe), pipe._execution_device
    if family.name == "sd":
        embeds, _ = pipe.encode_prompt(prompts, device, 1, False)
        return {"prompt_embeds": embeds}
    if family.name == "sdxl":
        embeds, _, pooled, _ = pipe.encode_prompt(prompt=prompts, device=device, do_classifier_free_guidance=False)
    elif family.name == "sd3":
        embeds, _, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None, device=device,
                                                  do_classifier_free_guidance=False,
                                                  max_sequence_length=max_sequence_length(pipe))
    else:
        embeds, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=device,
                                               max_sequence_length=max_sequence_length(pipe))
    return {"prompt_embeds": embeds, "pooled": pooled}


def normalize_latents(vae, z: torch.Tensor) -> torch.Tensor:
    """VAE latents -> the denoiser's space: (z - shift) * scale (shift is 0 for SD/SDXL)."""
    return (z - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor


def predict(pipe, noisy: torch.Tensor, timesteps: torch.Tensor, text: dict[str, torch.Tensor], *, size: int,
            crops: torch.Tensor | None = None, original_size: int | None = None) -> torch.Tensor:
    """One denoiser call on (B, C, h, w) latents; returns the prediction in the same layout.

    Args:
        timesteps: (B,) in the scheduler's units (0..1000; FLUX's transformer takes them / 1000).
        text: `encode_prompts` output, batch-expanded to B.
        size: the training resolution in pixels (SDXL's size conditioning).
        crops: (B, 2) top-left of each sample's crop in pixels of an `original_size` image (SDXL's
            crop conditioning); None for centre-cropped references at the training size.
    """
    family, model = family_of(pipe), denoiser(pipe)
    B, C, h, w = noisy.shape
    if family.name == "sd":
        return model(noisy, timesteps, encoder_hidden_states=text["prompt_embeds"]).sample
    if family.name == "sdxl":
        # original size, crop top-left, target size (SDXL's micro-conditioning)
        original = original_size or size
        corner = crops.to(noisy.device, noisy.dtype) if crops is not None else torch.zeros(B, 2, device=noisy.device, dtype=noisy.dtype)
        sizes = torch.tensor([original, original], dtype=noisy.dtype, device=noisy.device).expand(B, 2)
        target = torch.tensor([size, size], dtype=noisy.dtype, device=noisy.device).expand(B, 2)
        time_ids = torch.cat([sizes, corner, target], dim=1)
        cond = {"text_embeds": text["pooled"], "time_ids": time_ids}
        return model(noisy, timesteps, encoder_hidden_states=text["prompt_embeds"], added_cond_kwargs=cond).sample
    if family.name == "sd3":
        return model(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=text["prompt_embeds"],
                     pooled_projections=text["pooled"], return_dict=False)[0]
    packed = pipe._pack_latents(noisy, B, C, h, w)  # (B, h/2 * w/2, 4C)
    image_ids = pipe._prepare_latent_image_ids(B, h // 2, w // 2, noisy.device, noisy.dtype)
    text_ids = torch.zeros(text["prompt_embeds"].shape[1], 3, device=noisy.device, dtype=noisy.dtype)
    guidance = None
    if model.config.guidance_embeds:
        guidance = torch.full((B,), FLUX_TRAINING_GUIDANCE, device=noisy.device, dtype=noisy.dtype)
    out = model(hidden_states=packed, timestep=timesteps / 1000, guidance=guidance, pooled_projections=text["pooled"],
                encoder_hidden_states=text["prompt_embeds"], txt_ids=text_ids, img_ids=image_ids, return_dict=False)[0]
    return pipe._unpack_latents(out, h * pipe.vae_scale_factor, w * pipe.vae_scale_factor, pipe.vae_scale_factor)


def training_scheduler(pipe):
    """A fresh scheduler for training noise, from the checkpoint's own config (prediction type, shift)."""
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    if family_of(pipe).flow_matching:
        return FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    return DDPMScheduler.from_config(pipe.scheduler.config)


def add_lora(model, *, rank: int, alpha: float, target_modules: list[str]) -> list[torch.nn.Parameter]:
    """Attach a peft LoRA (adapter "default") to a denoiser or text encoder; returns its (fp32)
    trainable parameters.

    A diffusers denoiser takes it through its own `add_adapter`. A transformers text encoder takes it
    from peft directly (`inject_adapter_in_model`, which is all that transformers' `add_adapter` does
    besides a version check): transformers 5.24 refuses `add_adapter` below peft 0.22, and the LoRA
    does not need anything from that integration (it is saved with peft's `get_peft_model_state_dict`
    and loaded back by diffusers' `load_lora_weights`).
    """
    from diffusers import ModelMixin
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=target_modules)
    if isinstance(model, ModelMixin):
        model.add_adapter(config)
    else:
        config.base_model_name_or_path = getattr(model, "name_or_path", None)
        inject_adapter_in_model(config, model, adapter_name="default")
    cast_training_params(model, dtype=torch.float32)  # fp16 base + fp16 LoRA cannot be unscaled
    return [p for p in model.parameters() if p.requires_grad]


def lora_state_dict(model) -> dict[str, torch.Tensor]:
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(model))


def save_lora(pipe, folder: Path, metadata: dict | None = None, *, text_encoder: bool = False,
              text_metadata: dict | None = None) -> Path:
    """Write the LoRA (denoiser, and the first text encoder's when trained) in the diffusers format
    that the family's `pipe.load_lora_weights(folder)` reads."""
    from peft.utils import get_peft_model_state_dict

    family = family_of(pipe)
    layers = {
        f"{family.denoiser}_lora_layers": lora_state_dict(denoiser(pipe)),
        f"{family.denoiser}_lora_adapter_metadata": metadata,
    }
    if text_encoder:
        layers["text_encoder_lora_layers"] = get_peft_model_state_dict(pipe.text_encoder)
        layers["text_encoder_lora_adapter_metadata"] = text_metadata
    type(pipe).save_lora_weights(str(folder), weight_name=LORA_WEIGHT_NAME, safe_serialization=True, **layers)
    canonicalize_safetensors(folder / LORA_WEIGHT_NAME)
    return folder / LORA_WEIGHT_NAME


def generation_text(pipe, prompt: str, *, guidance: float) -> dict[str, torch.Tensor]:
    """The text arguments of a pipeline call for `prompt` (with classifier-free guidance also the negative
    prompt's, as the pipeline would make them), encoded now so that `generate(..., text=...)` can run after
    `free_text_encoders`."""
    family, device = family_of(pipe), pipe._execution_device
    if family.name == "flux":  # guidance is an input of the transformer, not a second batch
        embeds, pooled, _ = pipe.encode_prompt(prompt=[prompt], prompt_2=None, device=device,
                                               max_sequence_length=max_sequence_length(pipe))
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
    denoiser_config = getattr(pipe, family.denoiser).config
    guided = guidance > 1 and getattr(denoiser_config, "time_cond_proj_dim", None) is None  # as the pipelines decide
    if family.name == "sd":
        embeds, negative = pipe.encode_prompt([prompt], device, 1, guided)
        return {"prompt_embeds": embeds, "negative_prompt_embeds": negative}
    extra = {"max_sequence_length": max_sequence_length(pipe), "prompt_3": None} if family.name == "sd3" else {}
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
        prompt=[prompt], prompt_2=None, device=device, do_classifier_free_guidance=guided, **extra)
    return {"prompt_embeds": embeds, "negative_prompt_embeds": negative, "pooled_prompt_embeds": pooled,
            "negative_pooled_prompt_embeds": negative_pooled}


def free_text_encoders(pipe) -> None:
    """Drop the pipeline's text encoders (a FLUX teacher's T5-XXL is 9.5 GB in bf16) once every prompt it
    needs is encoded; the pipeline then generates only from `generation_text`'s tensors."""
    for name in family_of(pipe).text_encoders:
        setattr(pipe, name, None)  # diffusers' pipelines take None for a text encoder given embeddings
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def generate(pipe, prompts: list[str], seeds: list[int], *, steps: int, guidance: float, size: int,
             text: dict[str, torch.Tensor] | None = None):
    """One batched pipeline call; image i draws from its own generator seeded with seeds[i].

    `text`: `generation_text` of the one prompt every image shares, used instead of encoding `prompts`.
    """
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    extra = {"max_sequence_length": max_sequence_length(pipe)} if family_of(pipe).flow_matching else {}
    if text is not None:
        if len(set(prompts)) != 1:
            raise ValueError("generate: cached text is one prompt's; these are several")
        extra.update({k: v.expand(len(seeds), *v.shape[1:]) for k, v in text.items() if v is not None})
        prompts = None
    out = pipe(
        prompts,
        num_inference_steps=steps,
        guidance_scale=guidance,  # FLUX: the guidance embedding's value; others: classifier-free guidance
        height=size,
        width=size,
        generator=generators,
        output_type="pil",
        **extra,
    )
    return out.images
