"""Cheap checks (no model runs): bad input, fault hooks, the project lock, weight loading, many subjects."""

import ast
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from conftest import REPO, copy_images
from proxytune.tracking import provenance
from proxytune.cli import main
from proxytune.project import project_lock

GOOD = {
    "name": "t",
    "subjects": [{"name": "dog", "class": "dog", "images": "dreambench:dog"}],
    "teacher": {"model": "tiny-sd"},
    # built-in encoders: apply's model pre-flight would refuse the default hub ones where they are not cached
    "evaluation": {"clip_model": "tiny-clip", "dino_model": "tiny-dino"},
}


def write_spec(project: Path, data: dict, name: str = "spec.yaml") -> Path:
    path = project / "specs" / name
    path.write_text(yaml.safe_dump(data))
    return path


def one_line_error(result, path: Path) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith(f"error: {path}: "), lines[0]
    assert "Traceback" not in result.output
    return lines[0]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens once the socket is closed


# -- bad input ----------------------------------------------------------------------------------
def test_unreachable_tracking_server_fails_before_anything_is_written(project):
    port = closed_port()
    path = write_spec(project, {**GOOD, "tracking": {"uri": f"http://127.0.0.1:{port}"}})
    start = time.monotonic()
    result = CliRunner().invoke(main, ["apply", str(path)])
    line = one_line_error(result, path)
    assert time.monotonic() - start < 30
    assert "tracking.uri" in line and f"127.0.0.1:{port}" in line and "cannot reach" in line
    assert sorted(p.name for p in project.iterdir()) == ["specs"]  # no dvc.yaml, runs/, .dvc/, lock


def test_unreachable_server_from_environment_names_tracking_uri(project, monkeypatch):
    port = closed_port()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    path = write_spec(project, GOOD)
    line = one_line_error(CliRunner().invoke(main, ["apply", str(path)]), path)
    assert "tracking.uri" in line and "MLFLOW_TRACKING_URI" in line
    assert sorted(p.name for p in project.iterdir()) == ["specs"]


@pytest.mark.parametrize("command", ["validate", "compile", "apply"])
def test_non_image_file_with_image_extension(project, photos, command):
    refs = copy_images(photos / "dog", project / "refs", count=2)
    (refs / "notes.png").write_text("these are my notes, not a picture\n")
    path = write_spec(project, {**GOOD, "subjects": [{"name": "dog", "class": "dog", "images": "../refs"}]})
    line = one_line_error(CliRunner().invoke(main, [command, str(path)]), path)
    assert "subjects[0].images" in line and "notes.png: not a readable image" in line
    assert sorted(p.name for p in project.iterdir()) == ["refs", "specs"]


@pytest.mark.parametrize("command", ["validate", "compile", "apply"])
def test_image_folder_that_is_a_file(project, photos, command):
    (project / "photo.jpg").write_bytes((photos / "dog" / "00.jpg").read_bytes())
    path = write_spec(project, {**GOOD, "subjects": [{"name": "dog", "class": "dog", "images": "../photo.jpg"}]})
    line = one_line_error(CliRunner().invoke(main, [command, str(path)]), path)
    assert "subjects[0].images" in line and "is a file, not a folder" in line
    assert sorted(p.name for p in project.iterdir()) == ["photo.jpg", "specs"]


# -- weights are only ever loaded safely -------------------------------------------------------
def test_torch_load_always_has_weights_only_true():
    calls = []
    for path in sorted((REPO / "proxytune").rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            owner = getattr(func.value, "id", None) if isinstance(func, ast.Attribute) else None
            if name == "load" and owner in ("torch", "pickle", "cPickle", "dill", "joblib"):
                safe = owner == "torch" and any(
                    k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                    for k in node.keywords
                )
                calls.append((f"{path.relative_to(REPO)}:{node.lineno}", owner, safe))
    # The scan must see the checkpoint loader, or it is not scanning what it should.
    assert any(owner == "torch" for _, owner, _ in calls), calls
    unsafe = [where for where, _, safe in calls if not safe]
    assert not unsafe, f"weights loaded without weights_only=True: {unsafe}"
    text = "\n".join(p.read_text() for p in (REPO / "proxytune").rglob("*.py"))
    assert "torch.load(" in text and "pickle.load" not in text


# -- fault hooks and the project lock ----------------------------------------------------------
def _checkpoint_exit(env_value: str | None, *args) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PROXYTUNE_CRASH_AT"}
    env["PYTHONPATH"] = str(REPO)
    if env_value is not None:
        env["PROXYTUNE_CRASH_AT"] = env_value
    code = f"from proxytune import faults; faults.kill_point(*{args!r}); print('survived')"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)


