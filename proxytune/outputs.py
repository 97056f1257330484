"""Typed stage outputs: one pydantic model for every JSON file a stage writes and another stage, the
report or provenance reads back (file names: proxytune.layout).

    record = TeacherRecord(stage="teacher", run_id=..., model=..., version=..., ...)
    write_record(tmp, record)                          # tmp/record.json, atomically
    teacher = read_record(params.out("teacher"), TeacherRecord)
    evaluation = load_evaluation(subject_dir / "eval")  # everything the report shows, typed

Writers build a model, so a misspelt or unknown key is an error where it is made (`extra="forbid"`);
`write` puts exactly the fields the writer set on disk (a field left at its default is not written),
so the JSON is the one the stages wrote as plain dicts. Reading tolerates keys this version does not
know (a file from another proxytune version) and says in one line which file and which field are wrong.

Fields are required where every writer writes them (the stages, and the hand-made outputs of the
test suite's fixtures); the others default to None (or to what an older output meant by leaving them
out). Longer than the usual module on purpose: the whole contract between the stages sits in one file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, RootModel, ValidationError, ValidationInfo, model_validator

from proxytune import layout
from proxytune.errors import ProxytuneError
from proxytune.files import write_json_atomic

READING = "reading"  # validation context key: the data comes from a file, not from a writer
RERUN = "re-run `proxytune apply`"

Means = dict[str, dict[str, float]]  # model -> metric -> mean
T = TypeVar("T", bound="_File")


# -- reading and writing ----------------------------------------------------------------------------
class _File:
    """read/write for a model that is one whole JSON file."""

    @classmethod
    def read(cls: type[T], path: str | Path, missing: str | None = None) -> T:
        """Parse `path` with this model.

        Raises:
            ProxytuneError: the file is missing (`missing` says what to do; default: re-run apply), is not
                JSON, or does not fit the model (the message names the first bad field).
        """
        path = Path(path)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise ProxytuneError(f"{path}: {missing or f'missing; {RERUN}'}") from None
        return cls._parse(path, data)

    @classmethod
    def read_optional(cls: type[T], path: str | Path) -> T | None:
        """`read`, or None when the file does not exist (an output some runs do not write)."""
        path = Path(path)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        return cls._parse(path, data)

    @classmethod
    def _parse(cls: type[T], path: Path, raw: bytes) -> T:
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ProxytuneError(f"{path}: not valid JSON ({err}); {RERUN}") from None
        try:
            return cls.model_validate(data, context={READING: True})
        except ValidationError as err:
            raise ProxytuneError(f"{path}: unexpected content ({_first_error(err)}); {RERUN}") from None

    def write(self, path: str | Path) -> None:
        """Write the fields the writer set (sorted keys, atomically), as the stages always wrote them."""
        write_json_atomic(path, self.model_dump(exclude_unset=True))


def _first_error(err: ValidationError) -> str:
    errors = err.errors()
    first = errors[0]
    where = ".".join(str(part) for part in first["loc"]) or "top level"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}: {first['msg']}{more}"


class Output(_File, BaseModel):
    """A JSON object a stage writes: unknown keys are an error when built in code, skipped when read."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _skip_unknown_keys_when_reading(cls, data: Any, info: ValidationInfo) -> Any:
        if info.context and info.context.get(READING) and isinstance(data, dict) and cls.model_config.get("extra") == "forbid":
            return {key: value for key, value in data.items() if key in cls.model_fields}
        return data


# -- shared pieces ----------------------------------------------------------------------------------
class Sampling(Output):
    """The sampler settings a student used (backends.students.api.sampling_settings)."""

    cfg_scale: float
    top_k: int | None
    temperature: float


# -- records: record.json in every output folder ----------------------------------------------------
class StageRecord(Output):
    """What a stage made: its name and MLflow run, then per-stage fields."""

    stage: str
    run_id: str | None = None


