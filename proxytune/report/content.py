"""What the HTML page and the Markdown summary both say: formatted numbers, the best model per metric,
lineage rows and the warnings where records disagree, and the fixed notes and banners."""

from __future__ import annotations

from proxytune.outputs import EvaluationMetrics, Fidelity, FidelitySummary, MetricSummary, RegisteredRecord
from proxytune.report.results import ENCODER_COLUMNS, MODEL_ORDER, StyleResult, SubjectResult

HTML_NAME, MD_NAME = "report.html", "report.md"
RANDOM_INIT_BANNER = "random-initialised models/encoders: numbers test the pipeline, not quality"
TOY_WORLD_LABEL = ("toy world: models pretrained on proxytune's procedural world; CLIP-I, CLIP-T and DINO from its toy "
                   "encoders, subject and prompt accuracy from its oracle (exact attribute readings)")
ORACLE_NOTE = ("Subject acc.: fraction of images in which the oracle finds every distinctive attribute of the subject "
               "that the prompt does not change. Prompt acc.: per image, the fraction of the attributes the prompt asks "
               "for (identifier removed) that the oracle finds, averaged.")
BASE_NOTE = "base-teacher / base-student: the untuned models, on the same prompts and seeds."


def fidelity_line(fidelity: Fidelity, what: str = "proxies", judge: str = "the oracle reads the subject") -> str:
    """One sentence on a scored set: how many were generated and kept, the share above the threshold, the judge's."""
    generated, kept = fidelity.generated, fidelity.kept

    def share(entry: FidelitySummary, key: str) -> str:
        value = getattr(entry, key)
        return f"{value:.0%}" if is_number(value) else "—"

    line = (f"{generated.count} {what} generated, {kept.count} kept; "
            f"{fidelity.metric} above {fidelity.threshold}: {share(generated, 'share_above')} of "
            f"the generated, {share(kept, 'share_above')} of the kept (mean {fmt(generated.mean)} / "
            f"{fmt(kept.mean)})")
    if is_number(generated.judge_share):
        line += f"; {judge} in {share(generated, 'judge_share')} of the generated, {share(kept, 'judge_share')} of the kept"
    return line + "."


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def fmt(value, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if is_number(value) else "—"


def fmt_ci(entry: MetricSummary | None) -> str:
    """'mean [lo, hi]' of a metric's summary; '—' where absent."""
    if entry is None:
        return "—"
    low, high = entry.ci95
    return f"{entry.mean:.4f} [{low:.4f}, {high:.4f}]"


def _mean(subject: SubjectResult, model: str, metric: str) -> float | None:
    entry = subject.metrics.models.get(model, {}).get(metric)
    return entry.mean if entry is not None else None


def best_models(subject: SubjectResult) -> dict[str, str]:
    """Per metric, the model with the highest mean (only when there are at least two models)."""
    best = {}
    for metric, _ in subject.columns:
        scored = [(m, _mean(subject, m, metric)) for m in subject.models]
        scored = [(m, v) for m, v in scored if v is not None]
        if len(scored) > 1:
            best[metric] = max(scored, key=lambda item: item[1])[0]
    return best


def prompt_row(subject: SubjectResult, model: str, index: int) -> dict[str, float | None]:
    """One model's per-prompt scores of prompt `index`, metric -> mean ({} where missing)."""
    rows = subject.per_prompt.get(model, [])
    return rows[index].scores if index < len(rows) else {}


def notes(subject: SubjectResult) -> list[str]:
    """What the metric table needs explained beyond CLIP-I, CLIP-T and DINO."""
    found = [ORACLE_NOTE] if len(subject.columns) > len(ENCODER_COLUMNS) else []
    return found + ([BASE_NOTE] if any(m in subject.models for m in MODEL_ORDER if m.startswith("base-")) else [])


def interval_note(meta: EvaluationMetrics) -> str:
    """How the table's intervals were computed, from metrics.json's `bootstrap` record."""
    boot = meta.bootstrap
    resamples = boot.resamples if boot else "?"
    if boot and boot.unit == "prompt":
        return (f"95% bootstrap intervals resample prompts, each with all its images ({resamples} resamples): "
                "the images of one prompt share it, so they are not independent draws.")
    return (f"95% bootstrap intervals resample single images ({resamples} resamples), as proxytune did before it "
            "resampled prompts: they are too narrow; re-run the evaluate stage for prompt-level intervals.")


def _version(record: RegisteredRecord | None) -> str | None:
    if record is None or not record.model:
        return None
    return f"{record.model}@{record.version}"


def _or(value, missing: str = "?") -> str:
    return missing if value is None else str(value)


def _base(record: RegisteredRecord | None) -> str:
    """', base MODEL' and the shipped weights' digest where the record has one."""
    text = f", base {_or(record.base_model if record else None)}"
    return text + (f" (weights {record.base_model_digest[:12]})" if record and record.base_model_digest else "")


def lineage_rows(subject: SubjectResult) -> list[tuple[str, str, str, str]]:
    """(step, what, digest, MLflow run) for references → teacher → proxy set → student → evaluation."""
    r = subject.records
    teacher, proxy, student, evaluation = r.teacher, r.proxy, r.student, r.eval
    missing = "(no record)"
    found = subject.encoders
    encoders = ", ".join(e.model for e in ((found.clip, found.dino, found.oracle) if found else ()) if e and e.model)
    return [
        ("references", f"{subject.references or '?'} ({len(subject.reference_files)} images)",
         (teacher and teacher.references_digest) or missing, "—"),
        ("teacher", f"{_version(teacher) or missing}{_base(teacher)}",
         (teacher and teacher.adapter_digest) or missing, (teacher and teacher.run_id) or "—"),
        ("proxy set", f"{_or(proxy and proxy.num_images)} images from {_or(proxy and proxy.teacher_version)}",
         (proxy and proxy.digest) or missing, (proxy and proxy.run_id) or "—"),
        ("student", f"{_version(student) or missing}{_base(student)}",
         (student and student.adapter_digest) or missing, (student and student.run_id) or "—"),
        ("evaluation", f"{_or(evaluation and evaluation.teacher_version)} vs {_or(evaluation and evaluation.student_version)}"
         + (f"; encoders {encoders}" if encoders else ""), "—", (evaluation and evaluation.run_id) or missing),
    ]


def lineage_warnings(subject: SubjectResult, spec_digest: str) -> list[str]:
    """Disagreements between the records: each stage must name the output it actually consumed."""
    r = subject.records
    warnings = [f"{subject.name}: no {step} record" for step in ("teacher", "proxy", "student", "eval")
                if getattr(r, step) is None]
    teacher, student = _version(r.teacher), _version(r.student)
    checks = [
        ("proxy set", "teacher", r.proxy and r.proxy.teacher_version, teacher),
        ("student", "teacher", r.student and r.student.teacher_version, teacher),
        ("student", "proxy set", r.student and r.student.proxy_digest, r.proxy and r.proxy.digest),
        ("evaluation", "teacher", r.eval and r.eval.teacher_version, teacher),
        ("evaluation", "student", r.eval and r.eval.student_version, student),
    ]
    if subject.gate:
        checks.append(("gate", "student", subject.gate.student_version, student))
    for step, upstream, seen, actual in checks:
        if seen and actual and seen != actual:
            warnings.append(f"{subject.name}: {step} record names {upstream} {seen}, but the {upstream} record is {actual}")
    if subject.params_spec_digest and subject.params_spec_digest != spec_digest:
        warnings.append(f"{subject.name}: the spec changed since these results were compiled; "
                        "run `proxytune apply` to refresh them")
    return warnings


def style_lineage_rows(style: StyleResult) -> list[tuple[str, str, str, str]]:
    """(step, what, digest, MLflow run) for style teacher → curated set → style student → evaluation."""
    r = style.records
    rows = []
    if r.teacher:
        rows.append(("style teacher", f"{r.teacher.model}@{r.teacher.version}", str(r.teacher.adapter_digest),
                     str(r.teacher.run_id)))
    if r.curated:
        rows.append(("curated set", f"{r.curated.num_images} stylised + {r.curated.raw_images} raw pairs",
                     str(r.curated.digest), str(r.curated.run_id)))
    if r.student:
        rows.append(("style student", f"{r.student.model}@{r.student.version}", str(r.student.adapter_digest),
                     str(r.student.run_id)))
    if r.eval:
        rows.append(("evaluation", "metrics", "", str(r.eval.run_id)))
    return rows
