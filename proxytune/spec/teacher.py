"""Teacher: DreamBooth LoRA on a diffusers text-to-image model."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, ValidationInfo, field_validator

from proxytune.spec.common import (
    TINY_TEACHERS,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    Seed,
    Strict,
    model_ref_checker,
)

TeacherModel = Annotated[str, model_ref_checker(TINY_TEACHERS)]


class LoraSpec(Strict):
    rank: PositiveInt = Field(default=8, description="LoRA rank r.")
    alpha: PositiveFloat = Field(default=8.0, description="LoRA alpha (scale = alpha / rank).")
    target_modules: list[str] = Field(
        default=["to_q", "to_k", "to_v", "to_out.0"],
        min_length=1,
        description="Module names in the denoiser that get LoRA layers (peft target_modules).",
    )


class PriorPreservationSpec(Strict):
    enabled: bool = Field(default=False, description="DreamBooth prior preservation with class images from the base model.")
    class_prompt: str = Field(default="a {class}", description="Prompt of the class images; {class} is the subject's class.")
    num_class_images: PositiveInt = Field(default=100, description="Class images generated once (seeded) and cached.")
    prior_loss_weight: PositiveFloat = Field(default=1.0, description="loss = instance + prior_loss_weight * prior.")
    seed: Seed = Field(default=0, description="Class image i gets seed `seed + i`.")
    num_inference_steps: PositiveInt = Field(default=30, description="Denoising steps per class image.")
    guidance_scale: float = Field(default=7.5, ge=1.0, description="Guidance of the class images.")

    @field_validator("class_prompt")
    @classmethod
    def _only_class(cls, value: str) -> str:
        try:
            value.format(**{"class": "x"})
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(f"only {{class}} may be used ({err})") from None
        return value


class TeacherSpec(Strict):
    model: TeacherModel = Field(
        default="tiny-sd",
        description="Diffusers pipeline: built-in tiny name, local folder or hub id (e.g. stable-diffusion-v1-5/stable-diffusion-v1-5).",
    )
    revision: str | None = Field(default=None, description="Hub revision (branch, tag or commit).")
    resolution: PositiveInt = Field(default=512, description="Training and generation resolution in pixels.")
    lora: LoraSpec = Field(default_factory=LoraSpec, description="LoRA adapter on the denoiser.")
    steps: PositiveInt = Field(default=800, description="Optimiser steps (step-based; no epoch arithmetic).")
    batch_size: PositiveInt = Field(default=1, description="Reference images per micro-batch (per process).")
    gradient_accumulation_steps: PositiveInt = Field(
        default=1,
        description="Micro-batches whose mean gradient makes one optimiser step: batch_size x this x processes "
        "images per step; `steps` counts optimiser steps.",
    )
    learning_rate: PositiveFloat = Field(default=1e-4, description="AdamW learning rate.")
    lr_warmup_steps: NonNegativeInt = Field(default=0, description="Linear warm-up steps, then constant.")
    weight_decay: float = Field(default=1e-2, ge=0, description="AdamW weight decay.")
    max_grad_norm: PositiveFloat = Field(default=1.0, description="Gradient clipping norm.")
    random_flip: bool = Field(default=True, description="Flip the reference horizontally with p=0.5 each step.")
    random_crop: bool = Field(
        default=False,
        description="A fresh random crop every step: references are encoded once about 6% larger and a window "
        "of the training size is cut from their cached latents (SDXL gets the crop as its crop conditioning).",
    )
    checkpoint_every: PositiveInt = Field(default=250, description="Save a resumable checkpoint every N steps.")
    mixed_precision: Literal["no", "fp16", "bf16"] = Field(
        default="no", description="Autocast dtype for the frozen model (LoRA params stay fp32); fp16 scales the loss "
        "(GradScaler, saved in checkpoints). 'no' on CPU."
    )
    prior_preservation: PriorPreservationSpec = Field(default_factory=PriorPreservationSpec,
                                                      description="DreamBooth prior preservation.")
    train_text_encoder: bool = Field(default=False, description="Also train a LoRA on the (first) text encoder.")
    text_encoder_lr: PositiveFloat | None = Field(default=None, description="Text-encoder LoRA learning rate (default: learning_rate).")
    min_snr_gamma: PositiveFloat | None = Field(default=None, description="Min-SNR loss weighting (DDPM families; 5.0 is usual).")
    noise_offset: float = Field(default=0.0, ge=0, description="Noise offset (DDPM families; 0.05-0.1 brightens/darkens better).")
    flow_weighting: Literal["logit_normal", "mode", "uniform", "sigma_sqrt", "cosmap"] = Field(
        default="logit_normal", description="Flow-matching (SD3/FLUX) timestep density or loss weighting scheme."
    )
    gradient_checkpointing: bool = Field(default=False, description="Trade compute for activation memory.")
    quantize: Literal["none", "int8", "fp8", "nf4"] = Field(
        default="none",
        description="Quantise the frozen denoiser's Linear weights while training its LoRA (QLoRA style; torchao, "
        "CPU and CUDA; needs `pip install 'proxytune[quantize]'`). int8: int8 weight-only, a scale a row (about 1/4 "
        "of their float32 bytes, 1/2 of bf16). fp8: float8_e4m3fn weight-only, a scale a row (the same bytes as int8, "
        "coarser; no FP8 hardware needed). nf4: QLoRA's 4-bit NormalFloat in blocks of 64 (about 0.52 byte a weight, "
        "a FLUX.1-dev transformer in 6 GiB; the lossiest). Convolutions, norms and embeddings stay as loaded. The "
        "LoRA stays float32 and is saved as usual: synthesis loads the unquantised base (in synthesis.dtype) and "
        "fuses it, unless synthesis.quantize asks for a quantised base there too. "
        "Prior-preservation class images and validation samples come from the quantised base. One process only.",
    )
    use_8bit_adam: bool = Field(
        default=False,
        description="torchao's AdamW8bit, as student.use_8bit_adam: both moments as int8 in blocks of 256 with a "
        "float32 scale each (~2 bytes a trained parameter instead of 8; tensors under 4096 values keep float32 "
        "moments). CPU and CUDA; needs `pip install 'proxytune[quantize]'`; its update step is compiled with "
        "torch.compile on first use.",
    )
    processes: PositiveInt = Field(default=1, description="Data-parallel processes (accelerate launch); batch_size is per process.")
    validation_every: NonNegativeInt = Field(default=0, description="Sample a validation grid every N steps (0 = off).")

    @field_validator("processes")
    @classmethod
    def _quantize_on_one_process(cls, value: int, info: ValidationInfo) -> int:
        quantize = info.data.get("quantize", "none")
        if quantize != "none" and value > 1:
            raise ValueError(f"with quantize: {quantize}, must be 1 (untested: DDP over torchao's quantised weights); "
                             "set processes: 1 or quantize: none")
        return value
