"""Evaluation: DreamBench prompts, CLIP-I / CLIP-T / DINO of teacher and student."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from proxytune.spec.common import TINY_CLIP, TINY_DINO, NonNegativeInt, PositiveInt, Strict, model_ref_checker

ClipModel = Annotated[str, model_ref_checker(TINY_CLIP)]
DinoModel = Annotated[str, model_ref_checker(TINY_DINO)]


class EvaluationSpec(Strict):
    prompts: Literal["dreambench"] | list[str] = Field(
        default="dreambench",
        description=(
            "'dreambench' for the 25 DreamBench prompts of the subject's kind (live for cats and dogs, "
            "object otherwise), or a list of templates using {token} and {class}."
        ),
    )
    num_prompts: PositiveInt | None = Field(default=None, description="Use only the first N prompts (quick runs).")
    images_per_prompt: PositiveInt = Field(default=4, description="Images per prompt per model (DreamBench: 4).")
    seed: NonNegativeInt = Field(default=0, description="Image k of prompt p gets seed seed + 1000*p + k for every model.")
    clip_model: ClipModel = Field(default="openai/clip-vit-base-patch32", description="CLIP for CLIP-I and CLIP-T.")
    dino_model: DinoModel = Field(default="facebook/dino-vits16", description="DINO ViT-S/16 for DINO.")
    grid_prompts: PositiveInt = Field(default=4, description="Prompts shown in the report's image grid.")
