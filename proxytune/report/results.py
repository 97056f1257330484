"""What the report shows, as read from the stage outputs: a SubjectResult per subject (or student variant),
a StyleResult per style, and the Report that holds them. proxytune.report.load builds them; the HTML
templates and the Markdown rendering only read them."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path

from proxytune import metrics as registry

MODEL_ORDER = ("base-teacher", "teacher", "base-student", "student")  # base-*: the untuned models (evaluation.base_models)
# (metric, label) every subject shows: proxytune's own (CLIP-I, CLIP-T, DINO); the rest where measured
ENCODER_COLUMNS = tuple((m.name, m.label) for m in registry.metrics("subject") if m.provider == "proxytune")
STYLE_LABELS = {"style_clip": "style CLIP", "style_gram": "style Gram", "clip_t": "CLIP-T", "leakage": "leakage (CLIP)",
                "content_dino": "content (DINO)", "style_acc": "style acc. (detector)", "prompt_acc": "prompt acc. (oracle)",
                "content_leak": "content leak (oracle)"}  # a style's metrics, in column order


def subject_columns(measured: set[str]) -> list[tuple[str, str]]:
    """(metric, label) in the registry's order: ENCODER_COLUMNS, then every other subject metric in `measured`."""
    return [(m.name, m.label) for m in registry.metrics("subject")
            if (m.name, m.label) in ENCODER_COLUMNS or m.name in measured]


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
    fidelity: dict | None = None  # proxy/manifest.json's `fidelity` (issue 29); None when not scored
    proxy_folder: Path | None = None  # the proxy set's folder (the fidelity thumbnails are relative to it)

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
        """(metric, label) shown for this subject: CLIP-I, CLIP-T, DINO, then any other where measured."""
        measured = {m for values in self.metrics["models"].values() if isinstance(values, dict) for m in values}
        return subject_columns(measured)

    @property
    def eval_run_id(self) -> str | None:
        return (self.records.get("eval") or {}).get("run_id")


@dataclass
class StyleResult:
    """One style's evaluation, records and images, read from runs/EXPERIMENT/STYLE/."""

    name: str
    folder: Path
    reference_files: list[Path]
    metrics: dict
    prompts: list[str]
    encoders: dict
    records: dict[str, dict | None]  # teacher, curated, student, eval
    images: dict[str, dict[int, list[Path]]]  # model folder -> prompt index -> files
    fidelity: dict | None = None  # curated/manifest.json's `fidelity` (issue 29); None when not scored
    curated_folder: Path | None = None

    @property
    def random_init(self) -> bool:
        return bool(self.metrics.get("random_init"))

    @property
    def columns(self) -> list[str]:
        shown = {m for values in self.metrics["models"].values() for m in values}
        return [m for m in STYLE_LABELS if m in shown]


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
    styles: list[StyleResult] = field(default_factory=list)

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
        return [c for c in subject_columns({name for name, _ in shown}) if c in shown]

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
