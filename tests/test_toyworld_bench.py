"""benchmarks/toyworld.py: how the paper's claims are read off toy-bench's evaluation outputs."""

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("toyworld_bench", REPO / "benchmarks" / "toyworld.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def metrics(**subject_acc: float) -> dict:
    """A metrics.json body: each model's subject accuracy as given, other fidelity scores following it."""
    def entry(value: float) -> dict:
        return {"mean": value, "ci95": [value - 0.1, value + 0.1]}
    return {"models": {model.replace("_", "-"): {"subject_acc": entry(v), "dino": entry(0.2 + v / 2),
                                                 "clip_i": entry(0.3 + v / 3), "prompt_acc": entry(0.9 - v),
                                                 "subject_prompt_acc": entry(v * (0.9 - v))}
                       for model, v in subject_acc.items()}}


def write_run(project: Path, experiment: str, subject: str, body: dict, variance: dict | None = None) -> None:
    folder = project / "runs" / experiment / subject / "eval"
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps(body))
    if variance:
        (folder / "variance.json").write_text(json.dumps({"models": {m: {"total_variance": v} for m, v in variance.items()}}))


def project_with(tmp_path: Path, student: float, direct: float, teacher: float, variance: tuple[float, float]) -> Path:
    for subject in ("stripy-box", "dotty-ball"):
        write_run(tmp_path, "toy-bench", subject,
                  metrics(base_teacher=0.0, teacher=teacher, base_student=0.0, student=student),
                  {"teacher": variance[0], "student": variance[1]})
        for variant, value in (("direct-lora", direct), ("direct-full", direct), ("augment", direct), ("proxy-16", student / 2)):
            # a variant's evaluation scores the base models and the teacher again: only its student counts
            write_run(tmp_path, f"toy-bench--{variant}", subject, metrics(base_student=0.9, teacher=0.9, student=value))
    return tmp_path


def verdicts(bench, project: Path) -> dict[str, str]:
    return {c["claim"]: c["verdict"] for c in bench.claims(bench.collect(project, "toy-bench"))}


def test_variants_contribute_only_their_student(bench, tmp_path):
    data = bench.collect(project_with(tmp_path, 0.4, 0.05, 0.3, (300.0, 200.0)), "toy-bench")
    row = data["metrics"]["stripy-box"]
    assert row["student"]["subject_acc"]["mean"] == 0.4 and row["base-student"]["subject_acc"]["mean"] == 0.0
    assert row["direct-lora"]["subject_acc"]["mean"] == 0.05 and row["proxy-16"]["subject_acc"]["mean"] == 0.2
    assert data["variance"]["dotty-ball"] == {"teacher": 300.0, "student": 200.0}
    text = bench.render(data, bench.claims(data))
    assert "| **mean** | 0.000 [" in text  # the subject_acc pivot's mean row starts with base-teacher


def test_claims_hold_when_the_student_wins(bench, tmp_path):
    assert verdicts(bench, project_with(tmp_path, 0.4, 0.05, 0.3, (300.0, 200.0))) == {
        "a": "holds", "b": "holds", "c": "holds", "d": "holds", "e": "partly holds"}


def test_claims_fail_when_direct_lora_learns_the_subject(bench, tmp_path):
    # direct LoRA as good as the student, teacher better, variance higher: every claim fails
    assert verdicts(bench, project_with(tmp_path, 0.3, 0.3, 0.5, (200.0, 300.0))) == {
        "a": "fails", "b": "fails", "c": "fails", "d": "fails", "e": "fails"}
