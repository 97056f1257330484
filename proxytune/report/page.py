"""The HTML page: jinja2 templates (templates/) with autoescape on, fed the report's dataclasses.

The page is self-contained: inline CSS and script, every picture a data: URI, and a
Content-Security-Policy (in page.html) that forbids any other source.
"""

from __future__ import annotations

import html
import re
from functools import lru_cache

from jinja2 import Environment, PackageLoader, StrictUndefined
from markupsafe import Markup

from proxytune.report import charts, content
from proxytune.report.results import ENCODER_COLUMNS, Report, SubjectResult, style_labels

GRID_REFERENCES = 4  # reference photos shown at the start of every grid row


def esc(value) -> Markup:
    """The page's escaping: the environment applies it to every {{ value }} (its `finalize`; autoescape then
    leaves the result alone). It is html.escape with quotes, so the page keeps the entities it always had
    (&quot;, &#x27;) rather than markupsafe's (&#34;, &#39;). Markup (a macro's output) passes unchanged."""
    if isinstance(value, Markup):
        return value
    return Markup(html.escape(str(value), quote=True))


def anchor(subject: SubjectResult) -> str:
    return "subject-" + re.sub(r"[^A-Za-z0-9_-]", "-", subject.name)


def grid_rows(subject: SubjectResult) -> list[tuple[int, str]]:
    """(index, prompt) of each image-grid row: every prompt, and any prompt index with images but no prompt."""
    count = max([len(subject.prompts)] + [max(v) + 1 for v in subject.images.values() if v])
    return [(i, subject.prompts[i] if i < len(subject.prompts) else "(prompt not listed)") for i in range(count)]


def reference_thumbnails(subject: SubjectResult) -> list[tuple[str, str]]:
    """(file name, data: URI) of the reference photos shown at the start of every grid row."""
    return [(p.name, charts.thumbnail_uri(p, square=True)) for p in subject.reference_files[:GRID_REFERENCES]]


@lru_cache(maxsize=1)
def environment() -> Environment:
    env = Environment(loader=PackageLoader("proxytune.report", "templates"), autoescape=True, finalize=esc,
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.globals.update(
        anchor=anchor, grid_rows=grid_rows, reference_thumbnails=reference_thumbnails,
        thumbnail_uri=charts.thumbnail_uri, variance_figures=charts.variance_figures,
        fidelity_figure=charts.fidelity_figure, fidelity_line=content.fidelity_line,
        fmt=content.fmt, fmt_ci=content.fmt_ci, best_models=content.best_models, prompt_row=content.prompt_row,
        notes=content.notes, interval_note=content.interval_note, lineage_rows=content.lineage_rows,
        lineage_warnings=content.lineage_warnings, style_lineage_rows=content.style_lineage_rows,
        RANDOM_INIT_BANNER=content.RANDOM_INIT_BANNER, TOY_WORLD_LABEL=content.TOY_WORLD_LABEL,
        ENCODER_COLUMNS=ENCODER_COLUMNS,
    )
    return env


def render_html(report: Report) -> str:
    """The whole page as one string: inline CSS, images as data: URIs, no external reference."""
    return environment().get_template("page.html").render(report=report, title=f"proxytune report: {report.experiment}",
                                                          STYLE_LABELS=style_labels())
