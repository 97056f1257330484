"""`proxytune report`: one self-contained HTML page and a Markdown summary per experiment.

The report reads only what the stages wrote under runs/EXPERIMENT/SUBJECT/ (params.yaml, the stage
records and the evaluation folder eval/); it runs no model. Every picture and chart is embedded as a
data: URI and a Content-Security-Policy forbids any other source, so the page opens offline, from
an MLflow artifact view or from a mail attachment exactly as it was written.

    report = load_report("specs/dog.yaml", root)   # ProxytuneError when a subject has no eval/ yet
    files = write_report("specs/dog.yaml", root)   # runs/EXP/report.html and runs/EXP/report.md

The package, in the order the data flows: load (stage outputs -> results' dataclasses), content (the
numbers, notes and lineage both renderings show), charts (pictures as data: URIs), page (HTML from
templates/) and markdown.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from proxytune import layout
from proxytune.files import write_text_atomic
from proxytune.report.charts import THUMB, data_uri, distance_histogram, thumbnail_uri, variance_chart
from proxytune.report.content import (HTML_NAME, MD_NAME, RANDOM_INIT_BANNER, TOY_WORLD_LABEL, best_models, fmt, fmt_ci,
                                      interval_note, lineage_rows, lineage_warnings)
from proxytune.report.load import IMAGE_NAME, load_report, load_style, load_subject
from proxytune.report.markdown import md, render_markdown
from proxytune.report.page import GRID_REFERENCES, esc, render_html
from proxytune.report.results import Report, StyleResult, SubjectResult

__all__ = [
    "GRID_REFERENCES", "HTML_NAME", "IMAGE_NAME", "MD_NAME", "RANDOM_INIT_BANNER", "THUMB", "TOY_WORLD_LABEL",
    "Report", "ReportFiles", "StyleResult", "SubjectResult", "best_models", "data_uri", "distance_histogram", "esc",
    "fmt", "fmt_ci", "interval_note", "lineage_rows", "lineage_warnings", "load_report", "load_style", "load_subject",
    "md", "render_html", "render_markdown", "thumbnail_uri", "variance_chart", "write_report",
]


@dataclass
class ReportFiles:
    html: Path
    md: Path
    report: Report


def write_report(spec_path: str | Path, root: Path) -> ReportFiles:
    """Write runs/EXPERIMENT/report.html and report.md; return their paths (nothing is logged)."""
    report = load_report(spec_path, root)
    out = root / layout.RUNS_DIR / report.experiment
    html_path, md_path = out / HTML_NAME, out / MD_NAME
    write_text_atomic(html_path, render_html(report))
    write_text_atomic(md_path, render_markdown(report))
    return ReportFiles(html=html_path, md=md_path, report=report)
