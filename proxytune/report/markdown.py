"""The Markdown summary (report.md): the page's tables and lineage without pictures, for a terminal, a
pull request or MLflow's artifact view."""

from __future__ import annotations

import html
import re

from proxytune.report.content import (HTML_NAME, RANDOM_INIT_BANNER, TOY_WORLD_LABEL, best_models, fidelity_line, fmt,
                                      fmt_ci, interval_note, lineage_rows, lineage_warnings, notes, prompt_row,
                                      style_lineage_rows)
from proxytune.report.results import Report, StyleResult, SubjectResult, style_labels

_MD_SPECIAL = re.compile(r"([\\`*_\[\]|#])")


def md(value) -> str:
    """Text for a Markdown table cell: HTML-escaped, Markdown syntax and pipes backslashed, one line."""
    text = html.escape(" ".join(str(value).split()), quote=False)
    return _MD_SPECIAL.sub(r"\\\1", text)


def _md_code(value: str) -> str:
    """Identifiers (digests, run ids) as code spans; placeholders such as '—' as plain text."""
    return f"`{value}`" if re.fullmatch(r"[0-9A-Za-z._@-]+", value) else md(value)


def _or(value, missing):
    """metrics.json's optional counts: `missing` where an older evaluation left them out."""
    return missing if value is None else value


def md_table(head: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows] + [""]


def _subject(report: Report, subject: SubjectResult) -> list[str]:
    meta = subject.metrics
    best = best_models(subject)
    lines = [f"## Subject {md(subject.name)}", "",
             f"Identifier `{subject.token.replace('`', '')}`, class {md(subject.class_noun)}; "
             f"{_or(meta.prompts, len(subject.prompts))} prompts × {_or(meta.images_per_prompt, '?')} images per model.", ""]
    if subject.random_init:
        lines += [f"> **{RANDOM_INIT_BANNER}**", ""]
    elif subject.toy_world:
        lines += [f"> {TOY_WORLD_LABEL}", ""]
    lines += [f"- warning: {md(w)}" for w in lineage_warnings(subject, report.spec_digest)]
    if lines[-1] != "":
        lines.append("")

    def cell(model: str, metric: str) -> str:
        text = fmt_ci(meta.models[model].get(metric))
        return f"**{text}**" if best.get(metric) == model else text

    lines += ["### Metrics", ""]
    lines += md_table(["model"] + [label for _, label in subject.columns],
                      [[md(m)] + [cell(m, metric) for metric, _ in subject.columns] for m in subject.models])
    lines += [" ".join([interval_note(meta), *notes(subject)]), ""]
    lines += ["### Proxy fidelity", "",
              md(fidelity_line(subject.fidelity, "proxies", "the oracle reads the whole subject")) if subject.fidelity
              else "Not scored.", ""]
    lines += ["### Promotion gate", ""]
    gate = subject.gate
    if gate:
        verdict = "passed" if gate.passed else "failed"
        lines += [f"Rule `{gate.rule.replace('`', '')}`: **{verdict}** ({md(gate.student_version)})", ""]
        lines += [f"- {md(line)}" for line in gate.details] + [""]
    else:
        lines += ["No promotion gate configured.", ""]
    lines += ["### Feature distribution", ""]
    if subject.variance:
        v = subject.variance
        lines += [f"{md(v.feature)}; {v.samples} samples per model of “{md(v.prompt)}”.", ""]
        rows = []
        for model, entry in v.models.items():
            mean = sum(entry.distances) / len(entry.distances) if entry.distances else None
            rows.append([md(model), fmt(entry.total_variance), fmt(mean), str(len(entry.distances))])
        lines += md_table(["model", "total feature variance", "mean L2 distance to centroid", "samples"], rows)
    else:
        lines += ["Not computed.", ""]
    lines += ["### Per-prompt scores", ""]
    head = ["#", "prompt"] + [f"{label} {md(m)}" for _, label in subject.columns for m in subject.models]
    rows = [[f"{i:02d}", md(prompt)] + [fmt(prompt_row(subject, m, i).get(metric)) for metric, _ in subject.columns
                                        for m in subject.models]
            for i, prompt in enumerate(subject.prompts)]
    lines += md_table(head, rows)
    lines += ["### Lineage", ""]
    lines += md_table(["step", "what", "digest (sha256)", "MLflow run"],
                      [[md(step), md(what), _md_code(digest), _md_code(run)] for step, what, digest, run in lineage_rows(subject)])
    return lines


def _style(style: StyleResult) -> list[str]:
    lines = ["", f"## Style {md(style.name)}", ""]
    labels = style_labels()
    lines += md_table(["model"] + [labels[m] for m in style.columns],
                      [[md(model)] + [fmt_ci(values.get(m)) for m in style.columns]
                       for model, values in style.metrics.models.items()])
    if style.fidelity:
        lines += ["", "Curated pairs: " + md(fidelity_line(style.fidelity, "stylised images", "the style detector finds the style"))]
    lines += ["", "Lineage:", ""]
    lines += md_table(["step", "what", "digest", "MLflow run"], [[md(x) for x in row] for row in style_lineage_rows(style)])
    return lines


def render_markdown(report: Report) -> str:
    """The same tables and lineage as the HTML page, without pictures (they are in report.html)."""
    lines = [f"# proxytune report: {md(report.experiment)}", "",
             f"Spec `{report.spec_path.replace('`', '')}` (sha256 `{report.spec_digest}`); "
             f"MLflow experiment {md(report.mlflow_experiment)}; written {report.generated}. "
             f"Images and charts: [{HTML_NAME}]({HTML_NAME}).", ""]
    if report.random_init:
        lines += [f"> **{RANDOM_INIT_BANNER}**", ""]
    elif report.toy_world:
        lines += [f"> {TOY_WORLD_LABEL}", ""]
    lines += ["## Summary", ""]
    rows = []
    for subject in report.subjects:
        gate = subject.gate
        verdict = "—" if not gate else ("passed" if gate.passed else "failed")
        for model in subject.models:
            rows.append([md(subject.name), md(model)]
                        + [fmt_ci(subject.metrics.models[model].get(m)) for m, _ in report.columns] + [verdict])
    lines += md_table(["subject", "model"] + [label for _, label in report.columns] + ["gate"], rows)
    for subject in report.subjects:
        lines += _subject(report, subject)
    for style in report.styles:
        lines += _style(style)
    return "\n".join(lines).rstrip() + "\n"