class RegisteredRecord(StageRecord):
    """The record of a stage that registers a model version (teacher, student, style student)."""

    model: str | None = None  # registered model name, EXPERIMENT.SUBJECT.ROLE
    version: str | None = None
    base_model: str | None = None
    base_model_digest: str | None = None  # toy world built-ins only: the shipped weights' digest
    adapter_digest: str | None = None
    final_loss: float | None = None

    @property
    def registered(self) -> str:
        """MODEL@VERSION, as other records name it."""
        return f"{self.model}@{self.version}"


class TeacherRecord(RegisteredRecord):
    stage: Literal["teacher"] = "teacher"  # hand-made teacher folders in the tests may leave it out
    model: str
    version: str
    revision: str | None = None
    references_digest: str | None = None
    family: str | None = None  # the diffusion family (sd, sdxl, sd3, flux, ...)


class SynthesisRecord(StageRecord):
    stage: Literal["synthesis"] = "synthesis"  # hand-made proxy sets in the tests leave it out
    run_id: str
    digest: str  # the proxy set's (manifest.json's digest)
    prompts_digest: str
    num_images: int
    dropped: int | None = None
    teacher_version: str


class CodesRecord(StageRecord):
    stage: Literal["codes"]
    run_id: str
    model: str  # the student model whose tokenizer encoded the proxies
    backend: str
    proxy_digest: str
    num_images: int
    seq_len: int
    sha256: str  # of codes.safetensors


ADAPTER_WEIGHTS = "adapter/adapter_model.safetensors"


class StudentRecord(RegisteredRecord):
    """Every field optional: the tests hand-make student folders whose record names only the weights."""

    stage: Literal["student"] = "student"
    backend: str | None = None
    recipe: str | None = None
    weights: str = ADAPTER_WEIGHTS  # relative to the folder; records older than direct-full leave it out
    proxy_digest: str | None = None  # None for the recipes that train on the references
    teacher_version: str | None = None
    sampling: Sampling | None = None


class CurationRecord(StageRecord):
    stage: Literal["curation"]
    run_id: str
    digest: str
    prompts_digest: str
    num_images: int
    raw_digest: str | None  # None without raw pairs
    raw_images: int
    raw_source: str
    teacher_version: str
    teacher_run_id: str | None


class StyleStudentRecord(RegisteredRecord):
    stage: Literal["style_student"]
    run_id: str
    model: str
    version: str
    base_model: str
    backend: str
    recipe: str
    weights: str  # the model folder, relative to the output folder
    adapter_digest: str
    proxy_digest: str  # the curated set's digest
    raw_digest: str | None
    teacher_version: str
    final_loss: float
    sampling: Sampling
    noise_strength: float
    clip_model: str


class EvaluateRecord(StageRecord):
    stage: Literal["evaluate"]
    run_id: str
    teacher_version: str
    student_version: str
    random_init: str | None = None  # "True"/"False", as the run's tags
    toy_world: str | None = None
    clip_model: str | None = None
    dino_model: str | None = None
    metrics: Means | None = None
    gate: bool | None = None  # None: no gate configured
    student_sampling: Sampling | None = None
    encoder_paths: dict[str, str] | None = None  # where each encoder's weights were on the machine that ran it


class StyleEvaluateRecord(StageRecord):
    stage: Literal["style_evaluate"]
    run_id: str
    teacher_version: str
    student_version: str
    random_init: str
    clip_model: str
    dino_model: str
    style: str
    dvc_stage: str
    metrics: Means


RECORDS: dict[str, type[StageRecord]] = {
    "teacher": TeacherRecord, "synthesis": SynthesisRecord, "codes": CodesRecord, "student": StudentRecord,
    "evaluate": EvaluateRecord, "curation": CurationRecord, "style_student": StyleStudentRecord,
    "style_evaluate": StyleEvaluateRecord,
}  # step (layout.STEPS, STYLE_STEPS) -> the model of its record.json
R = TypeVar("R", bound=StageRecord)


