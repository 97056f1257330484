"""`proxytune apply` end to end on tiny models: DVC stages, MLflow registry, pull, lineage, no-op re-run."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import tiny_spec
from proxytune.files import digest_files, sha256_file

STAGES = ("teacher", "synthesis", "codes", "student", "evaluate")


def cli(project: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("proxytune")
    cmd = [str(exe) if exe.exists() else "proxytune", *args]
    result = subprocess.run(cmd, cwd=project, capture_output=True, text=True, env=os.environ.copy(), timeout=900)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def new_project(root: Path, photos: Path, spec: dict) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "specs").mkdir(exist_ok=True)
    (root / "specs" / "t.yaml").write_text(yaml.safe_dump(spec))
    return root


@pytest.fixture(scope="module")
def applied(tmp_path_factory, photos):
    with pytest.MonkeyPatch.context() as env:  # for this module's tests only
        env.setenv("PROXYTUNE_DREAMBENCH", str(photos))
        env.delenv("MLFLOW_TRACKING_URI", raising=False)
        project = new_project(tmp_path_factory.mktemp("e2e"), photos, tiny_spec())
        result = cli(project, "apply", "specs/t.yaml")
        yield project, result


def subject_dir(project: Path) -> Path:
    return project / "runs" / "t" / "dog"


def test_apply_runs_every_stage_and_writes_outputs(applied):
    project, result = applied
    for stage in STAGES:
        assert f"Running stage '{stage}@t.dog'" in result.stdout, result.stdout[-2000:]
    out = subject_dir(project)
    assert (out / "teacher" / "adapter" / "pytorch_lora_weights.safetensors").stat().st_size > 0
    manifest = json.loads((out / "proxy" / "manifest.json").read_text())
    assert len(manifest["images"]) == 6 and len({e["seed"] for e in manifest["images"]}) == 6
    for entry in manifest["images"]:
        assert sha256_file(out / "proxy" / entry["file"]) == entry["sha256"]
        assert entry["prompt"] == "a sks dog"
    entries = [(f"{e['file']}\t{e['prompt']}\t{e['seed']}", e["sha256"]) for e in manifest["images"]]
    assert manifest["digest"] == digest_files(entries)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["random_init"] is True
    for model in ("teacher", "student"):
        for name in ("clip_i", "clip_t", "dino"):
            assert -1.0 <= metrics[model][name] <= 1.0
    table = (out / "eval" / "table.md").read_text()
    assert "| teacher |" in table and "| student |" in table and "Random-initialised" in table
    assert (project / "dvc.lock").exists() and (project / ".dvc").is_dir()


def test_second_apply_runs_no_stage(applied):
    project, _ = applied
    lock = (project / "dvc.lock").read_text()
    result = cli(project, "apply", "specs/t.yaml")
    assert "up to date" in result.stdout
    assert "Running stage" not in result.stdout
    assert (project / "dvc.lock").read_text() == lock


def test_mlflow_runs_are_nested_and_proxy_is_a_dataset(applied):
    project, _ = applied
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'registry' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("t")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("proxytune.kind") == "apply"]
    children = [r for r in runs if r.data.tags.get("proxytune.kind") == "stage"]
    assert len(parents) == 1  # the no-op second apply made no run
    assert sorted(r.data.tags["proxytune.stage"] for r in children) == sorted(STAGES)
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in children)
    student = next(r for r in children if r.data.tags["proxytune.stage"] == "student")
    manifest = json.loads((subject_dir(project) / "proxy" / "manifest.json").read_text())
    dataset = student.inputs.dataset_inputs[0]
    assert {t.key: t.value for t in dataset.tags}["digest_sha256"] == manifest["digest"]
    assert student.data.metrics["loss"] > 0


def test_registry_pull_teacher_loads_with_diffusers(applied, tmp_path):
    project, _ = applied
    listing = cli(project, "registry", "list").stdout
    assert "t.dog.teacher@1" in listing and "t.dog.student@1" in listing and "candidate" in listing
    cli(project, "registry", "pull", "t.dog.teacher@candidate", "-o", str(tmp_path / "teacher"))
    from proxytune.backends.teachers import diffusion

    pipe = diffusion.load_pipeline("tiny-sd")
    base = diffusion.generate(pipe, ["a S* dog"], [3], steps=3, guidance=7.5, size=64)[0]
    pipe.load_lora_weights(str(tmp_path / "teacher"))
    tuned = diffusion.generate(pipe, ["a S* dog"], [3], steps=3, guidance=7.5, size=64)[0]
    assert base.tobytes() != tuned.tobytes()


def test_registry_pull_student_loads_with_peft(applied, tmp_path):
    project, _ = applied
    cli(project, "registry", "pull", "t.dog.student@1", "-o", str(tmp_path / "student"))
    from peft import PeftModel

    from proxytune.backends.students.llamagen import backend as llamagen

    def logits(adapter_dir):
        bundle = llamagen.load_student("tiny-llamagen")
        model = PeftModel.from_pretrained(bundle.model, str(adapter_dir)).eval()
        text = bundle.encode_prompts(["a S* dog"])
        codes = torch.arange(bundle.model.config.grid_size**2).remainder(bundle.model.config.codebook_size)[None]
        with torch.no_grad():
            return model(text_feats=text, codes=codes)

    pulled, original = logits(tmp_path / "student"), logits(subject_dir(project) / "student" / "adapter")
    out = lambda x: x if torch.is_tensor(x) else x.logits  # noqa: E731
    assert torch.equal(out(pulled), out(original))


def test_lineage_shows_the_chain_with_digests(applied, photos):
    project, _ = applied
    text = cli(project, "lineage", "t.dog.student@1").stdout
    ref_sha = sha256_file(photos / "dog" / "00.jpg")
    manifest = json.loads((subject_dir(project) / "proxy" / "manifest.json").read_text())
    assert "00.jpg" in text and ref_sha[:16] in text
    assert "teacher t.dog.teacher@1" in text
    assert manifest["digest"][:16] in text
    assert "student t.dog.student@1" in text and "teacher.clip_i" in text
    chain = json.loads(cli(project, "lineage", "t.dog.student@1", "--json").stdout)
    assert chain["proxy"]["digest"] == manifest["digest"]
    assert chain["references"]["files"]["00.jpg"] == ref_sha


def test_evaluation_outputs_intervals_variance_and_gate(applied):
    project, _ = applied
    eval_dir = subject_dir(project) / "eval"
    summary = json.loads((eval_dir / "metrics.json").read_text())
    for model in ("teacher", "student"):
        for name in ("clip_i", "clip_t", "dino"):
            value = summary["models"][model][name]
            assert value["ci95"][0] <= value["mean"] <= value["ci95"][1]
    prompts = json.loads((eval_dir / "prompts.json").read_text())
    assert len(prompts) == 2 and len(list((eval_dir / "images" / "student").glob("p*_k*.png"))) == 4
    variance = json.loads((eval_dir / "variance.json").read_text())
    for model in ("teacher", "student"):
        assert len(variance["models"][model]["distances"]) == 4 and variance["models"][model]["total_variance"] > 0
    gate = json.loads((eval_dir / "gate.json").read_text())
    flat = json.loads((subject_dir(project) / "metrics.json").read_text())
    assert gate["passed"] == (flat["student"]["dino"] >= flat["teacher"]["dino"])
    show = cli(project, "registry", "list").stdout
    student_line = next(line for line in show.splitlines() if line.startswith("t.dog.student@1"))
    assert ("champion" in student_line) == gate["passed"]


def test_stage_outputs_parse_with_the_models_their_readers_use(applied, tmp_path):
    from test_outputs import check_stage_outputs

    project, _ = applied
    check_stage_outputs(subject_dir(project), tmp_path)


def test_compare_two_evaluations(applied):
    project, _ = applied
    record = json.loads((subject_dir(project) / "eval" / "record.json").read_text())
    out = cli(project, "compare", "t.dog.student@1", record["run_id"]).stdout
    assert "student.dino" in out and "teacher.clip_i" in out and "+0.0000" in out
    # the same evaluation twice: paired by prompt, every prompt's difference 0
    assert "95% interval of B - A" in out and "paired by prompt" in out
    assert next(line for line in out.splitlines() if line.startswith("student.dino")).endswith("[+0.0000, +0.0000]")
    bad = cli(project, "compare", "t.dog.student@7", record["run_id"], check=False)
    assert bad.returncode == 2 and bad.stderr.startswith("error: t.dog.student@7")


def test_dvc_plots_show_finds_the_curves_and_per_prompt_metrics(applied):
    project, _ = applied
    out = subject_dir(project)
    for stage in ("teacher", "student"):
        rows = (out / stage / "loss.csv").read_text().splitlines()
        assert rows[0].startswith("step,loss") and len(rows) == 1 + 20  # tiny_spec: 20 steps each
    per_prompt = (out / "eval" / "per_prompt.csv").read_text().splitlines()
    assert per_prompt[0].startswith("prompt,teacher_clip_i,") and len(per_prompt) == 1 + 2
    shown = json.loads(subprocess.run(["dvc", "plots", "show", "--json"], cwd=project, capture_output=True, text=True,
                                      check=True, env={**os.environ, "DVC_NO_ANALYTICS": "1"}).stdout)["data"]
    assert {"runs/t/dog/teacher/loss.csv", "runs/t/dog/student/loss.csv", "dino per prompt t.dog"} <= set(shown)
    for name in ("runs/t/dog/teacher/loss.csv", "dino per prompt t.dog"):
        values = shown[name][0]["content"]["data"]["values"]
        assert len(values) == (20 if "loss" in name else 2 * 2), name  # per prompt: teacher and student series


RECORDS = ("record.json",)  # run ids and registered versions: records of this run, not its results


def output_files(project: Path) -> dict[str, Path]:
    """Every file under runs/ (outside hidden scratch folders such as .work), by relative path."""
    base = project / "runs"
    return {p.relative_to(base).as_posix(): p for p in sorted(base.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(base).parts)}


def test_same_spec_and_seed_give_identical_artifacts(applied, tmp_path, photos):
    project, _ = applied
    other = new_project(tmp_path / "again", photos, tiny_spec())
    cli(other, "apply", "specs/t.yaml")
    ours, theirs = output_files(project), output_files(other)
    assert sorted(ours) == sorted(theirs)
    compared = [rel for rel in ours if Path(rel).name not in RECORDS]
    for rel in compared:
        a, b = ours[rel], theirs[rel]
        assert sha256_file(a) == sha256_file(b), rel  # byte-identical, codes.safetensors and the manifest included
    assert "t/dog/codes/codes.safetensors" in compared and "t/dog/student/adapter/adapter_model.safetensors" in compared


def test_a_moved_project_pulls_and_audits_where_it_is_now(applied, tmp_path):
    """The embedded store records absolute artifact locations; a moved project reads them where it is now."""
    project, _ = applied
    moved = tmp_path / "moved"
    shutil.move(project, moved)
    try:
        outputs = [cli(moved, "registry", "pull", "t.dog.student@1", "-o", str(tmp_path / "out")).stdout,
                   cli(moved, "audit").stdout, cli(moved, "registry", "show", "t.dog.teacher@1").stdout]
    finally:
        shutil.move(moved, project)
    assert "audit: ok" in outputs[1] and f"source:  {(moved / 'registry' / 'artifacts').as_uri()}/" in outputs[2]
    assert all(str(project) not in text for text in outputs)
    assert (tmp_path / "out" / "adapter_model.safetensors").read_bytes() == (
        subject_dir(project) / "student" / "adapter" / "adapter_model.safetensors").read_bytes()


def test_editing_student_section_reruns_only_student_and_evaluate(applied):
    # Last in the module: it changes the project the other tests read.
    project, _ = applied
    spec_path = project / "specs" / "t.yaml"
    spec = yaml.safe_load(spec_path.read_text())
    spec["student"]["learning_rate"] = 5e-4
    spec_path.write_text(yaml.safe_dump(spec))
    result = cli(project, "apply", "specs/t.yaml")
    ran = sorted(line.split("'")[1] for line in result.stdout.splitlines() if line.startswith("Running stage"))
    assert ran == ["evaluate@t.dog", "student@t.dog"], result.stdout[-2000:]
    assert "t.dog.student@2" in cli(project, "registry", "list").stdout
