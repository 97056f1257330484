"""`proxytune report`: one self-contained HTML page and a Markdown summary per experiment.

The report reads only what the stages wrote under runs/EXPERIMENT/SUBJECT/ (params.yaml, the stage
records and the evaluation folder eval/); it runs no model. Every picture and chart is embedded as a
data: URI and a Content-Security-Policy forbids any other source, so the page opens offline, from
an MLflow artifact view or from a mail attachment exactly as it was written.

    report = load_report("specs/dog.yaml", root)   # ProxytuneError when a subject has no eval/ yet
    files = write_report("specs/dog.yaml", root)   # runs/EXP/report.html and runs/EXP/report.md
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from proxytune import compile as compiler
from proxytune import layout
from proxytune.errors import ProxytuneError
from proxytune.files import sha256_bytes, write_text_atomic
from proxytune.images import IMAGE_SUFFIXES, center_crop_resize, open_rgb

METRICS = (("clip_i", "CLIP-I"), ("clip_t", "CLIP-T"), ("dino", "DINO"))
ORACLE_METRICS = (("subject_acc", "subject acc."), ("prompt_acc", "prompt acc."),
                  ("subject_prompt_acc", "subject+prompt acc."))  # toy world subjects only
MODEL_ORDER = ("base-teacher", "teacher", "base-student", "student")  # base-*: the untuned models (evaluation.base_models)
RANDOM_INIT_BANNER = "random-initialised models/encoders: numbers test the pipeline, not quality"
TOY_WORLD_LABEL = ("toy world: models pretrained on proxytune's procedural world; CLIP-I, CLIP-T and DINO from its toy "
                   "encoders, subject and prompt accuracy from its oracle (exact attribute readings)")
ORACLE_NOTE = ("Subject acc.: fraction of images in which the oracle finds every distinctive attribute of the subject "
               "that the prompt does not change. Prompt acc.: per image, the fraction of the attributes the prompt asks "
               "for (identifier removed) that the oracle finds, averaged.")
BASE_NOTE = "base-teacher / base-student: the untuned models, on the same prompts and seeds."
HTML_NAME, MD_NAME = "report.html", "report.md"
THUMB = 128  # pixels: generated and reference images are embedded at most this large
GRID_REFERENCES = 4  # reference photos shown at the start of every grid row
IMAGE_NAME = re.compile(r"^p(\d+)_k(\d+)\.png$")
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"


# -- what one subject's folder holds -----------------------------------------------------------
@dataclass
class SubjectResult:
    """Everything the report shows about one subject, read from runs/EXPERIMENT/SUBJECT/."""

    name: str
    folder: Path  # runs/EXPERIMENT/SUBJECT (absolute)
    token: str
    class_noun: str
    references: str  # the reference folder as params.yaml names it
    reference_files: list[Path]  # empty when the folder is gone
    params_spec_digest: str | None  # digest of the spec the stages ran with
    metrics: dict
    prompts: list[str]
    per_prompt: dict[str, list[dict]]
    variance: dict | None
    gate: dict | None
    encoders: dict
    records: dict[str, dict | None]  # teacher, proxy, student, eval
    images: dict[str, dict[int, list[Path]]]  # model -> prompt index -> files in k order

    @property
    def models(self) -> list[str]:
        """Base and tuned teacher, then base and tuned student, then any other model (metrics.json's
        keys are sorted, so its order says nothing)."""
        known = [m for m in MODEL_ORDER if m in self.metrics["models"]]
        return known + [m for m in self.metrics["models"] if m not in MODEL_ORDER]

    @property
    def grid_models(self) -> list[str]:
        """Models with generated images: metrics order first, then any other image folder."""
        return [m for m in self.models if m in self.images] + sorted(set(self.images) - set(self.models))

    @property
    def random_init(self) -> bool:
        return bool(self.metrics.get("random_init") or self.encoders.get("random_init"))

    @property
    def toy_world(self) -> bool:
        """Every model and encoder came from the toy world (and none is random): the label replaces the banner."""
        return not self.random_init and bool(self.metrics.get("toy_world") or self.encoders.get("toy_world"))

    @property
    def columns(self) -> list[tuple[str, str]]:
        """(metric, label) shown for this subject: CLIP-I, CLIP-T, DINO, then the oracle's where measured."""
        measured = {m for values in self.metrics["models"].values() if isinstance(values, dict) for m in values}
        return [*METRICS, *(c for c in ORACLE_METRICS if c[0] in measured)]

    @property
    def eval_run_id(self) -> str | None:
        return (self.records.get("eval") or {}).get("run_id")