def test_fault_hook_is_a_no_op_unless_it_names_the_point():
    for value in (None, "", "teacher:step:4", "student:step:3", "teacher:registered"):
        result = _checkpoint_exit(value, "teacher", "step", 3)
        assert result.returncode == 0 and "survived" in result.stdout, (value, result.stderr)
    for value, args in (("teacher:step:3", ("teacher", "step", 3)), ("x:y,evaluate:generated", ("evaluate", "generated")),
                        ("student:registered", ("student", "registered"))):
        result = _checkpoint_exit(value, *args)
        assert result.returncode == 137 and "survived" not in result.stdout, (value, result)
        assert "simulated crash at" in result.stderr


def test_project_lock_makes_a_second_holder_wait(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from pathlib import Path; from proxytune.project import project_lock\n"
         "with project_lock(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(3)\n", str(tmp_path)],
        env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        waited = threading.Event()
        start = time.monotonic()
        with project_lock(tmp_path, on_wait=waited.set):
            elapsed = time.monotonic() - start
        assert waited.is_set() and elapsed > 1.0
        assert holder.wait(timeout=30) == 0
        # Free again: no waiting, and a killed holder would not matter either (flock dies with it).
        waited.clear()
        with project_lock(tmp_path, on_wait=waited.set):
            pass
        assert not waited.is_set()
        assert (tmp_path / ".proxytune" / ".gitignore").read_text() == "*\n"
    finally:
        if holder.poll() is None:
            holder.kill()


def dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid  # exited and reaped: no process has this pid now (barring a quick reuse)


def test_a_full_disk_during_apply_is_one_line_and_exit_2(project, monkeypatch):
    import errno

    path = write_spec(project, GOOD)

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as a write or fsync on a full disk fails

    monkeypatch.setattr(os, "fsync", full)
    result = CliRunner().invoke(main, ["apply", str(path)])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    # The first file apply writes is the subject's params file: the line names it and asks for space.
    assert lines[0].startswith(f"error: {project / 'runs/t/dog/params.yaml'}: no space left on device (")
    assert "MiB free there); free some space and re-run the same command to resume" in lines[0]


def test_audit_closes_runs_of_dead_processes_and_flags_other_hosts(project):
    from proxytune.tracking import store
    from proxytune.tracking.runs import start_parent_run

    uri = store.resolve_uri(None, project)
    client = store.connect(uri)
    runs = {name: start_parent_run("t", uri, project, {}) for name in ("dead", "reused", "elsewhere", "alive")}
    assert client.get_run(runs["alive"]).data.tags["proxytune.pid"] == str(os.getpid())
    client.set_tag(runs["dead"], "proxytune.pid", str(dead_pid()))
    client.set_tag(runs["reused"], "proxytune.pid_start", "1")  # this pid, but a process that started earlier
    client.set_tag(runs["elsewhere"], "proxytune.host", "another-host.example")
    result = CliRunner().invoke(main, ["audit", "--uri", uri])
    assert result.exit_code == 1, result.output
    closed = [line for line in result.output.splitlines() if line.startswith("closed: ")]
    assert sorted(line.split()[2] for line in closed) == sorted([runs["dead"], runs["reused"]]), result.output
    problems = [line for line in result.output.splitlines() if line.startswith("problem: ")]
    assert len(problems) == 1 and runs["elsewhere"] in problems[0] and "another-host.example" in problems[0]
    status = {name: client.get_run(run_id).info.status for name, run_id in runs.items()}
    assert status == {"dead": "KILLED", "reused": "KILLED", "elsewhere": "RUNNING", "alive": "RUNNING"}


def test_dvc_lock_entries_of_dead_processes_are_released(tmp_path):
    from proxytune.project import release_dead_dvc_locks

    dead, alive = dead_pid(), os.getpid()
    path = tmp_path / ".dvc" / "tmp" / "rwlock"
    path.parent.mkdir(parents=True)
    info = {"pid": dead, "cmd": "dvc repro teacher@t.dog"}
    path.write_text(json.dumps({"write": {"/p/runs/t/dog/teacher": info, "/p/other": {"pid": alive, "cmd": "dvc repro"}},
                                "read": {"/p/runs/t/dog/params.yaml": [info, {"pid": alive, "cmd": "dvc repro"}]}}))
    assert release_dead_dvc_locks(tmp_path) == [dead]
    assert json.loads(path.read_text()) == {"write": {"/p/other": {"pid": alive, "cmd": "dvc repro"}},
                                            "read": {"/p/runs/t/dog/params.yaml": [{"pid": alive, "cmd": "dvc repro"}]}}
    assert release_dead_dvc_locks(tmp_path) == []
    path.write_text("not json")
    assert release_dead_dvc_locks(tmp_path) == [] and path.read_text() == "not json"  # not ours to repair


