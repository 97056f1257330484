"""Registry, lineage and audit at team scale; reliability under crashes and concurrent applies.

Three projects, built once for the module (each stage of a tiny spec shrunk to a few steps):
  * `team`: an MLflow server (sqlite + artifact folder) in a subprocess; a git project applies a
    spec whose tracking.uri points at it, then pulls its adapters back. Its outputs are the
    uninterrupted reference run.
  * `crashed`: the same spec on the embedded store, killed hard (PROXYTUNE_CRASH_AT) during
    teacher training, right after the teacher's registration (there the whole process group:
    apply, `dvc repro` and the stage), during synthesis, during student training and after
    evaluation's generation, re-applied after each; the last re-apply runs together with an apply
    of a second spec. Registry, audit and lineage tests then use it.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import REPO, tiny_spec
from proxytune.files import sha256_file

WEIGHTS = {"teacher": "teacher/adapter/pytorch_lora_weights.safetensors",
           "student": "student/adapter/adapter_model.safetensors"}
CRASHES = ["teacher:step:3", "teacher:registered", "synthesis:batch:1", "student:step:3", "evaluate:generated"]
GROUP_CRASH = "teacher:registered"  # SIGKILL to apply's whole process group, as a terminal or OOM kill would


def timed(label: str, start: float) -> None:
    print(f"[time] {label}: {time.monotonic() - start:.0f} s")  # shown with pytest -s


def mini_spec(name: str = "t", **sections) -> dict:
    """tiny_spec with every stage cut to the bone: the pipeline runs, in about a minute."""
    return tiny_spec(
        name,
        teacher={"steps": 4, "checkpoint_every": 2, "batch_size": 1},
        synthesis={"num_images": 4, "batch_size": 2, "num_inference_steps": 2},
        student={"steps": 4, "checkpoint_every": 2, "batch_size": 2},
        evaluation={"num_prompts": 1, "images_per_prompt": 1, "variance_samples": 0, "bootstrap_resamples": 20,
                    "grid_prompts": 1, "gate": []},
        **sections,
    )


def env_for(photos: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "PROXYTUNE_CRASH_AT", "PROXYTUNE_CRASH_GROUP")}
    env.update(PROXYTUNE_DREAMBENCH=str(photos), PYTHONPATH=str(REPO), **extra)  # test this tree
    return env


def command(*args: str) -> list[str]:
    exe = Path(sys.executable).with_name("proxytune")
    return [str(exe) if exe.exists() else "proxytune", *args]


def cli(project: Path, photos: Path, *args: str, check: bool = True, **extra: str) -> subprocess.CompletedProcess:
    # A session of its own: a crash point that kills its process group (PROXYTUNE_CRASH_GROUP) kills only the apply.
    result = subprocess.run(command(*args), cwd=project, env=env_for(photos, **extra), capture_output=True,
                            text=True, timeout=900, start_new_session=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def new_project(root: Path, specs: dict[str, dict]) -> Path:
    (root / "specs").mkdir(parents=True)
    for name, spec in specs.items():
        (root / "specs" / f"{name}.yaml").write_text(yaml.safe_dump(spec))
    return root


def client_for(uri: str):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def versions(uri: str, name: str) -> list[str]:
    return sorted(str(v.version) for v in client_for(uri).search_model_versions(f"name='{name}'"))


def embedded(project: Path) -> str:
    return f"sqlite:///{project / 'registry' / 'mlflow.db'}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- fixtures --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def team(tmp_path_factory, photos):
    """Apply against an MLflow server, pull from it; the server is always stopped afterwards."""
    base = tmp_path_factory.mktemp("team")
    server_dir = base / "server"
    server_dir.mkdir()
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    log = open(server_dir / "server.log", "w")
    server = subprocess.Popen(
        ["mlflow", "server", "--backend-store-uri", f"sqlite:///{server_dir / 'db.sqlite'}",
         "--artifacts-destination", str(server_dir / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
    )
    out: dict = {"uri": uri, "server_dir": server_dir}
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, (server_dir / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "mlflow server did not answer /health within 180 s"
            time.sleep(1)
        project = new_project(base / "project", {"t": mini_spec(tracking={"uri": uri})})
        git = ["git", "-c", "user.email=ci@example.com", "-c", "user.name=ci"]
        subprocess.run(["git", "init", "-q"], cwd=project, check=True)
        subprocess.run([*git, "add", "-A"], cwd=project, check=True)
        subprocess.run([*git, "commit", "-qm", "specs"], cwd=project, check=True)
        out["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True).stdout.strip()
        start = time.monotonic()
        out["apply"] = cli(project, photos, "apply", "specs/t.yaml")
        timed("team apply", start)
        out["project"] = project
        out["show"] = json.loads(cli(project, photos, "registry", "show", "t.dog.student@candidate", "--uri", uri,
                                     "--json").stdout)
        for role in ("teacher", "student"):
            out[f"pull_{role}"] = cli(project, photos, "registry", "pull", f"t.dog.{role}@candidate",
                                      "-o", str(base / "pulled" / role), "--uri", uri)
        out["pulled"] = base / "pulled"
        out["audit"] = cli(project, photos, "audit", "--uri", uri, check=False)
    finally:
        try:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(server.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            server.wait(timeout=20)
        log.close()
    return out


@pytest.fixture(scope="module")
def crashed(tmp_path_factory, photos):
    project = new_project(tmp_path_factory.mktemp("crashed"), {"t": mini_spec(), "u": mini_spec("u", seed=1)})
    out = {"project": project, "runs": {}}
    for point in CRASHES:
        start = time.monotonic()
        group = {"PROXYTUNE_CRASH_GROUP": "1"} if point == GROUP_CRASH else {}
        result = cli(project, photos, "apply", "specs/t.yaml", check=False, PROXYTUNE_CRASH_AT=point, **group)
        timed(f"apply crashing at {point}", start)
        out["runs"][point] = {
            "result": result,
            "outputs": sorted(p.name for p in (project / "runs" / "t" / "dog").iterdir()
                              if p.is_dir() and not p.name.startswith(".")),
            "staging": sorted(p.name.split(".staging-")[0] for p in (project / "runs" / "t" / "dog").glob(".*.staging-*")),
            "teacher_versions": versions(embedded(project), "t.dog.teacher") if (project / "registry").exists() else [],
        }
    # Last: finish t while another spec is applied in the same project at the same time.
    start = time.monotonic()
    procs = {name: subprocess.Popen(command("apply", f"specs/{name}.yaml"), cwd=project, env=env_for(photos),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name in ("t", "u")}
    out["final"] = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=900)
        out["final"][name] = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    timed("two concurrent applies", start)
    return out


# -- team mode ---------------------------------------------------------------------------------
def test_team_mode_apply_and_pull_through_an_mlflow_server(team):
    project = team["project"]
    assert "done" in team["apply"].stdout
    assert not (project / "registry").exists()  # nothing went to the embedded store
    show = team["show"]
    assert show["ref"] == "t.dog.student@1" and "candidate" in show["aliases"]
    assert show["source"].startswith("mlflow-artifacts:")
    tags = show["tags"]
    assert tags["proxytune.git_commit"] == team["commit"]
    assert tags["proxytune.backend"] == "llamagen" and tags["proxytune.base_model"] == "tiny-llamagen"
    assert tags["proxytune.subject"] == "dog" and tags["proxytune.spec_file"] == "specs/t.yaml"
    assert tags["proxytune.spec_digest"] == sha256_file(project / "specs" / "t.yaml")
    local = project / "runs" / "t" / "dog" / "student" / "adapter"
    assert show["files"] == {p.name: sha256_file(p) for p in local.iterdir()}
    assert tags["proxytune.adapter_digest"] == show["files"]["adapter_model.safetensors"]
    for role in ("teacher", "student"):
        assert "every file matches" in team[f"pull_{role}"].stdout
        pulled = team["pulled"] / role
        weights = [p.name for p in pulled.iterdir() if p.suffix not in (".json", ".md")]
        assert weights and all(name.endswith(".safetensors") for name in weights), weights
        for path in pulled.iterdir():
            assert sha256_file(path) == sha256_file(project / "runs" / "t" / "dog" / role / "adapter" / path.name)
    stored = list((team["server_dir"] / "artifacts").rglob("adapter_model.safetensors"))
    assert len(stored) == 1  # the server's artifact store holds the adapter
    assert team["audit"].returncode == 0 and "audit: ok" in team["audit"].stdout, team["audit"].stdout


# -- reliability -------------------------------------------------------------------------------
def test_killed_at_every_point_then_rerun_matches_an_uninterrupted_run(crashed, team):
    project = crashed["project"]
    out = project / "runs" / "t" / "dog"
    runs = crashed["runs"]
    for point in CRASHES:
        result = runs[point]["result"]
        assert result.returncode != 0, point
        assert f"simulated crash at {point}" in result.stderr + result.stdout, (point, result.stderr[-2000:])
    # What each crash left: nothing half-written, and no duplicate versions.
    assert runs["teacher:step:3"]["outputs"] == [] and runs["teacher:step:3"]["teacher_versions"] == []
    assert runs["teacher:registered"]["outputs"] == [] and runs["teacher:registered"]["teacher_versions"] == ["1"]
    assert runs["teacher:registered"]["staging"] == [".teacher"]  # killed between registration and rename
    resumed = runs["teacher:registered"]["result"]
    assert "teacher: resuming from step 2" in resumed.stdout + resumed.stderr
    assert resumed.returncode == -signal.SIGKILL  # the apply itself was killed, with dvc and the stage
    after_kill = runs["synthesis:batch:1"]["result"]  # the next apply says what happened, in one line of ours
    said = after_kill.stdout + after_kill.stderr
    assert said.count("resuming after an interrupted run (process ") == 1 and "had been killed" not in said, said[-3000:]
    assert runs["synthesis:batch:1"]["outputs"] == ["teacher"] and runs["synthesis:batch:1"]["staging"] == []
    assert runs["synthesis:batch:1"]["teacher_versions"] == ["1"]  # re-registration reused version 1
    assert runs["student:step:3"]["outputs"] == ["codes", "proxy", "teacher"]
    assert runs["evaluate:generated"]["outputs"] == ["codes", "proxy", "student", "teacher"]
    # The re-run after the last crash finishes, and everything equals the uninterrupted run.
    final = crashed["final"]["t"]
    assert final.returncode == 0, final.stdout[-2000:] + final.stderr[-2000:]
    reference = team["project"] / "runs" / "t" / "dog"
    for role, rel in WEIGHTS.items():
        assert sha256_file(out / rel) == sha256_file(reference / rel), role
    assert json.loads((out / "metrics.json").read_text()) == json.loads((reference / "metrics.json").read_text())
    assert json.loads((out / "proxy" / "manifest.json").read_text())["digest"] == \
        json.loads((reference / "proxy" / "manifest.json").read_text())["digest"]
    uri = embedded(project)
    assert versions(uri, "t.dog.teacher") == ["1"] and versions(uri, "t.dog.student") == ["1"]
    for role in ("teacher", "student"):
        assert json.loads((out / role / "record.json").read_text())["version"] == "1"
    assert not list(out.glob(".*.staging-*"))  # staging folders of killed stages were cleaned up
    reused = client_for(uri).search_runs(
        [client_for(uri).get_experiment_by_name("t").experiment_id],
        filter_string="tags.`proxytune.reused_version` = 't.dog.teacher@1'")
    assert len(reused) == 1
    # The killed apply's run and its teacher stage's run were closed by the next apply; nothing is left RUNNING.
    client = client_for(uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    assert not client.search_runs(experiments, filter_string="attributes.status = 'RUNNING'")
    killed = client.search_runs(experiments, filter_string="attributes.status = 'KILLED'")
    assert sorted(r.data.tags["proxytune.kind"] + ":" + r.data.tags.get("proxytune.stage", "") for r in killed) == \
        ["apply:", "stage:teacher"]  # (audit has no ghost left to close or report: see the audit test)


def test_two_applies_at_once_in_one_project_both_finish(crashed, photos):
    project = crashed["project"]
    final = crashed["final"]
    for name, result in final.items():
        assert result.returncode == 0, (name, result.stdout[-2000:], result.stderr[-2000:])
        assert "done" in result.stdout
    waited = [name for name, result in final.items() if "waiting for another proxytune apply" in result.stderr]
    assert len(waited) == 1, {n: r.stderr[-500:] for n, r in final.items()}
    uri = embedded(project)
    for name in ("t", "u"):
        for role in ("teacher", "student"):
            assert versions(uri, f"{name}.dog.{role}") == ["1"]
        assert (project / "runs" / name / "dog" / "metrics.json").exists()
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    assert sorted(lock) == sorted(f"{s}@{n}.dog" for s in ("teacher", "synthesis", "codes", "student", "evaluate") for n in "tu")
    status = cli(project, photos, "apply", "specs/t.yaml", "specs/u.yaml", "--dry-run")
    assert "up to date" in status.stdout
    client = client_for(uri)
    for name in ("t", "u"):
        parents = client.search_runs([client.get_experiment_by_name(name).experiment_id],
                                     filter_string="tags.`proxytune.kind` = 'apply' and attributes.status = 'FINISHED'")
        assert len(parents) == 1, name


# -- registry ------------------------------------------------------------------------------------
def test_registry_show_and_promote(crashed, photos):
    project = crashed["project"]
    shown = cli(project, photos, "registry", "show", "t.dog.teacher@candidate").stdout
    weights = project / "runs" / "t" / "dog" / WEIGHTS["teacher"]
    assert shown.startswith("t.dog.teacher@1\n")
    assert f"pytorch_lora_weights.safetensors  {sha256_file(weights)}" in shown
    for key in ("proxytune.spec_digest", "proxytune.backend: diffusers", "proxytune.base_model: tiny-sd",
                "proxytune.subject: dog", "proxytune.files_digest", "run:", "source:"):
        assert key in shown, key
    assert "proxytune.git_commit" not in shown  # this project is not a git repository
    promoted = cli(project, photos, "registry", "promote", "t.dog.teacher@1", "champion")
    assert "t.dog.teacher@champion → t.dog.teacher@1" in promoted.stdout
    info = json.loads(cli(project, photos, "registry", "show", "t.dog.teacher@champion", "--json").stdout)
    assert info["aliases"] == ["candidate", "champion"]
    bad = cli(project, photos, "registry", "promote", "t.dog.teacher@7", "champion", check=False)
    assert bad.returncode == 2 and bad.stderr.startswith("error: t.dog.teacher@7") and len(bad.stderr.splitlines()) == 1


def test_pull_refuses_a_tampered_artifact_and_audit_names_it(crashed, photos, tmp_path):
    project = crashed["project"]
    clean = cli(project, photos, "audit")
    assert clean.returncode == 0 and clean.stdout.startswith("audit: ok (4 versions"), clean.stdout
    source = json.loads(cli(project, photos, "registry", "show", "t.dog.teacher@1", "--json").stdout)["source"]
    stored = Path(source.removeprefix("file://")) / "pytorch_lora_weights.safetensors"
    original = stored.read_bytes()
    try:
        stored.write_bytes(original[: len(original) // 2])  # truncated
        pulled = cli(project, photos, "registry", "pull", "t.dog.teacher@1", "-o", str(tmp_path / "x"), check=False)
        assert pulled.returncode == 2, pulled.stdout + pulled.stderr
        assert len(pulled.stderr.strip().splitlines()) == 1
        assert "tampered or truncated" in pulled.stderr and "pytorch_lora_weights.safetensors" in pulled.stderr
        assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x.staging-*"))
        stored.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))  # same size, one bit flipped
        audit = cli(project, photos, "audit", check=False)
        assert audit.returncode == 1
        problems = [line for line in audit.stdout.splitlines() if line.startswith("problem:")]
        assert len(problems) == 1 and "t.dog.teacher@1: pytorch_lora_weights.safetensors: sha256" in problems[0]
    finally:
        stored.write_bytes(original)
    # A broken lineage link: the student version names a teacher version that does not exist.
    client = client_for(embedded(project))
    client.set_model_version_tag("u.dog.student", "1", "proxytune.teacher_version", "u.dog.teacher@9")
    try:
        audit = cli(project, photos, "audit", check=False)
        assert audit.returncode == 1 and "u.dog.student@1: teacher version u.dog.teacher@9 is not in the registry" in audit.stdout
    finally:
        client.set_model_version_tag("u.dog.student", "1", "proxytune.teacher_version", "u.dog.teacher@1")
    assert cli(project, photos, "audit").returncode == 0
    cli(project, photos, "registry", "pull", "t.dog.teacher@1", "-o", str(tmp_path / "ok"))
    assert [p.name for p in (tmp_path / "ok").iterdir()] == ["pytorch_lora_weights.safetensors"]


# -- lineage ---------------------------------------------------------------------------------------
def test_lineage_mermaid_and_stale_marks(crashed, photos):
    project = crashed["project"]
    drawing = cli(project, photos, "lineage", "t.dog.student@candidate", "--mermaid").stdout
    assert drawing.startswith("flowchart LR")
    for edge in ("references --> teacher", "teacher --> proxy", "proxy --> student", "student --> evaluation0"):
        assert edge in drawing
    assert "t.dog.teacher@1" in drawing and "t.dog.student@1" in drawing
    assert not [line for line in drawing.splitlines() if line.strip().startswith("class ")]  # nothing stale
    chain = json.loads(cli(project, photos, "lineage", "t.dog.student@1", "--json").stdout)
    nodes = [chain[k] for k in ("references", "teacher", "proxy", "student")] + chain["evaluations"]
    assert [n["stale"] for n in nodes] == [False] * 5, [n.get("stale_reasons") for n in nodes]
    spec_path = project / "specs" / "t.yaml"
    original = spec_path.read_text()
    try:
        spec = yaml.safe_load(original)
        spec["student"]["learning_rate"] = 5e-4
        spec_path.write_text(yaml.safe_dump(spec))  # edited, not compiled
        chain = json.loads(cli(project, photos, "lineage", "t.dog.student@1", "--json").stdout)
        assert [chain[k]["stale"] for k in ("references", "teacher", "proxy", "student")] == [False, False, False, True]
        assert "student" in chain["student"]["stale_reasons"][0] and chain["evaluations"][0]["stale"] is True
        cli(project, photos, "compile", "specs/t.yaml")  # compiled: now DVC sees the change
        text = cli(project, photos, "lineage", "t.dog.student@1").stdout
        assert "teacher t.dog.teacher@1" in text and "[fresh]" in text
        student_line = next(line for line in text.splitlines() if "student t.dog.student@1" in line)
        assert "[STALE: deps runs/t/dog/params.yaml: student modified]" in student_line
        drawing = cli(project, photos, "lineage", "t.dog.student@1", "--mermaid").stdout
        assert "class student,evaluation0 stale" in drawing
    finally:
        spec_path.write_text(original)
        cli(project, photos, "compile", "specs/t.yaml")
