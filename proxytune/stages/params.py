"""What a stage reads: the resolved params file compile wrote for one experiment and subject."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, ValidationError

from proxytune import layout
from proxytune.errors import SpecError
from proxytune.spec import EvaluationSpec, StudentSpec, SubjectSpec, SynthesisSpec, TeacherSpec, TrackingSpec
from proxytune.spec.common import SAFE_NAME, Strict
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
    stop_when: Literal["plateau", "paired"]  # the stop rule (student.proxy_count.stop_when)


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
    memory: dict | None = None  # what apply's memory mode chose on its card (proxytune.plan.auto); a record only
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


def load_params(path: str | Path, root: Path | None = None) -> StageParams:
    """Read and check a params file before a stage does any work.

    Args:
        path: runs/EXPERIMENT/SUBJECT/params.yaml (as `proxytune compile` wrote it).
        root: the project the stage runs in. Default: the current folder (DVC runs stages there).
    Raises:
        SpecError: one line naming the file (and the key): missing, malformed, invalid, or naming
            folders outside `root` (see `check_in_project`).
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
        data["subject"]["images"] = data["source"]["images"]
        params = StageParams.model_validate(data)
    except FileNotFoundError:
        raise SpecError(f"{path}: no such params file (run `proxytune compile` first)") from None
    except IsADirectoryError:
        raise SpecError(f"{path}: a folder, not a params file (give runs/EXPERIMENT/SUBJECT/params.yaml)") from None
    except (OSError, UnicodeDecodeError) as err:
        raise SpecError(f"{path}: cannot read the params file ({getattr(err, 'strerror', None) or err})") from None
    except (yaml.YAMLError, KeyError, TypeError) as err:
        raise SpecError(f"{path}: malformed params file ({_one_line(err)}); re-run `proxytune compile`") from None
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(part) for part in first["loc"])
        raise SpecError(f"{path}: {key}: {first['msg']}; re-run `proxytune compile`") from None
    params.path = path
    check_in_project(params, Path.cwd() if root is None else root)
    return params


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _experiment_problem(name: str) -> str | None:
    """Why `name` is not an experiment compile could have written (a spec name, or NAME--VARIANT)."""
    parts = name.split(layout.VARIANT_SEP) if isinstance(name, str) else [name]
    if len(parts) > 2 or not all(isinstance(p, str) and SAFE_NAME.match(p) for p in parts):
        return (f"{name!r} is not an experiment name (1-64 lowercase letters, digits, '-' or '_', optionally "
                f"NAME{layout.VARIANT_SEP}VARIANT; no '/', '..' or spaces)")
    return None


def _same_place(root: Path, a: str | Path, b: str | Path) -> bool:
    return os.path.realpath(root / a) == os.path.realpath(root / b)


def check_in_project(params: StageParams, root: Path) -> None:
    """The folders a stage writes or reads from other stages must be the ones compile names in `root`.

    The params file must be runs/EXPERIMENT/SUBJECT/params.yaml of this project (a joint student's:
    runs/EXPERIMENT/_joint/params.yaml), and student_dir, upstream_dir and members must be what compile
    writes. Otherwise a params file from elsewhere would write another project's outputs and this
    folder's registry, or a crafted name would escape runs/. The references may be anywhere (read only).
    Paths are compared with symlinks resolved: a runs/ folder the user linked to another disk is followed.

    Raises:
        SpecError: one line naming the params file and the key, before any work.
    """
    path, experiment = params.path, params.experiment
    problem = _experiment_problem(experiment)
    if problem:
        raise SpecError(f"{path}: experiment: {problem}; re-run `proxytune compile`")
    base = layout.base_experiment(experiment)
    expected = {
        "student_dir": f"{layout.RUNS_DIR}/{base}/{layout.JOINT}/student",
        "upstream_dir": layout.subject_dir(base, params.subject.name),
    }
    for key, want in expected.items():
        got = getattr(params, key)
        if got is not None and not _same_place(root, got, want):
            raise SpecError(f"{path}: {key}: {got!r} is not {want} (the folder compile names); re-run `proxytune compile`")
    state = params.grow.state if params.grow is not None else None
    if state is not None:
        runs = os.path.realpath(root / layout.RUNS_DIR)
        inside = os.path.relpath(os.path.realpath(root / state), runs).split(os.sep)
        if inside[0] in ("..", ".") or len(inside) < 2 or layout.base_experiment(inside[0]) != base:
            raise SpecError(f"{path}: grow.state: {state!r} is not a step of experiment {base!r} under "
                            f"{layout.RUNS_DIR}/; re-run `proxytune compile`")
    for index, member in enumerate(params.joint_subjects or []):
        name = Path(member).name
        if not (SAFE_NAME.match(name) and _same_place(root, member, layout.subject_dir(experiment, name))):
            raise SpecError(f"{path}: members[{index}]: {member!r} is not a subject folder of experiment {experiment!r} "
                            f"(runs/{experiment}/SUBJECT); re-run `proxytune compile`")
    folder_name = layout.JOINT if params.joint_subjects else params.subject.name
    folder = layout.subject_dir(experiment, folder_name)
    if not _same_place(root, path, f"{folder}/{layout.PARAMS_FILE}"):
        raise SpecError(f"{path}: not {folder}/{layout.PARAMS_FILE} of the project in {root} (experiment "
                        f"{experiment!r}, subject.name {params.subject.name!r}): run `proxytune stage` from the root of "
                        f"the project that holds the file (where its dvc.yaml is), or re-run `proxytune compile` here")
