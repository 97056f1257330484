"""Teacher: DreamBooth LoRA on a diffusers text-to-image model."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from proxytune.spec.common import (
    TINY_TEACHERS,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
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


class TeacherSpec(Strict):
    model: TeacherModel = Field(
        default="tiny-sd",
        description="Diffusers pipeline: built-in tiny name, local folder or hub id (e.g. stable-diffusion-v1-5/stable-diffusion-v1-5).",
    )
    revision: str | None = Field(default=None, description="Hub revision (branch, tag or commit).")
    resolution: PositiveInt = Field(default=512, description="Training and generation resolution in pixels.")
    lora: LoraSpec = Field(default_factory=LoraSpec, description="LoRA adapter on the denoiser.")
    steps: PositiveInt = Field(default=800, description="Optimiser steps (step-based; no epoch arithmetic).")
    batch_size: PositiveInt = Field(default=1, description="Reference images per step.")
    learning_rate: PositiveFloat = Field(default=1e-4, description="AdamW learning rate.")
    lr_warmup_steps: NonNegativeInt = Field(default=0, description="Linear warm-up steps, then constant.")
    weight_decay: float = Field(default=1e-2, ge=0, description="AdamW weight decay.")
    max_grad_norm: PositiveFloat = Field(default=1.0, description="Gradient clipping norm.")
    random_flip: bool = Field(default=True, description="Flip the reference horizontally with p=0.5 each step.")
    checkpoint_every: PositiveInt = Field(default=250, description="Save a resumable checkpoint every N steps.")
    mixed_precision: Literal["no", "fp16", "bf16"] = Field(
        default="no", description="Autocast dtype for the frozen model (LoRA params stay fp32); 'no' on CPU."
    )
