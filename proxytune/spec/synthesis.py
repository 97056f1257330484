"""Proxy synthesis: the tuned teacher generates the student's training set."""

from __future__ import annotations

from pydantic import Field, field_validator

from proxytune.spec.common import NonNegativeInt, PositiveFloat, PositiveInt, Strict


class SynthesisSpec(Strict):
    num_images: PositiveInt = Field(default=1000, description="Proxy images to generate (the paper uses ~1000).")
    prompt: str = Field(
        default="a {token} {class}",
        description="Prompt template; {token} and {class} are filled from the subject.",
    )
    num_inference_steps: PositiveInt = Field(default=30, description="Denoising steps per image.")
    guidance_scale: float = Field(default=7.5, ge=1.0, description="Classifier-free guidance scale.")
    batch_size: PositiveInt = Field(default=4, description="Images per pipeline call.")
    seed: NonNegativeInt = Field(default=0, description="Image i gets seed `seed + i`, whatever the batching.")
    lora_scale: PositiveFloat = Field(default=1.0, description="Scale of the fused teacher LoRA.")

    @field_validator("prompt")
    @classmethod
    def _has_token(cls, value: str) -> str:
        if "{token}" not in value:
            raise ValueError("must contain '{token}' (the identifier the teacher learned)")
        try:
            value.format(token="x", **{"class": "y"})
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(f"only {{token}} and {{class}} may be used ({err})") from None
        return value
