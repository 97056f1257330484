"""What the HTML page and the Markdown summary both say: formatted numbers, the best model per metric,
lineage rows and the warnings where records disagree, and the fixed notes and banners."""

from __future__ import annotations

from proxytune.report.results import ENCODER_COLUMNS, MODEL_ORDER, StyleResult, SubjectResult

HTML_NAME, MD_NAME = "report.html", "report.md"
RANDOM_INIT_BANNER = "random-initialised models/encoders: numbers test the pipeline, not quality"
TOY_WORLD_LABEL = ("toy world: models pretrained on proxytune's procedural world; CLIP-I, CLIP-T and DINO from its toy "
                   "encoders, subject and prompt accuracy from its oracle (exact attribute readings)")
ORACLE_NOTE = ("Subject acc.: fraction of images in which the oracle finds every distinctive attribute of the subject "
               "that the prompt does not change. Prompt acc.: per image, the fraction of the attributes the prompt asks "
               "for (identifier removed) that the oracle finds, averaged.")
BASE_NOTE = "base-teacher / base-student: the untuned models, on the same prompts and seeds."


def fidelity_line(fidelity: dict, what: str = "proxies", judge: str = "the oracle reads the subject") -> str:
    """One sentence on a scored set: how many were generated and kept, the share above the threshold, the judge's."""
    generated, kept = as_mapping(fidelity.get("generated")), as_mapping(fidelity.get("kept"))

    def share(entry: dict, key: str) -> str:
        return f"{entry[key]:.0%}" if is_number(entry.get(key)) else "—"

    line = (f"{generated.get('count', '?')} {what} generated, {kept.get('count', '?')} kept; "
            f"{fidelity.get('metric', '?')} above {fidelity.get('threshold', '?')}: {share(generated, 'share_above')} of "
            f"the generated, {share(kept, 'share_above')} of the kept (mean {fmt(generated.get('mean'))} / "
            f"{fmt(kept.get('mean'))})")
    if is_number(generated.get("judge_share")):
        line += f"; {judge} in {share(generated, 'judge_share')} of the generated, {share(kept, 'judge_share')} of the kept"
    return line + "."


