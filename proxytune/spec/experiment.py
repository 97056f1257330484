"""The whole spec file: one experiment with its subjects (or styles) and the four stage sections."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from proxytune.spec.common import PlainName, Seed, Strict
from proxytune.spec.evaluation import EvaluationSpec
from proxytune.spec.resources import ResourcesSpec
from proxytune.spec.student import StudentSpec
from proxytune.spec.style import StyleSpec, StyleStudentSpec
from proxytune.spec.subject import SubjectSpec
from proxytune.spec.synthesis import SynthesisSpec
from proxytune.spec.teacher import TeacherSpec
from proxytune.spec.tracking import TrackingSpec


class ExperimentSpec(Strict):
    """A proxytune spec: `proxytune apply` turns it into DVC stages and MLflow runs."""

    name: PlainName = Field(description="Experiment name; folder runs/NAME and MLflow experiment.")
    seed: Seed = Field(default=0, description="Base seed for every stage.")
    subjects: list[SubjectSpec] = Field(default_factory=list, description="Subjects to personalise, each on its own.")
    styles: list[StyleSpec] = Field(
        default_factory=list,
        description="Styles to learn (StyleAR): each gets a style teacher, a curated set and a style student "
        "(Lumina-mGPT) that draws any prompt in the style of an image. Next to or instead of subjects.",
    )
    style_student: StyleStudentSpec = Field(default_factory=StyleStudentSpec,
                                            description="Style tokens of the style students (CLIP encoder, resampler, noise).")
    teacher: TeacherSpec = Field(default_factory=TeacherSpec, description="Diffusion teacher (DreamBooth LoRA).")
    synthesis: SynthesisSpec = Field(default_factory=SynthesisSpec, description="Proxy set generation.")
    student: StudentSpec = Field(default_factory=StudentSpec, description="AR student (LoRA on proxies).")
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec, description="DreamBench evaluation.")
    tracking: TrackingSpec = Field(default_factory=TrackingSpec, description="MLflow tracking and registry.")
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec,
                                     description="CPUs and GPUs per kind of stage on a Ray cluster (apply --executor ray).")
    memory: Literal["checkpointing", "auto", "manual"] = Field(
        default="checkpointing",
        description="What `apply` may change so that each stage fits the GPU it runs on (plan's estimate for the card "
        "apply finds, or the one --gpu/--memory names; on CPU nothing changes). checkpointing: turn on "
        "gradient_checkpointing for a teacher or student that does not fit, where the spec leaves it unset (the same "
        "numbers, more time). auto: also the fewest other options plan weighs (precision, 8-bit AdamW, batch_size "
        "with gradient_accumulation_steps raised to keep the images per step, synthesis dtype), as `proxytune plan` "
        "suggests. manual: the spec's own values. What was chosen is printed and recorded in the params files.",
    )

    @model_validator(mode="after")
    def _unique_subjects(self) -> "ExperimentSpec":
        if not self.subjects and not self.styles:
            raise ValueError("subjects: needs at least one subject (or a styles: section)")
        seen: set[str] = set()
        for subject in self.subjects:
            if subject.name in seen:
                raise ValueError(f"subjects: duplicate subject name {subject.name!r}")
            seen.add(subject.name)
        for i, style in enumerate(self.styles):  # subjects and styles share runs/EXPERIMENT/NAME
            if style.name in seen:
                raise ValueError(f"styles[{i}].name: {style.name!r} is already a subject or style of this experiment")
            seen.add(style.name)
        return self

    @model_validator(mode="after")
    def _style_student_backend(self) -> "ExperimentSpec":
        from proxytune import builtins

        model = self.student.model
        if self.styles and model in builtins.model_names("student") and "janus" in model:
            raise ValueError(f"student.model: a style student needs the Lumina-mGPT or LlamaGen backend (e.g. "
                             f"tiny-lumina-mgpt, tiny-llamagen), not {model!r}")
        if self.styles and self.student.multi_subject:
            raise ValueError("student.multi_subject: not with styles (each style has its own student)")
        return self

    @model_validator(mode="after")
    def _multi_subject(self) -> "ExperimentSpec":
        if not self.student.multi_subject:
            return self
        if len(self.subjects) < 2:
            raise ValueError("student.multi_subject: needs at least two subjects")
        tokens = [s.token for s in self.subjects]
        if len(set(tokens)) < len(tokens):
            raise ValueError(f"student.multi_subject: every subject needs its own token (got {tokens}), e.g. S1*, S2*")
        if self.student.recipe != "proxy":
            raise ValueError("student.multi_subject: only the proxy recipe learns several subjects at once")
        if self.student.variants:
            raise ValueError("student.variants: not with multi_subject (run the variants as their own experiments)")
        return self

    @model_validator(mode="after")
    def _toy_world_evaluation(self) -> "ExperimentSpec":
        from proxytune.spec.subject import installed_world

        if self.evaluation.prompts == "toyworld":
            classes = installed_world("toyworld").classes
            for i, subject in enumerate(self.subjects):
                if subject.class_noun not in classes:
                    raise ValueError(f"evaluation.prompts: 'toyworld' prompts are for the toy world's classes "
                                     f"({', '.join(classes)}); subjects[{i}] is a {subject.class_noun!r}")
        checks = [("student.proxy_count.metric", self.student.proxy_count and self.student.proxy_count.metric,
                   " (use dino or clip_i)")]
        checks += [(f"evaluation.gate[{i}].metric", rule.metric, "") for i, rule in enumerate(self.evaluation.gate)]
        for key, name, fix in checks:
            unmeasured = _unmeasured(self, name) if name else None
            if unmeasured:
                metric, subject = unmeasured
                raise ValueError(f"{key}: {name} is measured only for {metric.applies_to}; {subject} is not one{fix}")
        return self


def _unmeasured(spec: ExperimentSpec, name: str):
    """(metric, the first subject it is not measured for) when a subject lacks the subject metric `name`
    (a world's judge scores only that world's subjects), else None."""
    from proxytune import builtins, metrics

    metric = metrics.get("subject", name)
    missing = [s.name for s in spec.subjects if not metric.applies(builtins.world_item(s.images)[0])]
    return (metric, missing[0]) if missing else None
