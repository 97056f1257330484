"""Reading what the stages wrote into the report's dataclasses (results.py).

Every file is first parsed by the model its stage wrote it with (proxytune.outputs: one-line errors
that name the file and the field); the dataclasses then carry the same files as plain mappings, which
is what the templates read.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from proxytune import compile as compiler
from proxytune import layout
from proxytune.errors import ProxytuneError
from proxytune.files import sha256_bytes
from proxytune.images import IMAGE_SUFFIXES
from proxytune.outputs import CuratedManifest, ProxyManifest, load_evaluation, load_style_records, load_subject_records
from proxytune.report.content import as_mapping
from proxytune.report.results import Report, StyleResult, SubjectResult

IMAGE_NAME = re.compile(r"^p(\d+)_k(\d+)\.png$")  # eval/images/MODEL/: prompt index, image index


def _read_json(path: Path, required: bool = True):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        if required:
            raise ProxytuneError(f"{path}: missing from the evaluation output; re-run `proxytune apply`") from None
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ProxytuneError(f"{path}: not valid JSON ({err}); re-run `proxytune apply`") from None


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


def _fidelity(folder: Path, model) -> dict | None:
    """The `fidelity` of a proxy or curated set's manifest.json (checked by its model), or None."""
    path = folder / layout.MANIFEST_FILE
    if model.read_optional(path) is None:
        return None
    return as_mapping(_read_json(path).get("fidelity")) or None


def load_subject(root: Path, experiment: str, name: str, spec_path: str, label: str | None = None) -> SubjectResult:
    """Read one subject's params, records and evaluation output (`label`: its name in the report,
    e.g. "dog / direct" for a student variant; default the subject's name).

    Raises:
        ProxytuneError: the subject has not been evaluated yet, or its evaluation output is
            incomplete or malformed.
    """
    folder = (root / layout.subject_dir(experiment, name)).resolve()
    eval_dir = folder / layout.OUT_DIRS["evaluate"]
    if not eval_dir.is_dir():
        raise ProxytuneError(
            f"{layout.subject_dir(experiment, name)}/eval: subject {name} has no evaluation yet; "
            f"run `proxytune apply {spec_path}` first"
        )
    try:
        params = yaml.safe_load((folder / layout.PARAMS_FILE).read_text())
    except FileNotFoundError:
        raise ProxytuneError(f"{folder / layout.PARAMS_FILE}: missing; run `proxytune apply {spec_path}` first") from None
    except yaml.YAMLError as err:
        raise ProxytuneError(f"{folder / layout.PARAMS_FILE}: malformed YAML ({err.__class__.__name__})") from None
    params = params if isinstance(params, dict) else {}
    source, subject = as_mapping(params.get("source")), as_mapping(params.get("subject"))

    # every file is checked by the model its stage wrote it with (one-line errors naming file and field);
    # the renderings read the same files as plain mappings
    load_evaluation(eval_dir)
    metrics = _read_json(eval_dir / layout.METRICS_FILE)
    prompts = _read_json(eval_dir / layout.PROMPTS_FILE)
    per_prompt = _read_json(eval_dir / layout.PROMPT_SCORES_FILE)
    variance = _read_json(eval_dir / layout.VARIANCE_FILE, required=False)
    gate = _read_json(eval_dir / layout.GATE_FILE, required=False)
    encoders = as_mapping(_read_json(eval_dir / layout.ENCODERS_FILE, required=False))

    upstream = (root / params["upstream_dir"]).resolve() if params.get("upstream_dir") else folder  # a variant's
    student = (root / params["student_dir"]).resolve() if params.get("student_dir") else folder / layout.OUT_DIRS["student"]
    load_subject_records(upstream, student, eval_dir)  # checked as above
    records = {
        step: as_mapping(_read_json(path, required=False)) or None
        for step, path in (
            ("teacher", upstream / layout.OUT_DIRS["teacher"] / layout.RECORD_FILE),
            ("proxy", upstream / layout.OUT_DIRS["synthesis"] / layout.RECORD_FILE),
            ("student", student / layout.RECORD_FILE),
            ("eval", eval_dir / layout.RECORD_FILE),
        )
    }
    references = str(source.get("references", ""))
    reference_dir = (root / references) if references else None
    reference_files = []
    if reference_dir is not None and reference_dir.is_dir():
        reference_files = sorted(p for p in reference_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    return SubjectResult(
        name=label or name,
        folder=folder,
        token=str(subject.get("token", "")),
        class_noun=str(subject.get("class", "")),
        references=references,
        reference_files=reference_files,
        params_spec_digest=source.get("spec_digest"),
        metrics=metrics,
        prompts=prompts,
        per_prompt=per_prompt,
        variance=variance,
        gate=gate,
        encoders=encoders,
        records=records,
        images=_generated_images(eval_dir / "images"),
        fidelity=_fidelity(upstream / layout.OUT_DIRS["synthesis"], ProxyManifest),
        proxy_folder=upstream / layout.OUT_DIRS["synthesis"],
    )


def _style_json(path: Path, required: bool = True):
    if not path.exists():
        if required:
            raise ProxytuneError(f"{path}: missing; run `proxytune apply` on the spec first")
        return None
    return json.loads(path.read_text())


def load_style(root: Path, experiment: str, name: str) -> StyleResult:
    """One style's evaluation, records and images.

    Raises:
        ProxytuneError: the style has not been evaluated yet.
    """
    from proxytune.images import list_images

    folder = root / layout.subject_dir(experiment, name)
    eval_dir = folder / layout.OUT_DIRS["style_evaluate"]
    params_file = folder / layout.PARAMS_FILE
    source = (yaml.safe_load(params_file.read_text()) or {}).get("source", {}) if params_file.exists() else {}
    refs = (root / source["references"]) if source.get("references") else None
    try:
        reference_files = list_images(refs) if refs is not None else []
    except ProxytuneError:
        reference_files = []
    images: dict[str, dict[int, list[Path]]] = {}
    for model_dir in sorted((eval_dir / "images").glob("*")) if (eval_dir / "images").is_dir() else []:
        for path in sorted(model_dir.glob("*.png")):
            match = IMAGE_NAME.match(path.name)
            if match:
                images.setdefault(model_dir.name, {}).setdefault(int(match.group(1)), []).append(path)
    if not eval_dir.is_dir():
        raise ProxytuneError(f"{eval_dir / layout.METRICS_FILE}: missing; run `proxytune apply` on the spec first")
    load_evaluation(eval_dir)  # checked by the models the style stages wrote them with
    load_style_records(folder)
    records = {step: _style_json(folder / layout.OUT_DIRS[out] / layout.RECORD_FILE, required=False)
               for step, out in (("teacher", "teacher"), ("curated", "curation"), ("student", "style_student"),
                                 ("eval", "style_evaluate"))}
    return StyleResult(name=name, folder=folder, reference_files=reference_files,
                       metrics=_style_json(eval_dir / layout.METRICS_FILE), prompts=_style_json(eval_dir / layout.PROMPTS_FILE),
                       encoders=_style_json(eval_dir / layout.ENCODERS_FILE, required=False) or {}, records=records,
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
        styles=[load_style(root, spec.name, s.name) for s in spec.styles],
    )