# -- lineage staleness without the project -----------------------------------------------------
def test_lineage_nodes_are_unknown_when_the_project_is_not_here(tmp_path):
    gone = tmp_path / "moved-away"
    chain = {
        "ref": "t.dog.student@1",
        "references": {"folder": str(gone / "refs"), "digest": "0" * 64, "files": {}},
        "teacher": {"version": "t.dog.teacher@1", "dvc_stage": "teacher@t.dog", "project_root": str(gone)},
        "proxy": {"digest": "1" * 64, "num_images": "4", "dvc_stage": "synthesis@t.dog", "project_root": str(gone)},
        "student": {"version": "t.dog.student@1", "dvc_stage": "student@t.dog", "project_root": str(gone)},
        "evaluations": [{"run_id": "a" * 32, "metrics": {"student.dino": 0.5}, "dvc_stage": "evaluate@t.dog"}],
    }
    provenance.mark_stale(chain, tmp_path)
    nodes = [chain[k] for k in ("references", "teacher", "proxy", "student")] + chain["evaluations"]
    assert [n["stale"] for n in nodes] == ["unknown"] * 5
    assert "project not found" in chain["teacher"]["stale_reasons"][0]
    drawing = provenance.to_mermaid(chain)
    assert drawing.startswith("flowchart LR")
    assert "references --> teacher" in drawing and "proxy --> student" in drawing and "student --> evaluation0" in drawing
    assert "class references,teacher,proxy,student,evaluation0 unknown" in drawing


# -- many subjects ---------------------------------------------------------------------------------
def test_dreambench9_compiles_to_36_stages_and_subject_selects_four(project, dreambench, monkeypatch):
    monkeypatch.setenv("PROXYTUNE_DREAMBENCH", str(dreambench))  # nine DreamBench subjects: DreamBench itself
    spec = project / "specs" / "dreambench9.yaml"
    spec.write_text((REPO / "specs" / "dreambench9.yaml").read_text())
    result = CliRunner().invoke(main, ["compile", str(spec)])
    assert result.exit_code == 0, result.output
    stages = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    subjects = ["backpack", "berry_bowl", "can", "cat", "dog", "duck_toy", "red_cartoon", "teapot", "vase"]
    for step in ("teacher", "synthesis", "codes", "student", "evaluate"):
        assert sorted(stages[step]["foreach"]) == [f"dreambench9.{s}" for s in subjects]
    classes = {s: yaml.safe_load((project / f"runs/dreambench9/{s}/params.yaml").read_text())["subject"]["class"]
               for s in subjects}
    assert classes == {"backpack": "backpack", "berry_bowl": "bowl", "can": "can", "cat": "cat", "dog": "dog",
                       "duck_toy": "toy", "red_cartoon": "cartoon", "teapot": "teapot", "vase": "vase"}

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    exe = Path(sys.executable).with_name("proxytune")
    run = [str(exe) if exe.exists() else "proxytune", "apply", "specs/dreambench9.yaml", "--subject", "cat", "--dry-run"]
    result = subprocess.run(run, cwd=project, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    line = next(l for l in result.stdout.splitlines() if l.startswith("stages to run: "))
    assert sorted(line.removeprefix("stages to run: ").split(", ")) == sorted(
        f"{step}@dreambench9.cat" for step in ("teacher", "synthesis", "codes", "student", "evaluate"))
    assert not (project / "runs" / "dreambench9" / "cat" / "teacher").exists()  # dry run: nothing ran
    listed = subprocess.run(["dvc", "stage", "list", "--name-only"], cwd=project, env=env, capture_output=True,
                            text=True, timeout=120)
    assert len(listed.stdout.split()) == 45, listed.stdout + listed.stderr


def test_a_killed_but_unreaped_process_counts_as_dead():
    """A stage killed with its apply stays a zombie when nobody reaps it; its locks and runs are ghosts."""
    import os
    import signal
    import subprocess
    import time

    from proxytune.files import process_alive

    child = subprocess.Popen(["sleep", "60"])
    try:
        assert process_alive(child.pid)
        os.kill(child.pid, signal.SIGKILL)
        time.sleep(0.3)  # not waited for: a zombie, which signal 0 still reaches
        os.kill(child.pid, 0)
        assert not process_alive(child.pid)
    finally:
        child.wait()
    assert process_alive(os.getpid())
