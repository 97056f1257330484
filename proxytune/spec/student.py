"""Student: LoRA on an autoregressive image generator, trained on proxy images only."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from proxytune.spec.common import (
    TINY_STUDENTS,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    Probability,
    Strict,
    model_ref_checker,
)

StudentModel = Annotated[str, model_ref_checker(TINY_STUDENTS)]


class StudentLoraSpec(Strict):
    rank: PositiveInt = Field(default=16, description="LoRA rank r.")
    alpha: PositiveFloat = Field(default=16.0, description="LoRA alpha.")
    dropout: Probability = Field(default=0.0, description="LoRA dropout.")


class SamplingSpec(Strict):
    cfg_scale: float = Field(default=7.5, ge=1.0, description="Classifier-free guidance scale.")
    top_k: PositiveInt = Field(default=1000, description="Top-k sampling (LlamaGen default 1000).")
    temperature: float = Field(default=1.0, ge=0, description="Sampling temperature; 0 = greedy.")


class StudentSpec(Strict):
    model: StudentModel = Field(
        default="tiny-llamagen",
        description="AR student: built-in tiny name, or a local folder / hub id in proxytune's student layout.",
    )
    lora: StudentLoraSpec = Field(default_factory=StudentLoraSpec, description="LoRA on the transformer.")
    steps: PositiveInt = Field(default=1000, description="Optimiser steps.")
    batch_size: PositiveInt = Field(default=8, description="Proxy images per step.")
    learning_rate: PositiveFloat = Field(default=1e-4, description="AdamW learning rate (LlamaGen default).")
    betas: tuple[float, float] = Field(default=(0.9, 0.95), description="AdamW betas (LlamaGen default).")
    weight_decay: float = Field(default=0.05, ge=0, description="AdamW weight decay (LlamaGen default).")
    max_grad_norm: PositiveFloat = Field(default=1.0, description="Gradient clipping norm.")
    cfg_dropout: Probability = Field(default=0.1, description="Probability a caption is swapped for the uncond embedding.")
    checkpoint_every: PositiveInt = Field(default=250, description="Save a resumable checkpoint every N steps.")
    sampling: SamplingSpec = Field(default_factory=SamplingSpec, description="How the student samples images.")
    seed_offset: NonNegativeInt = Field(default=0, description="Added to the experiment seed for this stage.")
