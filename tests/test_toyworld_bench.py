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


def test_proxy_count_and_curation_rows_and_verdicts(bench, tmp_path):
    # four experiments (128 / 1000 proxies, plain / curated); a growing count's step and a look-alike name stay out
    values = {"toy-bench": 0.10, "toy-bench-curated": 0.40, "toy-bench-p1000": 0.15, "toy-bench-p1000-curated": 0.17}
    for experiment, value in values.items():
        for subject, shift in (("stripy-box", 0.0), ("dotty-ball", 0.03)):
            write_run(tmp_path, experiment, subject, metrics(student=value + shift))
    write_run(tmp_path, "toy-bench--grow-16", "stripy-box", metrics(student=0.9))
    assert set(bench.collect(tmp_path, "toy-bench")["metrics"]["stripy-box"]) == {"student"}
    assert bench.collect(tmp_path, "toy-bench")["metrics"]["stripy-box"]["student"]["subject_acc"]["mean"] == 0.10
    rows = bench.matrix(tmp_path, "toy-bench", 128)
    assert [(r["proxies"], r["curated"], r["experiment"]) for r in rows] == [
        (128, False, "toy-bench"), (128, True, "toy-bench-curated"),
        (1000, False, "toy-bench-p1000"), (1000, True, "toy-bench-p1000-curated")]
    assert rows[1]["subject_acc"]["mean"] == pytest.approx(0.415) and rows[1]["subjects"] == 2
    verdicts = {(v["proxies"], v["metric"]): v["verdict"] for v in bench.curation_verdicts(rows)}
    assert verdicts[(128, "subject_acc")] == "helps"  # [0.40, 0.43] is clear of [0.10, 0.13]
    assert verdicts[(1000, "subject_acc")] == "no clear change (intervals overlap)"  # [0.15, 0.18] against [0.17, 0.20]
    text = bench.render_matrix(rows, bench.curation_verdicts(rows))
    assert "| 1000 | curated | toy-bench-p1000-curated | 2 | 0.185 [" in text


def test_derived_specs_map_onto_the_synthesis_keys(bench):
    spec = {"name": "toy-bench", "synthesis": {"num_images": 128, "batch_size": 32}}
    curated = bench.derived_spec(spec, 1000, True, 2)
    assert curated["name"] == "toy-bench-p1000-curated"
    assert curated["synthesis"] == {"num_images": 2000, "batch_size": 32, "fidelity": {"keep": 1000}}
    assert bench.derived_spec(spec, 128, False, 2) == spec and spec["synthesis"]["num_images"] == 128


def test_method_only_keeps_the_student_and_drops_the_baselines(bench):
    import yaml

    from proxytune.spec import parse_spec

    spec = yaml.safe_load((bench.REPO / "specs" / "toy-bench.yaml").read_text())
    lean = bench.derived_spec(spec, 128, True, 2, method_only=True)
    assert "variants" not in lean["student"] and lean["evaluation"]["variance_samples"] == 0
    assert lean["student"]["steps"] == spec["student"]["steps"] and "variants" in spec["student"]
    parse_spec(lean, "toy-bench-curated.yaml")  # still a valid spec


def per_prompt(project: Path, experiment: str, subject: str, hits: list[float]) -> None:
    folder = project / "runs" / experiment / subject / "eval"
    folder.mkdir(parents=True)
    rows = [{"prompt": f"p{i}", "subject_acc": h, "subject_prompt_acc": h / 2} for i, h in enumerate(hits)]
    (folder / "per_prompt.json").write_text(json.dumps({"student": rows, "teacher": rows}))