def read_record(folder: Path, model: type[R]) -> R:
    """An upstream stage's record.json.

    Raises:
        ProxytuneError: missing (run the upstream stage first), or malformed.
    """
    return model.read(Path(folder) / layout.RECORD_FILE, missing="missing upstream record (run the upstream stage first)")


def write_record(folder: Path, record: StageRecord | dict[str, Any]) -> None:
    """Write `folder/record.json`; a dict (a record the tests make by hand) is written as given."""
    if isinstance(record, dict):
        write_json_atomic(Path(folder) / layout.RECORD_FILE, record)
    else:
        record.write(Path(folder) / layout.RECORD_FILE)


# -- manifests: manifest.json in proxy/ and curated/ ------------------------------------------------
class ProxyImage(Output):
    file: str  # relative to the proxy folder (images/NNNNN.png)
    prompt: str
    seed: int
    sha256: str
    similarity: float | None = None  # with synthesis.filter: mean cosine to the references
    # with synthesis.fidelity (issue 29): mean cosine to the references, the oracle's 0/1 (toy subjects), kept
    dino: float | None = None
    clip_i: float | None = None
    oracle: float | None = None
    kept: bool | None = None


class DroppedImage(Output):
    file: str  # the file it had in the pool (not in the proxy folder)
    seed: int
    sha256: str
    similarity: float | None = None  # dropped by synthesis.filter
    prompt: str | None = None
    dino: float | None = None  # not kept by synthesis.fidelity.keep
    clip_i: float | None = None
    oracle: float | None = None
    kept: bool | None = None


class ProxyFilter(Output):
    """The spec's synthesis.filter as it ran (spec.synthesis.FilterSpec)."""

    enabled: bool
    metric: str
    model: str
    min_similarity: float | None
    drop_fraction: float | None


class FidelitySummary(Output):
    """Scores of a set of images on the ranking metric (stages/proxy_scores.summary)."""

    count: int
    mean: float
    q10: float
    q50: float
    q90: float
    share_above: float  # share scoring above the threshold
    judge_share: float | None = None  # toy world only: the oracle's (subject) or the detector's (style) share of 1s


class Extreme(Output):
    """One thumbnail of the report's most / least faithful grid."""

    file: str  # fidelity/most-NN.png, relative to the output folder
    source: str  # the image it shows (images/NNNNN.png)
    score: float
    kept: bool
    judge: float | None = None


class Fidelity(Output):
    """How a generated set was scored and curated (manifest.json's `fidelity`, and the report's source)."""

    metric: str  # the ranking score (dino, clip_i; style_gram, style_clip)
    threshold: float
    min_share: float | None = None
    keep: int | None = None  # synthesis: kept of generated; curation: kept per prompt
    diversity: float
    encoders: dict[str, str]  # role -> model reference
    judge: str | None = None  # toy world: what judge_share / per-image judge values mean
    generated: FidelitySummary
    kept: FidelitySummary
    most: list[Extreme]
    least: list[Extreme]
    scores: list[float] | None = None  # every generated image's ranking score, in generation order (the histogram)
    kept_index: list[int] | None = None  # generation indices of the kept images, in manifest order
    judged: list[float] | None = None  # toy world: the judge's 0/1 per generated image, generation order


class ProxyManifest(Output):
    """proxy/manifest.json. Only `images` is required: the tests hand-make proxy sets with nothing else.

    `images` are the proxies the codes stage encodes and the student trains on, in this order (most faithful
    first when synthesis.fidelity.keep curates); `dropped_images` the ones filtered or not kept."""

    images: list[ProxyImage]
    prompt_template: str | None = None
    templates: list[str] | None = None
    teacher_version: str | None = None  # no run id: identical work hashes the same (record.json has it)
    num_images: int | None = None
    generated: int | None = None
    dropped: int | None = None
    filter: ProxyFilter | None = None  # None when the filter is off
    digest: str | None = None
    prompts_digest: str | None = None
    dropped_images: list[DroppedImage] | None = None
    fidelity: Fidelity | None = None  # None when synthesis.fidelity is off


