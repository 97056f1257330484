"""Reading what the stages wrote into the report's dataclasses (results.py).

Every file is parsed by the model its stage wrote it with (proxytune.outputs: one-line errors that name
the file and the field), and the dataclasses carry those models: the templates read their attributes.
A subject's params.yaml is read by the stages' own `load_params`.
"""

from __future__ import annotations

import re
from pathlib import Path

from proxytune import compile as compiler
from proxytune import layout
from proxytune.errors import ProxytuneError
from proxytune.files import sha256_bytes
from proxytune.images import IMAGE_SUFFIXES
from proxytune.outputs import (CuratedManifest, Fidelity, ProxyManifest, load_evaluation, load_style_records,
                               load_subject_records)
from proxytune.report.results import Report, StyleResult, SubjectResult
from proxytune.stages.params import StageParams, load_params

IMAGE_NAME = re.compile(r"^p(\d+)_k(\d+)\.png$")  # eval/images/MODEL/: prompt index, image index


def _generated_images(folder: Path) -> dict[str, dict[int, list[Path]]]:
    found: dict[str, dict[int, list[tuple[int, Path]]]] = {}
    if folder.is_dir():
        for model_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
            for path in model_dir.iterdir():
                match = IMAGE_NAME.match(path.name)
                if match and path.is_file():
                    prompt, k = int(match.group(1)), int(match.group(2))
                    found.setdefault(model_dir.name, {}).setdefault(prompt, []).append((k, path))
    return {model: {p: [path for _, path in sorted(files)] for p, files in prompts.items()}
            for model, prompts in found.items()}


def _fidelity(folder: Path, model: type[ProxyManifest] | type[CuratedManifest]) -> Fidelity | None:
    """The `fidelity` of a proxy or curated set's manifest.json, or None (no manifest, or not scored)."""
    manifest = model.read_optional(folder / layout.MANIFEST_FILE)
    return manifest.fidelity if manifest is not None else None


def _params(root: Path, folder: Path, spec_path: str) -> StageParams:
    """The subject's or style's params.yaml, checked as the stages check it."""
    path = folder / layout.PARAMS_FILE
    if not path.exists():
        raise ProxytuneError(f"{path}: missing; run `proxytune apply {spec_path}` first")
    return load_params(path, root)


def _reference_files(root: Path, params: StageParams) -> list[Path]:
    """The reference images the params file names (empty when the folder is gone)."""
    folder = root / params.source.references
    if not params.source.references or not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def load_subject(root: Path, experiment: str, name: str, spec_path: str, label: str | None = None) -> SubjectResult:
    """Read one subject's params, records and evaluation output (`label`: its name in the report,
    e.g. "dog / direct" for a student variant; default the subject's name).

    Raises:
        ProxytuneError: the subject has not been evaluated yet, or its evaluation output or params file is
            incomplete or malformed.
    """
    folder = (root / layout.subject_dir(experiment, name)).resolve()
    eval_dir = folder / layout.OUT_DIRS["evaluate"]
    if not eval_dir.is_dir():
        raise ProxytuneError(
            f"{layout.subject_dir(experiment, name)}/eval: subject {name} has no evaluation yet; "
            f"run `proxytune apply {spec_path}` first"
        )
    params = _params(root, folder, spec_path)
    evaluation = load_evaluation(eval_dir)
    upstream = (root / params.upstream_dir).resolve() if params.upstream_dir else folder  # a variant's
    student = (root / params.student_dir).resolve() if params.student_dir else folder / layout.OUT_DIRS["student"]
    return SubjectResult(
        name=label or name,
        folder=folder,
        token=params.subject.token,
        class_noun=params.subject.class_noun,
        references=params.source.references,
        reference_files=_reference_files(root, params),
        params_spec_digest=params.source.spec_digest,
        metrics=evaluation.metrics,
        prompts=evaluation.prompts,
        per_prompt=evaluation.per_prompt,
        variance=evaluation.variance,
        gate=evaluation.gate,
        encoders=evaluation.encoders,
        records=load_subject_records(upstream, student, eval_dir),
        images=_generated_images(eval_dir / "images"),
        fidelity=_fidelity(upstream / layout.OUT_DIRS["synthesis"], ProxyManifest),
        proxy_folder=upstream / layout.OUT_DIRS["synthesis"],
    )


def load_style(root: Path, experiment: str, name: str, spec_path: str = "the spec") -> StyleResult:
    """One style's evaluation, records and images.

    Raises:
        ProxytuneError: the style has not been evaluated yet, or its output or params file is malformed.
    """
    from proxytune.images import list_images

    folder = root / layout.subject_dir(experiment, name)
    eval_dir = folder / layout.OUT_DIRS["style_evaluate"]
    if not eval_dir.is_dir():
        raise ProxytuneError(f"{eval_dir / layout.METRICS_FILE}: missing; run `proxytune apply` on the spec first")
    params = _params(root, folder, spec_path)
    refs = root / params.source.references
    try:
        reference_files = list_images(refs) if params.source.references else []
    except ProxytuneError:
        reference_files = []
    images: dict[str, dict[int, list[Path]]] = {}
    for model_dir in sorted((eval_dir / "images").glob("*")) if (eval_dir / "images").is_dir() else []:
        for path in sorted(model_dir.glob("*.png")):
            match = IMAGE_NAME.match(path.name)
            if match:
                images.setdefault(model_dir.name, {}).setdefault(int(match.group(1)), []).append(path)
    evaluation = load_evaluation(eval_dir)
    return StyleResult(name=name, folder=folder, reference_files=reference_files, metrics=evaluation.metrics,
                       prompts=evaluation.prompts, encoders=evaluation.encoders, records=load_style_records(folder),
                       images=images, fidelity=_fidelity(folder / layout.OUT_DIRS["curation"], CuratedManifest),
                       curated_folder=folder / layout.OUT_DIRS["curation"])


def load_report(spec_path: str | Path, root: Path) -> Report:
    """Load the spec and every subject's and style's results.

    Raises:
        ProxytuneError: bad spec, or a subject without (complete) evaluation output.
    """
    from proxytune.spec import load_spec

    spec = load_spec(spec_path)
    raw = Path(spec_path).read_bytes()
    subjects = [load_subject(root, spec.name, s.name, str(spec_path)) for s in spec.subjects]
    subjects += [load_subject(root, layout.variant_experiment(spec.name, v), s.name, str(spec_path), f"{s.name} / {v}")
                 for v in spec.student.variants for s in spec.subjects]
    return Report(
        experiment=spec.name,
        mlflow_experiment=spec.tracking.experiment or spec.name,
        tracking_uri=spec.tracking.uri,
        spec_path=compiler.relative_to_root(Path(spec_path), root),
        spec_text=raw.decode("utf-8", errors="replace"),
        spec_digest=sha256_bytes(raw),
        subjects=subjects,
        styles=[load_style(root, spec.name, s.name, str(spec_path)) for s in spec.styles],
    )