@dataclass
class Report:
    experiment: str
    mlflow_experiment: str
    tracking_uri: str | None
    spec_path: str
    spec_text: str
    spec_digest: str
    subjects: list[SubjectResult]
    generated: str = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    styles: list = field(default_factory=list)  # proxytune.style_report.StyleResult, one per style

    @property
    def random_init(self) -> bool:
        return any(s.random_init for s in self.subjects) or any(s.random_init for s in self.styles)

    @property
    def toy_world(self) -> bool:
        return not self.random_init and any(s.toy_world for s in self.subjects)

    @property
    def columns(self) -> list[tuple[str, str]]:
        """The summary's columns: every metric some subject shows."""
        shown = {c for s in self.subjects for c in s.columns}
        return [c for c in (*METRICS, *ORACLE_METRICS) if c in shown]

    def tags(self) -> dict[str, str]:
        """MLflow tags of the report run (tracking adds the proxytune. prefix)."""
        return {
            "experiment": self.experiment,
            "spec_file": self.spec_path,
            "spec_digest": self.spec_digest,
            "subjects": ",".join(s.name for s in self.subjects),
            **({"styles": ",".join(s.name for s in self.styles)} if self.styles else {}),
            "random_init": str(self.random_init),
            "toy_world": str(self.toy_world),
            "evaluation_runs": ",".join(f"{s.name}:{s.eval_run_id or '-'}" for s in self.subjects),
        }


@dataclass
class ReportFiles:
    html: Path
    md: Path
    report: Report


def _read_json(path: Path, required: bool = True):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        if required:
            raise ProxytuneError(f"{path}: missing from the evaluation output; re-run `proxytune apply`") from None
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ProxytuneError(f"{path}: not valid JSON ({err}); re-run `proxytune apply`") from None


def _mapping(value) -> dict:
    return value if isinstance(value, dict) else {}