class FidelityMetrics(Output):
    """proxy_metrics.json beside proxy/ (and curated/): the DVC metrics of synthesis (curation)."""

    images: int  # kept (what the student trains on)
    generated: int
    metric: str | None = None
    threshold: float | None = None
    generated_scores: FidelitySummary | None = None
    kept_scores: FidelitySummary | None = None


class CuratedImage(Output):
    file: str
    prompt: str  # the caption the student learns (no identifier)
    teacher_prompt: str  # what the style teacher drew
    seed: int
    sha256: str
    # with style.fidelity (issue 29): style similarity to the references, the toy detector's 0/1, kept
    style_clip: float | None = None
    style_gram: float | None = None
    detected: float | None = None
    kept: bool | None = None


class RawImage(Output):
    file: str
    prompt: str
    sha256: str
    source: str | None = None  # the raw file's name (a folder of captioned images; not the toy world)


class RawPairs(Output):
    source: str  # "none", "toyworld (seed N)" or the raw folder
    ratio: float
    num_images: int
    digest: str | None
    images: list[RawImage]


class CuratedManifest(Output):
    """curated/manifest.json: the style teacher's (caption, image) pairs and the raw pairs."""

    kind: Literal["style"]
    style: str
    token: str
    teacher_prompt_template: str
    teacher_version: str
    num_images: int
    digest: str
    prompts_digest: str
    images: list[CuratedImage]
    raw: RawPairs
    dropped_images: list[CuratedImage] | None = None  # stylised images style.fidelity.keep did not keep
    fidelity: Fidelity | None = None


# -- the codes stage's safetensors metadata ---------------------------------------------------------
class CodesMetadata(Output):
    """What codes/codes.safetensors says it was made from (safetensors metadata holds strings only)."""

    model: str
    backend: str
    proxy_digest: str
    prompts: list[str]  # the distinct prompts, in the order of the `conds` tensor

    def to_safetensors(self) -> dict[str, str]:
        return {"model": self.model, "backend": self.backend, "proxy_digest": self.proxy_digest,
                "prompts": json.dumps(self.prompts)}

    @classmethod
    def read_safetensors(cls, path: Path) -> CodesMetadata:
        """The metadata of a codes file.

        Raises:
            ProxytuneError: missing, or its metadata is not the codes stage's.
        """
        from safetensors import safe_open

        path = Path(path)
        if not path.exists():
            raise ProxytuneError(f"{path}: missing (run the codes stage first: proxytune apply)")
        with safe_open(path, "pt") as handle:
            meta = dict(handle.metadata() or {})
        try:
            return cls.model_validate({**meta, "prompts": json.loads(meta.get("prompts", "null"))}, context={READING: True})
        except (ValidationError, json.JSONDecodeError) as err:
            what = _first_error(err) if isinstance(err, ValidationError) else f"prompts: {err}"
            raise ProxytuneError(f"{path}: unexpected metadata ({what}); {RERUN}") from None


# -- evaluation: eval/ ------------------------------------------------------------------------------
class MetricSummary(Output):
    mean: float
    ci95: tuple[float, float]  # 95% bootstrap interval


class Bootstrap(Output):
    """How the intervals were computed."""

    resamples: int
    seed: int
    unit: Literal["prompt", "image"] = "image"  # evaluations before prompt resampling leave it out


class EvaluationMetrics(Output):
    """eval/metrics.json: per model and metric, the mean and its interval."""

    models: dict[str, dict[str, MetricSummary]] = Field(min_length=1)
    random_init: bool = False
    toy_world: bool = False  # style evaluations leave it out
    prompts: int | None = None
    images_per_prompt: int | None = None
    bootstrap: Bootstrap | None = None
    kind: Literal["style"] | None = None  # a style's evaluation

    @property
    def means(self) -> Means:
        return {model: {m: v.mean for m, v in values.items()} for model, values in self.models.items()}


class Prompts(_File, RootModel[list[str]]):
    """eval/prompts.json: the evaluation prompts, in order (images pPP_kK.png index into it)."""


