"""Resources: what each kind of stage asks of a Ray cluster (`proxytune apply --executor ray`).

Only the Ray executor reads this section; the local executor (`dvc repro`) runs one stage at a time
and ignores it. It is not a DVC param: changing it re-runs nothing.
"""

from __future__ import annotations

from pydantic import Field, field_validator

from proxytune.spec.common import Strict


def _ray_quantity(value: float | None) -> float | None:
    # Ray accepts fractions of one unit (two stages sharing a GPU) but only whole numbers above one.
    if value is not None and value > 1 and not float(value).is_integer():
        raise ValueError(f"{value} is above 1 and not a whole number (Ray shares only a fraction of one unit)")
    return value


class StageResources(Strict):
    """One Ray task: the CPUs and GPUs Ray reserves for it on a node while the stage runs."""

    cpus: float = Field(default=1.0, ge=0, description="CPU cores Ray reserves for the stage (a fraction shares a core).")
    gpus: float | None = Field(
        default=None,
        ge=0,
        description="GPUs Ray reserves (and exposes through CUDA_VISIBLE_DEVICES); unset: 1 when the cluster has "
        "GPUs, 0 when it has none. A fraction below 1 lets stages share a GPU's memory; above 1 it must be whole.",
    )

    _quantity = field_validator("cpus", "gpus")(_ray_quantity)


class ResourcesSpec(Strict):
    """Per kind of stage; a multi-subject student uses `student`, a style's stages the key of the subject
    stage doing the same work (teacher; curation: synthesis; style student: student; style evaluation: evaluate)."""

    teacher: StageResources = Field(default_factory=StageResources,
                                    description="Teacher (DreamBooth LoRA) training, a style's teacher too.")
    synthesis: StageResources = Field(default_factory=StageResources,
                                      description="Proxy set generation, and a style's curation (stylised images).")
    codes: StageResources = Field(default_factory=StageResources, description="Encoding the proxies to student tokens.")
    student: StageResources = Field(default_factory=StageResources, description="Student training, a style student too.")
    evaluate: StageResources = Field(default_factory=StageResources,
                                     description="Evaluation (generation and scoring), a style evaluation too.")