def test_paired_curation_compares_the_same_prompts(bench, tmp_path):
    per_prompt(tmp_path, "toy-bench", "dotty-ball", [0.0] * 20)
    per_prompt(tmp_path, "toy-bench-curated", "dotty-ball", [0.5] * 10 + [0.0] * 10)   # +0.25, every prompt >= plain
    per_prompt(tmp_path, "toy-bench", "spotted-can", [0.5, 0.0] * 10)
    per_prompt(tmp_path, "toy-bench-curated", "spotted-can", [0.0, 0.5] * 10)           # same mean: no change
    compare = lambda: bench.paired(tmp_path, {"toy-bench": None}, "curated - plain, 128", (128, False), (128, True), 128)
    rows = {r["subject"]: r for r in compare()}
    assert rows["dotty-ball"]["subject_acc"]["change"] == pytest.approx(0.25)
    assert rows["dotty-ball"]["subject_acc"]["ci95"][0] > 0          # clear of 0
    assert rows["spotted-can"]["subject_acc"]["change"] == pytest.approx(0.0)
    lo, hi = rows["spotted-can"]["subject_acc"]["ci95"]
    assert lo < 0 < hi
    assert rows["all (pooled prompts)"]["prompts"] == 40
    assert rows["all (pooled prompts)"]["subject_acc"]["change"] == pytest.approx(0.125)
    assert "| curated - plain, 128 | dotty-ball | 20 | +0.250 [" in bench.render_paired(list(rows.values()))
    # an interval does not depend on what else the project holds (each bootstrap draws from its own generator)
    alone = tmp_path / "alone"
    per_prompt(alone, "toy-bench", "spotted-can", [0.5, 0.0] * 10)
    per_prompt(alone, "toy-bench-curated", "spotted-can", [0.0, 0.5] * 10)
    only = bench.paired(alone, {"toy-bench": None}, "curated - plain, 128", (128, False), (128, True), 128)[0]
    assert only["subject_acc"]["ci95"] == rows["spotted-can"]["subject_acc"]["ci95"]
    per_prompt(tmp_path, "toy-bench-curated", "checked-cone", [0.0])                   # no plain run: left out
    assert {r["subject"] for r in compare()} == set(rows)
    per_prompt(tmp_path, "toy-bench", "checked-cone", [0.0, 1.0])                      # other prompts: refused
    with pytest.raises(SystemExit, match="not paired"):
        compare()


def test_paired_proxy_count_reads_later_minus_earlier(bench, tmp_path):
    assert bench.comparisons((128, 1000)) == [
        ("curated - plain, 128", (128, False), (128, True)), ("curated - plain, 1000", (1000, False), (1000, True)),
        ("1000 - 128, plain", (128, False), (1000, False)), ("1000 - 128, curated", (128, True), (1000, True))]
    per_prompt(tmp_path, "toy-bench", "dotty-ball", [0.5] * 20)
    per_prompt(tmp_path, "toy-bench-p1000", "dotty-ball", [0.0] * 5 + [0.5] * 15)      # fewer hits with 1000
    rows = bench.paired(tmp_path, {"toy-bench": None}, "1000 - 128, plain", (128, False), (1000, False), 128)
    assert len(rows) == 1 and rows[0]["subject_acc"]["change"] == pytest.approx(-0.125)
    assert rows[0]["subject_acc"]["ci95"][1] < 0


def test_per_subject_rows_carry_the_oracle_share_of_the_kept_proxies(bench, tmp_path):
    for experiment, share in (("toy-bench", 0.14), ("toy-bench-curated", 0.27)):
        write_run(tmp_path, experiment, "dotty-ball", metrics(teacher=0.1, student=0.08 if share < 0.2 else 0.18))
        (tmp_path / "runs" / experiment / "dotty-ball" / "proxy_metrics.json").write_text(
            json.dumps({"kept_scores": {"judge_share": share}, "generated_scores": {"judge_share": 0.14}}))
    write_run(tmp_path, "toy-bench-p1000", "dotty-ball", metrics(teacher=0.1, student=0.2))   # no proxy metrics
    rows = bench.per_subject(tmp_path, "toy-bench", 128)
    assert [(r["proxies"], r["curated"], r["faithful_kept"]) for r in rows] == [
        (128, False, 0.14), (128, True, 0.27), (1000, False, None)]
    assert rows[1]["subject_acc"]["mean"] == 0.18 and rows[1]["teacher_subject_acc"]["mean"] == 0.1
    text = bench.render_per_subject(rows)
    assert "| dotty-ball | - | 128 | curated | 27% | 0.10 [0.00, 0.20] | 0.18 [0.08, 0.28] |" in text
    assert "| dotty-ball | - | 1000 | none | - |" in text


