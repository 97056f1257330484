"""What a stage reads: the resolved params file compile wrote for one experiment and subject."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import Field, ValidationError

from proxytune.errors import SpecError
from proxytune.spec import EvaluationSpec, StudentSpec, SubjectSpec, SynthesisSpec, TeacherSpec, TrackingSpec
from proxytune.spec.common import Strict


class SourceInfo(Strict):
    spec_file: str
    spec_digest: str
    references: str
    images: str


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
    members: list[str] | None = None  # a multi-subject student's params: every subject's folder
    student_dir: str | None = None  # a subject of a multi-subject experiment: the shared student's folder
    upstream_dir: str | None = None  # a student variant: the main experiment's subject folder
    path: Path = Field(default=Path("."), exclude=True)

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
