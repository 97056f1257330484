"""Evaluation: DreamBench prompts, the subject metrics of `proxytune.metrics` (CLIP-I / CLIP-T / DINO, and a
world's judges for its subjects) of teacher and student, and the promotion gate."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, Field

from proxytune.spec.common import TINY_CLIP, TINY_DINO, NonNegativeInt, PositiveInt, Seed, Strict, model_ref_checker


def _gateable(value: str) -> str:
    from proxytune import metrics

    known = metrics.gateable("subject")
    if value not in known:
        raise ValueError(f"unknown metric {value!r}: use one of {', '.join(known)}")
    return value


Metric = Annotated[str, AfterValidator(_gateable)]  # a subject metric gate rules and held-out scores may read


class GateRule(Strict):
    """student.METRIC >= (teacher.METRIC or a number) + margin."""

    metric: Metric = Field(description="Metric the rule reads: a gateable subject metric of proxytune.metrics (clip_i, "
                           "clip_t, dino; a world's for its subjects, e.g. the toy world's subject_acc).")
    vs: Literal["teacher"] | float = Field(
        default="teacher", description="'teacher' to compare with the teacher's score, or an absolute threshold."
    )
    margin: float = Field(default=0.0, description="Extra amount the student must clear.")
    require: Literal["mean", "interval"] = Field(
        default="mean",
        description="'mean': the student's mean must clear the target. 'interval': the lower end of the 95% "
        "bootstrap interval of student - target (prompts resampled, paired image by image against the teacher) "
        "must be >= 0, i.e. the student clears it beyond the prompt-to-prompt noise. Both are recorded in gate.json.",
    )

    def describe(self) -> str:
        target = f"teacher.{self.metric}" if self.vs == "teacher" else f"{self.vs:g}"
        rule = f"student.{self.metric} >= {target}" + (f" + {self.margin:g}" if self.margin else "")
        return rule + (" at the 95% interval's lower end" if self.require == "interval" else "")

ClipModel = Annotated[str, model_ref_checker(TINY_CLIP)]
DinoModel = Annotated[str, model_ref_checker(TINY_DINO)]


class EvaluationSpec(Strict):
    prompts: Literal["dreambench", "toyworld"] | list[str] = Field(
        default="dreambench",
        description=(
            "'dreambench' for the 25 DreamBench prompts of the subject's kind (live for cats and dogs, "
            "object otherwise), 'toyworld' for the toy world's 25 prompts of the class (scenes, accessories, "
            "recolourings and combinations, in the world's grammar), or a list of templates using {token} and {class}."
        ),
    )
    num_prompts: PositiveInt | None = Field(default=None, description="Use only the first N prompts (quick runs).")
    images_per_prompt: PositiveInt = Field(default=4, description="Images per prompt per model (DreamBench: 4).")
    student_batch_size: PositiveInt | None = Field(
        default=None,
        description="Images the student samples at once (each with CFG's two rows and its KV cache); null = a prompt's "
        "images_per_prompt at once. Lower it where `proxytune plan` shows the student's evaluation over the card "
        "(a 7B student on 24 GB).",
    )
    seed: Seed = Field(default=0, description="Image k of prompt p gets seed seed + 1000*p + k for every model.")
    clip_model: ClipModel = Field(default="openai/clip-vit-base-patch32", description="CLIP for CLIP-I and CLIP-T.")
    dino_model: DinoModel = Field(default="facebook/dino-vits16", description="DINO ViT-S/16 for DINO.")
    grid_prompts: PositiveInt = Field(default=4, description="Prompts shown in the report's image grid.")
    bootstrap_resamples: PositiveInt = Field(
        default=1000, description="Bootstrap resamples (over generated images) for the 95% interval of each mean."
    )
    variance_samples: NonNegativeInt = Field(
        default=100,
        description=(
            "Samples per model with the proxy prompt for the feature-distribution analysis (paper supplement: "
            "100); 0 turns it off."
        ),
    )
    base_models: bool | None = Field(
        default=None,
        description=(
            "Also sample the untuned teacher and student (no adapter) on the same prompts and seeds and score them "
            "as models 'base-teacher' and 'base-student', so the tables read base vs tuned. null = on for a "
            "toy world subject (images: toyworld:NAME, where the oracle makes the comparison exact), off otherwise."
        ),
    )
    gate: list[GateRule] = Field(
        default_factory=list,
        description=(
            "Promotion gate: the student version gets the alias 'champion' only when every rule passes, e.g. "
            "[{metric: dino, vs: teacher}]. The result is recorded either way."
        ),
    )