def test_one_subject_gives_no_verdict_over_subjects(bench, tmp_path):
    write_run(tmp_path, "toy-bench", "dotty-ball", metrics(student=0.08))
    write_run(tmp_path, "toy-bench-curated", "dotty-ball", metrics(student=0.18))
    found = bench.curation_verdicts(bench.matrix(tmp_path, "toy-bench", 128))
    assert found[0]["verdict"].startswith("one subject") and found[0]["change"] == pytest.approx(0.10)


def test_a_second_seed_is_an_experiment_of_its_own_and_pools_in_the_paired_comparison(bench, tmp_path):
    spec = {"name": "toy-bench", "seed": 0, "synthesis": {"num_images": 128}}
    replica = bench.derived_spec(spec, 1000, True, 2, seed=1)
    assert replica["name"] == "toy-bench-s1-p1000-curated" and replica["seed"] == 1
    assert bench.derived_spec(spec, 128, False, 2, seed=0)["name"] == "toy-bench"   # the spec's own seed
    per_prompt(tmp_path, "toy-bench", "dotty-ball", [0.0] * 10)
    per_prompt(tmp_path, "toy-bench-curated", "dotty-ball", [0.5] * 10)
    per_prompt(tmp_path, "toy-bench-s1", "dotty-ball", [0.5] * 10)
    per_prompt(tmp_path, "toy-bench-s1-curated", "dotty-ball", [0.0] * 10)
    (tmp_path / "runs" / "toy-bench-s12x").mkdir()                                  # not a seed of this benchmark
    assert bench.seeds_in(tmp_path, "toy-bench", 0) == [0, 1]
    bases = {bench.seeded_base("toy-bench", s, 0): s for s in (0, 1)}
    assert bases == {"toy-bench": 0, "toy-bench-s1": 1}
    rows = bench.paired(tmp_path, bases, "curated - plain, 128", (128, False), (128, True), 128)
    assert [(r["subject"], r["seed"], r["subject_acc"]["change"]) for r in rows] == [
        ("dotty-ball", 0, 0.5), ("dotty-ball", 1, -0.5), ("all (pooled prompts)", None, 0.0)]
    assert rows[-1]["prompts"] == 20
    assert "| curated - plain, 128 | dotty-ball (seed 1) | 10 | -0.500 [" in bench.render_paired(rows)


def test_student_steps_are_a_variant_on_the_same_proxies_and_compare_paired(bench, tmp_path):
    import yaml

    from proxytune.spec import parse_spec

    spec = yaml.safe_load((bench.REPO / "specs" / "toy-bench.yaml").read_text())
    longer = bench.derived_spec(spec, 1000, True, 2, method_only=True, student_steps=(1200,))
    assert longer["name"] == "toy-bench-p1000-curated"        # the same experiment: its teacher and proxies reused
    assert longer["student"]["variants"] == {"steps1200": {"steps": 1200}}
    parse_spec(longer, "toy-bench-p1000-curated.yaml")
    per_prompt(tmp_path, "toy-bench-p1000-curated", "dotty-ball", [0.0] * 10)
    per_prompt(tmp_path, "toy-bench-p1000-curated--steps1200", "dotty-ball", [0.5] * 5 + [0.0] * 5)
    per_prompt(tmp_path, "toy-bench-p1000-curated--steps1200x", "dotty-ball", [1.0] * 10)   # not a steps variant
    per_prompt(tmp_path, "toy-bench--direct-lora", "dotty-ball", [1.0] * 10)                # another variant
    rows = bench.steps_comparisons(tmp_path, {"toy-bench": 0}, 128, 300)
    assert [(r["comparison"], r["subject"], r["subject_acc"]["change"]) for r in rows] == [
        ("1200 - 300 student steps, 1000 curated", "dotty-ball", 0.25)]
