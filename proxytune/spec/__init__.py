"""Spec layer: parse a YAML file into a typed ExperimentSpec, with one-line errors naming the key."""

from __future__ import annotations

import os
import re
from pathlib import Path

from pydantic import ValidationError

from proxytune.errors import SpecError
from proxytune.spec.evaluation import EvaluationSpec
from proxytune.spec.experiment import ExperimentSpec
from proxytune.spec.source import read_spec_data
from proxytune.spec.student import StudentSpec
from proxytune.spec.subject import SubjectSpec
from proxytune.spec.synthesis import SynthesisSpec
from proxytune.spec.teacher import TeacherSpec
from proxytune.spec.tracking import TrackingSpec

__all__ = [
    "ExperimentSpec",
    "SubjectSpec",
    "TeacherSpec",
    "SynthesisSpec",
    "StudentSpec",
    "EvaluationSpec",
    "TrackingSpec",
    "load_spec",
    "parse_spec",
    "resolve_images",
    "dreambench_root",
]


def _key_path(loc: tuple) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif item in ("function-after", "function-before", "literal['dreambench']", "list[str]") or "[" in str(item):
            continue  # pydantic's union/validator branch labels are not keys
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts) or "(top level)"


def _message(err: dict) -> str:
    kind, msg = err["type"], err["msg"]
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required key is missing"
    if kind == "finite_number":
        return "must be a finite number (not NaN or infinity)"
    if kind in ("greater_than", "int_type", "int_parsing", "int_from_float") and err.get("ctx", {}).get("gt") == 0:
        return "must be a positive integer"
    return msg.removeprefix("Value error, ")


_NAMED_KEY = re.compile(r"^[a-z_]+(\.[a-z_]+|\[\d+\])*: ")


def format_validation_error(source: str, error: ValidationError) -> str:
    """First error as `file: key.path: message` (one line; the count of others follows)."""
    errors = error.errors()
    first = errors[0]
    key, message = _key_path(first["loc"]), _message(first)
    if not first["loc"] and _NAMED_KEY.match(message):  # a whole-spec check names its key itself
        line = f"{source}: {message}"
    else:
        line = f"{source}: {key}: {message}"
    if len(errors) > 1:
        line += f" (and {len(errors) - 1} more)"
    return line


def parse_spec(data: object, source: str) -> ExperimentSpec:
    if not isinstance(data, dict):
        raise SpecError(f"{source}: (top level): must be a mapping of keys (name, subjects, teacher, ...)")
    try:
        return ExperimentSpec.model_validate(data)
    except ValidationError as err:
        raise SpecError(format_validation_error(source, err)) from None


def load_spec(path: str | Path) -> ExperimentSpec:
    """Read and validate a spec file.

    Raises:
        SpecError: missing or unreadable file, not UTF-8, malformed YAML, YAML tags or alias bombs, unknown
            keys, wrong types or values.
    """
    path = Path(path)
    data = read_spec_data(path)  # UTF-8, plain YAML data only, no alias bombs (see proxytune.spec.source)
    return parse_spec(data, str(path))


def dreambench_root() -> Path:
    """Local DreamBench copy: $PROXYTUNE_DREAMBENCH, else ./data/dreambench (see `proxytune data dreambench`)."""
    return Path(os.environ.get("PROXYTUNE_DREAMBENCH", "data/dreambench")).expanduser().resolve()


def resolve_images(subject: SubjectSpec, spec_path: str | Path, index: int) -> Path:
    """The subject's reference folder as an absolute path (a world subject's, `images: toyworld:NAME`, is
    written into the model cache once by its world, see `proxytune.builtins.World.subject_references`).

    Raises:
        SpecError: the folder does not exist, or the world or its subject does not.
    """
    if subject.toy_subject is not None:
        from proxytune.spec.subject import installed_world

        try:  # rendered into the model cache on first use
            return installed_world(subject.world).subject_references(subject.toy_subject)
        except ValueError as err:
            raise SpecError(f"{spec_path}: subjects[{index}].images: {err}") from None
        except KeyError:
            raise SpecError(f"{spec_path}: subjects[{index}].images: unknown toy subject {subject.toy_subject!r}") from None
    if subject.images.startswith("dreambench:"):
        name = subject.images.split(":", 1)[1]
        folder = dreambench_root() / name
        hint = " (set PROXYTUNE_DREAMBENCH or run `proxytune data dreambench`)"
    else:
        folder = (Path(spec_path).parent / subject.images).expanduser()
        hint = ""
        try:
            folder = folder.resolve()
        except (RuntimeError, OSError):  # RuntimeError: a symlink loop (Python < 3.13; OSError ELOOP later)
            raise SpecError(f"{spec_path}: subjects[{index}].images: {folder} is a symlink loop") from None
    if folder.is_symlink() and not folder.exists():
        raise SpecError(f"{spec_path}: subjects[{index}].images: {folder} is a broken symlink or a symlink loop")
    if folder.exists() and not folder.is_dir():
        raise SpecError(f"{spec_path}: subjects[{index}].images: {folder} is a file, not a folder of images")
    if not folder.is_dir():
        raise SpecError(f"{spec_path}: subjects[{index}].images: no such folder {folder}{hint}")
    return folder
