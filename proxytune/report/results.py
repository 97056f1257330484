"""What the report shows, as read from the stage outputs: a SubjectResult per subject (or student variant),
a StyleResult per style, and the Report that holds them. proxytune.report.load builds them from the typed
models the stages wrote the files with (proxytune.outputs); the HTML templates and the Markdown rendering
read those models' attributes."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path

from proxytune import metrics as registry
from proxytune.outputs import (EvaluationMetrics, Fidelity, Gate, PromptScores, StyleEncoders, StyleRecords,
                               SubjectEncoders, SubjectRecords, Variance)

MODEL_ORDER = ("base-teacher", "teacher", "base-student", "student")  # base-*: the untuned models (evaluation.base_models)
# (metric, label) every subject shows: proxytune's own (CLIP-I, CLIP-T, DINO); the rest where measured
ENCODER_COLUMNS = tuple((m.name, m.label) for m in registry.metrics("subject") if m.provider == "proxytune")


def style_labels() -> dict[str, str]:
    """metric -> label of every registered style metric, in column order (read when a report is made)."""
    return {m.name: m.label for m in registry.metrics("style")}


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
    metrics: EvaluationMetrics
    prompts: list[str]
    per_prompt: dict[str, list[PromptScores]]  # model -> one row per prompt
    variance: Variance | None
    gate: Gate | None
    encoders: SubjectEncoders | None  # None: an evaluation without encoders.json
    records: SubjectRecords  # teacher, proxy, student, eval (each None where missing)
    images: dict[str, dict[int, list[Path]]]  # model -> prompt index -> files in k order
    fidelity: Fidelity | None = None  # proxy/manifest.json's `fidelity` (issue 29); None when not scored
    proxy_folder: Path | None = None  # the proxy set's folder (the fidelity thumbnails are relative to it)

    @property
    def models(self) -> list[str]:
        """Base and tuned teacher, then base and tuned student, then any other model (metrics.json's
        keys are sorted, so its order says nothing)."""
        known = [m for m in MODEL_ORDER if m in self.metrics.models]
        return known + [m for m in self.metrics.models if m not in MODEL_ORDER]

    @property
    def grid_models(self) -> list[str]:
        """Models with generated images: metrics order first, then any other image folder."""
        return [m for m in self.models if m in self.images] + sorted(set(self.images) - set(self.models))

    @property
    def random_init(self) -> bool:
        return self.metrics.random_init or bool(self.encoders and self.encoders.random_init)

    @property
    def toy_world(self) -> bool:
        """Every model and encoder came from the toy world (and none is random): the label replaces the banner."""
        return not self.random_init and (self.metrics.toy_world or bool(self.encoders and self.encoders.toy_world))

    @property
    def columns(self) -> list[tuple[str, str]]:
        """(metric, label) shown for this subject: CLIP-I, CLIP-T, DINO, then any other where measured."""
        measured = {m for values in self.metrics.models.values() for m in values}
        return subject_columns(measured)

    @property
    def eval_run_id(self) -> str | None:
        return self.records.eval.run_id if self.records.eval else None


@dataclass
class StyleResult:
    """One style's evaluation, records and images, read from runs/EXPERIMENT/STYLE/."""

    name: str
    folder: Path
    reference_files: list[Path]
    metrics: EvaluationMetrics
    prompts: list[str]
    encoders: StyleEncoders | None  # None: an evaluation without encoders.json
    records: StyleRecords  # teacher, curated, student, eval (each None where missing)
    images: dict[str, dict[int, list[Path]]]  # model folder -> prompt index -> files
    fidelity: Fidelity | None = None  # curated/manifest.json's `fidelity` (issue 29); None when not scored
    curated_folder: Path | None = None

    @property
    def random_init(self) -> bool:
        return self.metrics.random_init

    @property
    def columns(self) -> list[str]:
        shown = {m for values in self.metrics.models.values() for m in values}
        return [m for m in style_labels() if m in shown]


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