class PromptScores(Output):
    """One row of per_prompt.json: the prompt and each metric's mean over its images (None: no value)."""

    model_config = ConfigDict(extra="allow")
    __pydantic_extra__: dict[str, float | None]
    prompt: str

    @property
    def scores(self) -> dict[str, float | None]:
        return dict(self.__pydantic_extra__ or {})


class PerPrompt(_File, RootModel[dict[str, list[PromptScores]]]):
    """eval/per_prompt.json: model -> one row per prompt, in prompt order."""


class VarianceEntry(Output):
    total_variance: float
    distances: list[float]  # each sample's L2 distance to the samples' centroid


class Variance(Output):
    """eval/variance.json: the feature-distribution analysis (evaluation.variance_samples > 0)."""

    feature: str
    samples: int
    prompt: str
    centroid: str | None = None
    models: dict[str, VarianceEntry]


class Gate(Output):
    """eval/gate.json: the promotion gate's verdict."""

    rule: str
    passed: bool
    details: list[str]  # one line per rule
    difference_ci95: list[tuple[float, float]] | None = None  # per rule; older gates leave it out
    student_version: str


class EncoderInfo(Output):
    """An encoder as encoders.describe() gives it (in eval/encoders.json without `path`)."""

    model: str
    random_init: bool
    path: str | None = None
    architecture: str | None = None
    embedding: str | None = None
    preprocessing: dict[str, Any] | None = None  # the image processor's own settings, as it names them
    text_preprocessing: dict[str, Any] | None = None  # CLIP: its tokenizer and maximum length


class OracleInfo(Output):
    """The toy world oracle behind subject and prompt accuracy."""

    model: str
    path: str | None = None
    digest: str | None
    subject: str
    look: str
    subject_acc: str  # what each score means
    prompt_acc: str
    subject_prompt_acc: str


class SubjectEncoders(Output):
    """eval/encoders.json of a subject's evaluation."""

    clip: EncoderInfo
    dino: EncoderInfo
    random_init: bool
    toy_world: bool | None = None
    oracle: OracleInfo | None = None  # toy world subjects


class ToyStyleInfo(Output):
    style: str
    detector: str
    content: str
    oracle: str
    oracle_digest: str | None


class StyleEncoders(Output):
    """eval/encoders.json of a style's evaluation."""

    clip: EncoderInfo
    dino: EncoderInfo
    style_encoder: str
    metrics: dict[str, str]  # metric -> what it measures
    random_init: bool
    content: str | None
    noise_strength: float
    sampling: Sampling
    toy_style: ToyStyleInfo | None = None


class StepScore(Output):
    """One scored step of a growing proxy count."""

    count: int  # the step's N
    used: int  # proxies it trained on: N, or the whole set when the set is smaller
    mean: float  # held-out mean of the metric
    ci95: list[float]  # its 95% interval, resampling held-out prompts
    # The held-out images it was scored on (a paired comparison needs the same ones at every step)
    prompts: list[str] | None = None
    seed: int | None = None  # image k of prompt p had seed `seed + 1000 p + k`
    images_per_prompt: int | None = None
    scores: list[float | None] | None = None  # per image, prompt-major; None: the metric does not apply
    # This step minus the previous one, image by image, and its 95% interval resampling prompts (from step 2)
    difference: float | None = None
    difference_ci95: list[float] | None = None


class CountState(Output):
    """proxy_count.json: a growing proxy count after a step (or before the first), and where and why it stopped
    (stages/proxy_count.py has the rule)."""

    metric: str
    available: int  # proxies the student can train on (the codes stage's count)
    stop_when: Literal["plateau", "paired"] = "plateau"  # the rule (a state written before `paired` existed: plateau)
    steps: list[StepScore] = []
    stopped: str | None = None  # why the growth stopped; None while it grows
    chosen: int | None = None  # the proxy count chosen once stopped

    def write(self, path: str | Path) -> None:
        write_json_atomic(path, self.model_dump(mode="json"))  # every field, defaults too