def as_mapping(value) -> dict:
    return value if isinstance(value, dict) else {}


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def fmt(value, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if is_number(value) else "—"


def fmt_ci(entry) -> str:
    """'mean [lo, hi]' of a {"mean", "ci95"} entry; '—' where absent."""
    if not isinstance(entry, dict) or not is_number(entry.get("mean")):
        return "—"
    ci = entry.get("ci95")
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(is_number(v) for v in ci):
        return f"{entry['mean']:.4f} [{ci[0]:.4f}, {ci[1]:.4f}]"
    return f"{entry['mean']:.4f}"


def _mean(subject: SubjectResult, model: str, metric: str):
    entry = subject.metrics["models"].get(model, {}).get(metric)
    return entry.get("mean") if isinstance(entry, dict) and is_number(entry.get("mean")) else None


def best_models(subject: SubjectResult) -> dict[str, str]:
    """Per metric, the model with the highest mean (only when there are at least two models)."""
    best = {}
    for metric, _ in subject.columns:
        scored = [(m, _mean(subject, m, metric)) for m in subject.models]
        scored = [(m, v) for m, v in scored if v is not None]
        if len(scored) > 1:
            best[metric] = max(scored, key=lambda item: item[1])[0]
    return best


def prompt_row(subject: SubjectResult, model: str, index: int) -> dict:
    """One model's per-prompt scores of prompt `index` ({} where missing)."""
    rows = subject.per_prompt.get(model, [])
    return rows[index] if index < len(rows) and isinstance(rows[index], dict) else {}


def notes(subject: SubjectResult) -> list[str]:
    """What the metric table needs explained beyond CLIP-I, CLIP-T and DINO."""
    found = [ORACLE_NOTE] if len(subject.columns) > len(ENCODER_COLUMNS) else []
    return found + ([BASE_NOTE] if any(m in subject.models for m in MODEL_ORDER if m.startswith("base-")) else [])


def interval_note(meta: dict) -> str:
    """How the table's intervals were computed, from metrics.json's `bootstrap` record."""
    boot = meta.get("bootstrap") or {}
    resamples = boot.get("resamples", "?")
    if boot.get("unit", "image") == "prompt":
        return (f"95% bootstrap intervals resample prompts, each with all its images ({resamples} resamples): "
                "the images of one prompt share it, so they are not independent draws.")
    return (f"95% bootstrap intervals resample single images ({resamples} resamples), as proxytune did before it "
            "resampled prompts: they are too narrow; re-run the evaluate stage for prompt-level intervals.")


def _version(record: dict | None) -> str | None:
    if not record or not record.get("model"):
        return None
    return f"{record['model']}@{record.get('version')}"


def lineage_rows(subject: SubjectResult) -> list[tuple[str, str, str, str]]:
    """(step, what, digest, MLflow run) for references → teacher → proxy set → student → evaluation."""
    teacher, proxy, student, evaluation = (subject.records.get(k) or {} for k in ("teacher", "proxy", "student", "eval"))
    missing = "(no record)"
    clip, dino = subject.encoders.get("clip") or {}, subject.encoders.get("dino") or {}
    oracle = subject.encoders.get("oracle") or {}  # toy world subjects
    encoders = ", ".join(str(e.get("id") or e.get("model") or e.get("name")) for e in (clip, dino, oracle)
                         if isinstance(e, dict) and (e.get("id") or e.get("model") or e.get("name")))
    return [
        ("references", f"{subject.references or '?'} ({len(subject.reference_files)} images)",
         teacher.get("references_digest") or missing, "—"),
        ("teacher", f"{_version(teacher) or missing}, base {teacher.get('base_model', '?')}"
         + (f" (weights {teacher['base_model_digest'][:12]})" if teacher.get("base_model_digest") else ""),
         teacher.get("adapter_digest") or missing, teacher.get("run_id") or "—"),
        ("proxy set", f"{proxy.get('num_images', '?')} images from {proxy.get('teacher_version', '?')}",
         proxy.get("digest") or missing, proxy.get("run_id") or "—"),
        ("student", f"{_version(student) or missing}, base {student.get('base_model', '?')}"
         + (f" (weights {student['base_model_digest'][:12]})" if student.get("base_model_digest") else ""),
         student.get("adapter_digest") or missing, student.get("run_id") or "—"),
        ("evaluation", f"{evaluation.get('teacher_version', '?')} vs {evaluation.get('student_version', '?')}"
         + (f"; encoders {encoders}" if encoders else ""), "—", evaluation.get("run_id") or missing),
    ]


def lineage_warnings(subject: SubjectResult, spec_digest: str) -> list[str]:
    """Disagreements between the records: each stage must name the output it actually consumed."""
    rec = {k: v or {} for k, v in subject.records.items()}
    warnings = [f"{subject.name}: no {step} record" for step in ("teacher", "proxy", "student", "eval") if not subject.records.get(step)]
    teacher, student = _version(rec["teacher"]), _version(rec["student"])
    checks = [
        ("proxy set", "teacher", rec["proxy"].get("teacher_version"), teacher),
        ("student", "teacher", rec["student"].get("teacher_version"), teacher),
        ("student", "proxy set", rec["student"].get("proxy_digest"), rec["proxy"].get("digest")),
        ("evaluation", "teacher", rec["eval"].get("teacher_version"), teacher),
        ("evaluation", "student", rec["eval"].get("student_version"), student),
    ]
    if subject.gate:
        checks.append(("gate", "student", subject.gate.get("student_version"), student))
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
    if r.get("teacher"):
        rows.append(("style teacher", f"{r['teacher'].get('model')}@{r['teacher'].get('version')}",
                     str(r["teacher"].get("adapter_digest")), str(r["teacher"].get("run_id"))))
    if r.get("curated"):
        rows.append(("curated set", f"{r['curated'].get('num_images')} stylised + {r['curated'].get('raw_images')} raw pairs",
                     str(r["curated"].get("digest")), str(r["curated"].get("run_id"))))
    if r.get("student"):
        rows.append(("style student", f"{r['student'].get('model')}@{r['student'].get('version')}",
                     str(r["student"].get("adapter_digest")), str(r["student"].get("run_id"))))
    if r.get("eval"):
        rows.append(("evaluation", "metrics", "", str(r["eval"].get("run_id"))))
    return rows