def _expect(condition: bool, path: Path, what: str) -> None:
    if not condition:
        raise ProxytuneError(f"{path}: unexpected content ({what}); re-run `proxytune apply`")


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
        params = yaml.safe_load((folder / "params.yaml").read_text())
    except FileNotFoundError:
        raise ProxytuneError(f"{folder / 'params.yaml'}: missing; run `proxytune apply {spec_path}` first") from None
    except yaml.YAMLError as err:
        raise ProxytuneError(f"{folder / 'params.yaml'}: malformed YAML ({err.__class__.__name__})") from None
    params = params if isinstance(params, dict) else {}
    source, subject = _mapping(params.get("source")), _mapping(params.get("subject"))

    metrics = _read_json(eval_dir / "metrics.json")
    _expect(isinstance(metrics, dict) and isinstance(metrics.get("models"), dict) and metrics["models"],
            eval_dir / "metrics.json", "no 'models' mapping")
    for model, values in metrics["models"].items():
        _expect(isinstance(values, dict), eval_dir / "metrics.json", f"models.{model} is not a mapping")
    prompts = _read_json(eval_dir / "prompts.json")
    _expect(isinstance(prompts, list) and all(isinstance(p, str) for p in prompts), eval_dir / "prompts.json",
            "expected a list of prompts")
    per_prompt = _read_json(eval_dir / "per_prompt.json")
    _expect(isinstance(per_prompt, dict) and all(isinstance(v, list) for v in per_prompt.values()),
            eval_dir / "per_prompt.json", "expected {model: [rows]}")
    variance = _read_json(eval_dir / "variance.json", required=False)
    _expect(variance is None or isinstance(_mapping(variance).get("models"), dict), eval_dir / "variance.json",
            "no 'models' mapping")
    gate = _read_json(eval_dir / "gate.json", required=False)
    _expect(gate is None or isinstance(gate, dict), eval_dir / "gate.json", "expected a mapping")
    encoders = _mapping(_read_json(eval_dir / "encoders.json", required=False))

    upstream = (root / params["upstream_dir"]).resolve() if params.get("upstream_dir") else folder  # a variant's
    student = (root / params["student_dir"]).resolve() if params.get("student_dir") else folder / layout.OUT_DIRS["student"]
    records = {
        step: _mapping(_read_json(path, required=False)) or None
        for step, path in (
            ("teacher", upstream / layout.OUT_DIRS["teacher"] / "record.json"),
            ("proxy", upstream / layout.OUT_DIRS["synthesis"] / "record.json"),
            ("student", student / "record.json"),
            ("eval", eval_dir / "record.json"),
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
    )


def load_report(spec_path: str | Path, root: Path) -> Report:
    """Load the spec and every subject's results.

    Raises:
        ProxytuneError: bad spec, or a subject without (complete) evaluation output.
    """
    from proxytune.spec import load_spec
    from proxytune.style_report import load_style

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


def write_report(spec_path: str | Path, root: Path) -> ReportFiles:
    """Write runs/EXPERIMENT/report.html and report.md; return their paths (nothing is logged)."""
    report = load_report(spec_path, root)
    out = root / layout.RUNS_DIR / report.experiment
    html_path, md_path = out / HTML_NAME, out / MD_NAME
    write_text_atomic(html_path, render_html(report))
    write_text_atomic(md_path, render_markdown(report))
    return ReportFiles(html=html_path, md=md_path, report=report)


# -- numbers and checks shared by both renderings ----------------------------------------------
def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def fmt(value, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if _is_number(value) else "—"


def fmt_ci(entry) -> str:
    """'mean [lo, hi]' of a {"mean", "ci95"} entry; '—' where absent."""
    if not isinstance(entry, dict) or not _is_number(entry.get("mean")):
        return "—"
    ci = entry.get("ci95")
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(_is_number(v) for v in ci):
        return f"{entry['mean']:.4f} [{ci[0]:.4f}, {ci[1]:.4f}]"
    return f"{entry['mean']:.4f}"


def _mean(subject: SubjectResult, model: str, metric: str):
    entry = subject.metrics["models"].get(model, {}).get(metric)
    return entry.get("mean") if isinstance(entry, dict) and _is_number(entry.get("mean")) else None


def best_models(subject: SubjectResult) -> dict[str, str]:
    """Per metric, the model with the highest mean (only when there are at least two models)."""
    best = {}
    for metric, _ in subject.columns:
        scored = [(m, _mean(subject, m, metric)) for m in subject.models]
        scored = [(m, v) for m, v in scored if v is not None]
        if len(scored) > 1:
            best[metric] = max(scored, key=lambda item: item[1])[0]
    return best


def _prompt_row(subject: SubjectResult, model: str, index: int) -> dict:
    rows = subject.per_prompt.get(model, [])
    return rows[index] if index < len(rows) and isinstance(rows[index], dict) else {}


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


# -- pictures ----------------------------------------------------------------------------------
def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def thumbnail_uri(path: Path, size: int = THUMB, square: bool = False) -> str:
    """A small embedded copy: PNG when the image already fits (pixels unchanged), else JPEG."""
    image = open_rgb(path)
    buffer = io.BytesIO()
    if max(image.size) <= size and (not square or image.width == image.height):
        image.save(buffer, format="PNG", optimize=True)
        return data_uri(buffer.getvalue(), "image/png")
    if square:
        image = center_crop_resize(image, size)
    else:
        image.thumbnail((size, size))
    image.save(buffer, format="JPEG", quality=88)
    return data_uri(buffer.getvalue(), "image/jpeg")


def _figure_png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def _colours(models: list[str]) -> dict[str, str]:
    return {m: f"C{i % 10}" for i, m in enumerate(models)}


def variance_chart(variance: dict, models: list[str]) -> bytes:
    """PNG bar chart of the total feature variance per model."""
    from matplotlib.figure import Figure

    names = [m for m in models if m in variance["models"]] + sorted(set(variance["models"]) - set(models))
    values = [float(_mapping(variance["models"][m]).get("total_variance") or 0.0) for m in names]
    colours = _colours(names)
    fig = Figure(figsize=(4.8, 3.2), layout="constrained")
    ax = fig.add_subplot()
    bars = ax.bar(names, values, color=[colours[m] for m in names])
    ax.bar_label(bars, labels=[f"{v:.4g}" for v in values], padding=2)
    ax.set_ylabel("total feature variance")
    ax.set_title(f"feature variance ({variance.get('samples', '?')} samples)")
    ax.margins(y=0.15)
    return _figure_png(fig)


def distance_histogram(variance: dict, models: list[str]) -> bytes | None:
    """PNG histogram of L2 distances to the centroid, one translucent series per model."""
    import numpy as np
    from matplotlib.figure import Figure

    names = [m for m in models if m in variance["models"]] + sorted(set(variance["models"]) - set(models))
    series = {m: np.asarray(_mapping(variance["models"][m]).get("distances") or [], dtype=float) for m in names}
    series = {m: v for m, v in series.items() if v.size}
    if not series:
        return None
    everything = np.concatenate(list(series.values()))
    edges = np.histogram_bin_edges(everything, bins=min(30, max(5, everything.size // 4)))
    colours = _colours(names)
    fig = Figure(figsize=(5.6, 3.2), layout="constrained")
    ax = fig.add_subplot()
    for model, values in series.items():
        ax.hist(values, bins=edges, alpha=0.55, color=colours[model], label=f"{model} (n={values.size})")
    ax.set_xlabel("L2 distance to the centroid of the model's samples")
    ax.set_ylabel("samples")
    ax.legend(fontsize="small", framealpha=0.85)
    return _figure_png(fig)


# -- HTML --------------------------------------------------------------------------------------
def esc(value) -> str:
    return html.escape(str(value), quote=True)


STYLE = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;color:#1f2328;max-width:1240px;margin:0 auto;padding:0 1.5rem 3rem}
h1{margin-bottom:.2rem}h2{border-bottom:1px solid #d0d7de;padding-bottom:.2rem;margin-top:2.2rem}
table{border-collapse:collapse;margin:.4rem 0 1.2rem}caption{text-align:left;color:#59636e;padding:.2rem 0}
th,td{border:1px solid #d0d7de;padding:.3rem .55rem;text-align:left;vertical-align:top}
thead th{background:#f3f4f6}td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.banner{background:#fff4ce;border:2px solid #bf8700;border-radius:6px;padding:.7rem 1rem;font-weight:600}
.toy-label{background:#ddf4ff;border:1px solid #54aeff;border-radius:6px;padding:.6rem 1rem}.toy{color:#0969da}
.warn{color:#9a6700}.pass{color:#1a7f37;font-weight:600}.fail{color:#cf222e;font-weight:600}
.scroll{overflow-x:auto}.grid th[scope=row]{width:13rem;min-width:9rem}.grid td{white-space:nowrap}
.grid img{width:72px;height:72px;object-fit:cover;margin:1px;vertical-align:top}
figure{display:inline-block;margin:0 1.5rem 1rem 0}figcaption{color:#59636e;font-size:.9em}
pre{background:#f6f8fa;border:1px solid #d0d7de;border-radius:6px;padding:.8rem;overflow-x:auto}
code{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:.88em;word-break:break-all}
.muted{color:#59636e}
"""

# Marks the page once every <img> has loaded (the browser test reads data-images-loaded="n/total").
# The window "load" event waits for every image, and a headless --dump-dom waits for "load", so the mark
# is set synchronously there; a promise chain (img.decode) could still be pending when the DOM is dumped.
SCRIPT = """
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var ok = images.filter(function (img) { return img.complete && img.naturalWidth > 0; }).length;
  document.body.dataset.imagesLoaded = ok + "/" + images.length;
});
"""


EMPTY_CELL = '<span class="muted">—</span>'


def _cell(text, cls: str = "", bold: bool = False) -> str:
    body = f"<strong>{esc(text)}</strong>" if bold else esc(text)
    return f'<td class="{cls}">{body}</td>' if cls else f"<td>{body}</td>"


def _anchor(subject: SubjectResult) -> str:
    return "subject-" + re.sub(r"[^A-Za-z0-9_-]", "-", subject.name)


def _notes(subject: SubjectResult) -> list[str]:
    """What the metric table needs explained beyond CLIP-I, CLIP-T and DINO."""
    notes = [ORACLE_NOTE] if len(subject.columns) > len(METRICS) else []
    return notes + ([BASE_NOTE] if any(m in subject.models for m in MODEL_ORDER if m.startswith("base-")) else [])


def interval_note(meta: dict) -> str:
    """How the table's intervals were computed, from metrics.json's `bootstrap` record."""
    boot = meta.get("bootstrap") or {}
    resamples = boot.get("resamples", "?")
    if boot.get("unit", "image") == "prompt":
        return (f"95% bootstrap intervals resample prompts, each with all its images ({resamples} resamples): "
                "the images of one prompt share it, so they are not independent draws.")
    return (f"95% bootstrap intervals resample single images ({resamples} resamples), as proxytune did before it "
            "resampled prompts: they are too narrow; re-run the evaluate stage for prompt-level intervals.")


def _html_metric_table(subject: SubjectResult) -> str:
    best = best_models(subject)
    meta = subject.metrics
    caption = (f"{meta.get('prompts', len(subject.prompts))} prompts × {meta.get('images_per_prompt', '?')} images per model; "
               f"mean [95% bootstrap interval]. {interval_note(meta)} "
               "Best mean in bold." + "".join(" " + note for note in _notes(subject)))
    head = "".join(f'<th scope="col">{esc(label)}</th>' for _, label in subject.columns)
    rows = []
    for model in subject.models:
        values = subject.metrics["models"][model]
        cells = "".join(_cell(fmt_ci(values.get(m)), "num", best.get(m) == model) for m, _ in subject.columns)
        rows.append(f'<tr><th scope="row">{esc(model)}</th>{cells}</tr>')
    return (f'<table id="metrics-{esc(subject.name)}" class="metrics"><caption>{esc(caption)}</caption>'
            f'<thead><tr><th scope="col">model</th>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>')


def _html_per_prompt(subject: SubjectResult) -> str:
    models = subject.models
    top = "".join(f'<th scope="colgroup" colspan="{len(models)}">{esc(label)}</th>' for _, label in subject.columns)
    sub = "".join(f'<th scope="col">{esc(m)}</th>' for _ in subject.columns for m in models)
    rows = []
    for i, prompt in enumerate(subject.prompts):
        cells = "".join(_cell(fmt(_prompt_row(subject, m, i).get(metric)), "num") for metric, _ in subject.columns for m in models)
        rows.append(f'<tr><td class="num">{i:02d}</td><th scope="row">{esc(prompt)}</th>{cells}</tr>')
    return (f'<div class="scroll"><table class="per-prompt"><caption>Mean per prompt over its generated images.</caption>'
            f'<thead><tr><th rowspan="2">#</th><th rowspan="2" scope="col">prompt</th>{top}</tr><tr>{sub}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table></div>')


def _html_gate(subject: SubjectResult) -> str:
    gate = subject.gate
    if not gate:
        return '<p class="muted">No promotion gate configured (<code>evaluation.gate</code>).</p>'
    passed = bool(gate.get("passed"))
    verdict = (f'<span class="pass">passed</span>: alias <code>champion</code> moved to {esc(gate.get("student_version", "?"))}'
               if passed else f'<span class="fail">failed</span>: {esc(gate.get("student_version", "?"))} not promoted')
    details = "".join(f"<li><code>{esc(line)}</code></li>" for line in gate.get("details") or [])
    return f'<p>Rule <code>{esc(gate.get("rule", "?"))}</code>: {verdict}</p><ul>{details}</ul>'


def _html_variance(subject: SubjectResult) -> str:
    variance = subject.variance
    if not variance:
        return '<p class="muted">Not computed (<code>evaluation.variance_samples</code> is 0, or an older evaluation).</p>'
    intro = (f'<p>Feature: {esc(variance.get("feature", "?"))}; {esc(variance.get("samples", "?"))} samples per model of '
             f'<q>{esc(variance.get("prompt", "?"))}</q>.</p>')
    bar = data_uri(variance_chart(variance, subject.models), "image/png")
    parts = [intro, f'<figure><img src="{bar}" alt="{esc("bar chart: total feature variance per model, " + subject.name)}">'
             f"<figcaption>Total feature variance (trace of the covariance) per model.</figcaption></figure>"]
    hist = distance_histogram(variance, subject.models)
    if hist:
        parts.append(f'<figure><img src="{data_uri(hist, "image/png")}" '
                     f'alt="{esc("histogram: L2 distances to the centroid per model, " + subject.name)}">'
                     "<figcaption>L2 distances of each sample's feature to its model's centroid.</figcaption></figure>")
    return "".join(parts)


def _html_grid(subject: SubjectResult) -> str:
    models = subject.grid_models
    refs = [(p, thumbnail_uri(p, square=True)) for p in subject.reference_files[:GRID_REFERENCES]]
    head = '<th scope="col">prompt</th><th scope="col">references</th>' + "".join(f'<th scope="col">{esc(m)}</th>' for m in models)
    count = max([len(subject.prompts)] + [max(v) + 1 for v in subject.images.values() if v])
    rows = []
    for i in range(count):
        prompt = subject.prompts[i] if i < len(subject.prompts) else "(prompt not listed)"
        ref_cell = "".join(f'<img src="{uri}" alt="{esc(f"reference {p.name}")}">' for p, uri in refs) or EMPTY_CELL
        cells = [f"<td>{ref_cell}</td>"]
        for model in models:
            files = subject.images.get(model, {}).get(i, [])
            imgs = "".join(f'<img src="{thumbnail_uri(f)}" alt="{esc(f"{model}, prompt {i:02d}, image {k}")}">'
                           for k, f in enumerate(files))
            cells.append(f"<td>{imgs or EMPTY_CELL}</td>")
        rows.append(f'<tr><th scope="row">{i:02d} · {esc(prompt)}</th>{"".join(cells)}</tr>')
    note = "" if subject.reference_files else f'<p class="warn">Reference folder {esc(subject.references)} not found.</p>'
    return (f'{note}<div class="scroll"><table class="grid"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table></div>')


def _html_lineage(subject: SubjectResult) -> str:
    rows = "".join(f'<tr><th scope="row">{esc(step)}</th><td>{esc(what)}</td><td><code>{esc(digest)}</code></td>'
                   f"<td><code>{esc(run)}</code></td></tr>" for step, what, digest, run in lineage_rows(subject))
    return ('<table class="lineage"><thead><tr><th scope="col">step</th><th scope="col">what</th>'
            f'<th scope="col">digest (sha256)</th><th scope="col">MLflow run</th></tr></thead><tbody>{rows}</tbody></table>')


def _html_summary(report: Report) -> str:
    rows = []
    for subject in report.subjects:
        gate = subject.gate
        verdict = ("—" if not gate else '<span class="pass">passed</span>' if gate.get("passed") else '<span class="fail">failed</span>')
        best = best_models(subject)
        for j, model in enumerate(subject.models):
            first = ""
            if j == 0:
                span = len(subject.models)
                first = (f'<th scope="rowgroup" rowspan="{span}"><a href="#{_anchor(subject)}">{esc(subject.name)}</a>'
                         f'{" <span class=warn>(random init)</span>" if subject.random_init else ""}'
                         f'{" <span class=toy>(toy world)</span>" if subject.toy_world else ""}</th>')
            cells = "".join(_cell(fmt_ci(subject.metrics["models"][model].get(m)), "num", best.get(m) == model)
                            for m, _ in report.columns)
            last = f'<td rowspan="{len(subject.models)}">{verdict}</td>' if j == 0 else ""
            rows.append(f"<tr>{first}<td>{esc(model)}</td>{cells}{last}</tr>")
    head = "".join(f'<th scope="col">{esc(label)}</th>' for _, label in report.columns)
    return ('<table id="summary-table" class="summary"><thead><tr><th scope="col">subject</th><th scope="col">model</th>'
            f'{head}<th scope="col">gate</th></tr></thead><tbody>{"".join(rows)}</tbody></table>')


def _html_subject(report: Report, subject: SubjectResult) -> str:
    meta = subject.metrics
    warnings = lineage_warnings(subject, report.spec_digest)
    parts = [
        f'<section id="{_anchor(subject)}"><h2>Subject {esc(subject.name)}</h2>',
        f"<p>Identifier <code>{esc(subject.token)}</code>, class <q>{esc(subject.class_noun)}</q>; "
        f"{esc(meta.get('prompts', len(subject.prompts)))} prompts × {esc(meta.get('images_per_prompt', '?'))} images per model.</p>",
    ]
    if subject.random_init:
        parts.append(f'<p class="banner" role="alert">{esc(RANDOM_INIT_BANNER)}</p>')
    elif subject.toy_world:
        parts.append(f'<p class="toy-label">{esc(TOY_WORLD_LABEL)}</p>')
    if warnings:
        parts.append('<ul class="warn">' + "".join(f"<li>{esc(w)}</li>" for w in warnings) + "</ul>")
    parts += [
        "<h3>Metrics</h3>", _html_metric_table(subject),
        "<h3>Promotion gate</h3>", _html_gate(subject),
        "<h3>Feature distribution</h3>", _html_variance(subject),
        "<h3>Per-prompt scores</h3>", _html_per_prompt(subject),
        "<h3>Images</h3>", _html_grid(subject),
        "<h3>Lineage</h3>", _html_lineage(subject),
        "</section>",
    ]
    return "\n".join(parts)


def render_html(report: Report) -> str:
    """The whole page as one string: inline CSS, images as data: URIs, no external reference."""
    title = f"proxytune report: {report.experiment}"
    nav = " · ".join(f'<a href="#{_anchor(s)}">{esc(s.name)}</a>' for s in report.subjects)
    nav += "".join(f' · <a href="#style-{esc(s.name)}">style {esc(s.name)}</a>' for s in report.styles)
    banner = f'<p class="banner" role="alert">{esc(RANDOM_INIT_BANNER)}</p>' if report.random_init else ""
    if report.toy_world:
        banner = f'<p class="toy-label">{esc(TOY_WORLD_LABEL)}</p>'
    body = "\n".join(_html_subject(report, s) for s in report.subjects)
    if report.styles:
        from proxytune.style_report import html_section

        body += "\n" + "\n".join(html_section(s) for s in report.styles)
    oracle = ("; subject acc. and prompt acc.: the same, read exactly by the toy world's oracle"
              if len(report.columns) > len(METRICS) else "")
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)}</title>
<style>{STYLE}</style>
</head>
<body>
<header>
<h1>{esc(title)}</h1>
<p class="muted">Spec <code>{esc(report.spec_path)}</code> (sha256 <code>{esc(report.spec_digest)}</code>);
MLflow experiment <code>{esc(report.mlflow_experiment)}</code>; written {esc(report.generated)}.</p>
</header>
{banner}
<nav>Subjects: {nav} · <a href="#spec">spec</a></nav>
<section id="summary"><h2>Summary</h2>
<p>Mean [95% bootstrap interval, resampling prompts] per subject and model; CLIP-I and DINO: subject fidelity, CLIP-T: prompt fidelity{oracle}.</p>
{_html_summary(report)}
</section>
{body}
<section id="spec"><h2>Spec</h2>
<pre><code>{esc(report.spec_text)}</code></pre>
</section>
<script>{SCRIPT}</script>
</body>
</html>
"""


# -- Markdown ----------------------------------------------------------------------------------
_MD_SPECIAL = re.compile(r"([\\`*_\[\]|#])")


def md(value) -> str:
    """Text for a Markdown table cell: HTML-escaped, Markdown syntax and pipes backslashed, one line."""
    text = html.escape(" ".join(str(value).split()), quote=False)
    return _MD_SPECIAL.sub(r"\\\1", text)


def _md_code(value: str) -> str:
    """Identifiers (digests, run ids) as code spans; placeholders such as '—' as plain text."""
    return f"`{value}`" if re.fullmatch(r"[0-9A-Za-z._@-]+", value) else md(value)


def _md_table(head: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows] + [""]


def _md_subject(report: Report, subject: SubjectResult) -> list[str]:
    meta = subject.metrics
    best = best_models(subject)
    lines = [f"## Subject {md(subject.name)}", "",
             f"Identifier `{subject.token.replace('`', '')}`, class {md(subject.class_noun)}; "
             f"{meta.get('prompts', len(subject.prompts))} prompts × {meta.get('images_per_prompt', '?')} images per model.", ""]
    if subject.random_init:
        lines += [f"> **{RANDOM_INIT_BANNER}**", ""]
    elif subject.toy_world:
        lines += [f"> {TOY_WORLD_LABEL}", ""]
    lines += [f"- warning: {md(w)}" for w in lineage_warnings(subject, report.spec_digest)]
    if lines[-1] != "":
        lines.append("")

    def cell(model: str, metric: str) -> str:
        text = fmt_ci(subject.metrics["models"][model].get(metric))
        return f"**{text}**" if best.get(metric) == model else text

    lines += ["### Metrics", ""]
    lines += _md_table(["model"] + [label for _, label in subject.columns],
                       [[md(m)] + [cell(m, metric) for metric, _ in subject.columns] for m in subject.models])
    lines += [" ".join([interval_note(meta), *_notes(subject)]), ""]
    lines += ["### Promotion gate", ""]
    gate = subject.gate
    if gate:
        verdict = "passed" if gate.get("passed") else "failed"
        lines += [f"Rule `{str(gate.get('rule', '?')).replace('`', '')}`: **{verdict}** "
                  f"({md(gate.get('student_version', '?'))})", ""]
        lines += [f"- {md(line)}" for line in gate.get("details") or []] + [""]
    else:
        lines += ["No promotion gate configured.", ""]
    lines += ["### Feature distribution", ""]
    if subject.variance:
        v = subject.variance
        lines += [f"{md(v.get('feature', '?'))}; {v.get('samples', '?')} samples per model of “{md(v.get('prompt', '?'))}”.", ""]
        rows = []
        for model, values in v["models"].items():
            values = _mapping(values)
            distances = [d for d in values.get("distances") or [] if _is_number(d)]
            mean = sum(distances) / len(distances) if distances else None
            rows.append([md(model), fmt(values.get("total_variance")), fmt(mean), str(len(distances))])
        lines += _md_table(["model", "total feature variance", "mean L2 distance to centroid", "samples"], rows)
    else:
        lines += ["Not computed.", ""]
    lines += ["### Per-prompt scores", ""]
    head = ["#", "prompt"] + [f"{label} {md(m)}" for _, label in subject.columns for m in subject.models]
    rows = [[f"{i:02d}", md(prompt)] + [fmt(_prompt_row(subject, m, i).get(metric)) for metric, _ in subject.columns
                                        for m in subject.models]
            for i, prompt in enumerate(subject.prompts)]
    lines += _md_table(head, rows)
    lines += ["### Lineage", ""]
    lines += _md_table(["step", "what", "digest (sha256)", "MLflow run"],
                       [[md(step), md(what), _md_code(digest), _md_code(run)] for step, what, digest, run in lineage_rows(subject)])
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
        verdict = "—" if not gate else ("passed" if gate.get("passed") else "failed")
        for model in subject.models:
            rows.append([md(subject.name), md(model)]
                        + [fmt_ci(subject.metrics["models"][model].get(m)) for m, _ in report.columns] + [verdict])
    lines += _md_table(["subject", "model"] + [label for _, label in report.columns] + ["gate"], rows)
    for subject in report.subjects:
        lines += _md_subject(report, subject)
    if report.styles:
        from proxytune.style_report import markdown_section

        for style in report.styles:
            lines += markdown_section(style)
    return "\n".join(lines).rstrip() + "\n"