class FlatMetrics(Output):
    """The subject folder's metrics.json for DVC: model -> metric -> mean at the top level, and flags."""

    model_config = ConfigDict(extra="allow")
    __pydantic_extra__: dict[str, dict[str, float]]
    random_init: bool
    toy_world: bool | None = None  # style evaluations leave it out
    gate_passed: bool | None = None  # only with a gate

    @property
    def means(self) -> Means:
        return dict(self.__pydantic_extra__ or {})


# -- what the report reads ---------------------------------------------------------------------------
@dataclass
class Evaluation:
    """One evaluation folder (eval/), read and checked: what the report shows."""

    metrics: EvaluationMetrics
    prompts: list[str]
    per_prompt: dict[str, list[PromptScores]]
    variance: Variance | None
    gate: Gate | None
    encoders: SubjectEncoders | StyleEncoders | None
    record: EvaluateRecord | StyleEvaluateRecord | None

    @property
    def is_style(self) -> bool:
        return self.metrics.kind == "style"


def load_evaluation(eval_dir: Path) -> Evaluation:
    """Every JSON file of a subject's or a style's evaluation folder.

    Raises:
        ProxytuneError: metrics.json, prompts.json or per_prompt.json is missing, or any file is malformed.
    """
    eval_dir = Path(eval_dir)
    missing = f"missing from the evaluation output; {RERUN}"
    metrics = EvaluationMetrics.read(eval_dir / layout.METRICS_FILE, missing)
    style = metrics.kind == "style"
    encoders = (StyleEncoders if style else SubjectEncoders).read_optional(eval_dir / layout.ENCODERS_FILE)
    return Evaluation(
        metrics=metrics,
        prompts=Prompts.read(eval_dir / layout.PROMPTS_FILE, missing).root,
        per_prompt=PerPrompt.read(eval_dir / layout.PROMPT_SCORES_FILE, missing).root,
        variance=Variance.read_optional(eval_dir / layout.VARIANCE_FILE),
        gate=Gate.read_optional(eval_dir / layout.GATE_FILE),
        encoders=encoders,
        record=(StyleEvaluateRecord if style else EvaluateRecord).read_optional(eval_dir / layout.RECORD_FILE),
    )


@dataclass
class SubjectRecords:
    """The records along one subject's chain (None where a stage's record is missing)."""

    teacher: TeacherRecord | None
    proxy: SynthesisRecord | None
    student: StudentRecord | None
    eval: EvaluateRecord | None


def load_subject_records(upstream: Path, student_dir: Path, eval_dir: Path) -> SubjectRecords:
    """The records of a subject: teacher and proxy set from `upstream` (the subject folder, or a variant's
    base), the student from `student_dir` (its own, a variant's or the joint student), the evaluation's."""
    folder = Path(upstream)
    return SubjectRecords(
        teacher=TeacherRecord.read_optional(folder / layout.OUT_DIRS["teacher"] / layout.RECORD_FILE),
        proxy=SynthesisRecord.read_optional(folder / layout.OUT_DIRS["synthesis"] / layout.RECORD_FILE),
        student=StudentRecord.read_optional(Path(student_dir) / layout.RECORD_FILE),
        eval=EvaluateRecord.read_optional(Path(eval_dir) / layout.RECORD_FILE),
    )


@dataclass
class StyleRecords:
    teacher: TeacherRecord | None
    curated: CurationRecord | None
    student: StyleStudentRecord | None
    eval: StyleEvaluateRecord | None


def load_style_records(folder: Path) -> StyleRecords:
    """The records of a style's folder (runs/EXPERIMENT/STYLE)."""
    folder = Path(folder)

    def path(step: str) -> Path:
        return folder / layout.OUT_DIRS[step] / layout.RECORD_FILE

    return StyleRecords(teacher=TeacherRecord.read_optional(path("teacher")),
                        curated=CurationRecord.read_optional(path("curation")),
                        student=StyleStudentRecord.read_optional(path("style_student")),
                        eval=StyleEvaluateRecord.read_optional(path("style_evaluate")))
