"""What a stage reads: the resolved params file compile wrote for one experiment and subject."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import Field, ValidationError

from proxytune.errors import SpecError
from proxytune.spec import EvaluationSpec, StudentSpec, SubjectSpec, SynthesisSpec, TeacherSpec, TrackingSpec
from proxytune.spec.common import Strict
from proxytune.spec.evaluation import Metric
from proxytune.spec.style import STYLE_INSTANCE_PROMPT, StyleSpec, StyleStudentSpec


class SourceInfo(Strict):
    spec_file: str
    spec_digest: str
    references: str
    images: str
    raw: str | None = None  # a style's raw-data folder


class GrowParams(Strict):
    """Where a stage sits in a growing proxy count (compile writes it; the spec is student.proxy_count)."""

    index: int | None  # the step's position in proxy_count.grow; None: the subject's own, chosen student
    metric: Metric  # the held-out score
    state: str | None  # the proxy_count.json it reads: the previous step's (None: the first step) or the last one's


class StageParams(Strict):
    experiment: str
    seed: int
    subject: SubjectSpec
    teacher: TeacherSpec
    synthesis: SynthesisSpec
    student: StudentSpec
    evaluation: EvaluationSpec
    tracking: TrackingSpec
    source: SourceInfo
    # a joint (multi-subject) student's params: every subject's folder (key "members" in the params file)
    joint_subjects: list[str] | None = Field(default=None, alias="members")
    student_dir: str | None = None  # a subject of a joint (multi-subject) experiment: the joint student's folder
    upstream_dir: str | None = None  # a student variant: the main experiment's subject folder
    style: StyleSpec | None = None  # a style's params: the style (curation prompts resolved to a list)
    style_student: StyleStudentSpec | None = None
    grow: GrowParams | None = None  # a step of a growing proxy count, or its selection
    path: Path = Field(default=Path("."), exclude=True)

    @property
    def instance_prompt(self) -> str:
        """What the teacher learns on the references: "a {token} {class}" for a subject, "a {class} in
        {token} style" for a style."""
        subject = self.subject
        if self.style is not None:
            return STYLE_INSTANCE_PROMPT.format(token=subject.token, **{"class": subject.class_noun})
        return f"a {subject.token} {subject.class_noun}"

    @property
    def subject_dir(self) -> Path:
        """runs/EXPERIMENT/SUBJECT: the params file's folder, holding every stage's output."""
        return self.path.parent

    def out(self, name: str) -> Path:
        """An output folder of this subject; a variant reads teacher, proxies and codes upstream."""
        if self.upstream_dir and name in ("teacher", "proxy", "codes"):
            return Path(self.upstream_dir) / name
        return self.subject_dir / name

    def student_out(self) -> Path:
        """Where this subject's student is: its own folder, or the experiment's shared one."""
        return Path(self.student_dir) if self.student_dir else self.out("student")

    def work(self, stage: str) -> Path:
        """Scratch folder for resumable checkpoints (not a DVC output; survives a crash)."""
        return self.subject_dir / ".work" / stage

    @property
    def references_dir(self) -> Path:
        return Path(self.source.references).resolve()


def load_params(path: str | Path) -> StageParams:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
        data["subject"]["images"] = data["source"]["images"]
        params = StageParams.model_validate(data)
    except FileNotFoundError:
        raise SpecError(f"{path}: no such params file (run `proxytune compile` first)") from None
    except (yaml.YAMLError, KeyError, TypeError) as err:
        raise SpecError(f"{path}: malformed params file ({err}); re-run `proxytune compile`") from None
    except ValidationError as err:
        raise SpecError(f"{path}: {err.errors()[0]['loc']}: {err.errors()[0]['msg']}") from None
    params.path = path
    return params
