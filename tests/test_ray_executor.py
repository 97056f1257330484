"""`proxytune apply --executor ray` on a real Ray cluster on loopback (2 CPUs, token authentication).

Built once for the module (each stage of a tiny spec cut to a few steps, as in test_team_scale):
  * `serial`: the two-subject spec (dog, cat) applied with the local executor while `import ray`
    fails (the local path needs no Ray), with one CPU thread as each Ray task has. Its outputs are
    the reference.
  * `on_ray`: the same spec plus a second spec whose one subject fails at synthesis (a quality filter
    no proxy passes), applied together with --executor ray. Every teacher is killed with its Ray
    worker right after its step-2 checkpoint (PROXYTUNE_CRASH_AT with PROXYTUNE_CRASH_GROUP: the
    stage kills its process group, which is the worker's), so Ray retries it and it resumes.
"""

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from proxytune.files import sha256_file
from test_team_scale import command, free_port, mini_spec, new_project

if os.environ.get("CI"):
    import ray  # noqa: F401  (CI installs .[dev], which has ray: a missing one is a failure there)
else:
    pytest.importorskip("ray")

TWO = [{"name": "dog", "class": "dog", "images": "dreambench:dog"},
       {"name": "cat", "class": "cat", "images": "dreambench:cat"}]
RECORDS = ("record.json",)  # MLflow run ids and registered versions: this run's records, not its results


def two_subjects() -> dict:
    spec = mini_spec("t")
    spec["subjects"] = [dict(s) for s in TWO]
    return spec


def failing_spec() -> dict:
    """One subject whose synthesis drops every proxy (no image is that similar): the stage exits 2."""
    spec = mini_spec("bad")
    spec["synthesis"]["filter"] = {"enabled": True, "min_similarity": 1.0}
    spec["subjects"] = [{"name": "x", "class": "dog", "images": "dreambench:dog"}]
    return spec


def run_cli(project: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(command(*args), cwd=project, env=env, capture_output=True, text=True, timeout=1500,
                          start_new_session=True)


def base_env(photos: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "PROXYTUNE_CRASH_AT", "PROXYTUNE_CRASH_GROUP", "RAY_ADDRESS")}
    env.update({"PROXYTUNE_DREAMBENCH": str(photos), "PYTHONPATH": str(REPO), **extra})  # test this tree
    return env


def output_files(project: Path, experiment: str) -> dict[str, Path]:
    """Every file of an experiment's stage outputs (not scratch folders such as .work), by relative path."""
    base = project / "runs" / experiment
    return {p.relative_to(base).as_posix(): p for p in sorted(base.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(base).parts)}


def attempts(log: Path) -> list[dict]:
    """Each try of a stage in its Ray log: start and end (epoch seconds), exit status, text."""
    text = log.read_text(errors="replace")
    found = []
    for chunk in text.split("\n== attempt ")[1:]:
        start = float(re.search(r", at ([0-9.]+) ==", chunk).group(1))
        end = re.search(r"== exit (-?\d+) after [0-9.]+ s, at ([0-9.]+) ==", chunk)
        found.append({"start": start, "end": float(end.group(2)) if end else None,
                      "rc": int(end.group(1)) if end else None, "text": chunk})
    return found


# -- fixtures --------------------------------------------------------------------------------
def start_head(temp: Path, port: int, env: dict) -> subprocess.Popen:
    """`ray start --head` on 127.0.0.1 in a session of its own; returns once it runs, or raises."""
    ray_bin = Path(sys.executable).with_name("ray")
    log = temp / "head.log"
    with open(log, "w") as out:
        head = subprocess.Popen(
            [str(ray_bin) if ray_bin.exists() else "ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1",
             f"--port={port}", "--num-cpus=2", "--num-gpus=0", "--include-dashboard=false", "--disable-usage-stats",
             "--object-store-memory=80000000", f"--temp-dir={temp}"],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.monotonic() + 900
    while "Ray runtime started" not in log.read_text():
        if head.poll() is not None or time.monotonic() > deadline:
            stop_head(head)
            raise RuntimeError(f"ray start failed:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
    return head


def stop_head(head: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):  # the head and every Ray process it started (its group);
        try:                                      # the workers exit when their raylet is gone
            os.killpg(head.pid, sig)
            head.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass


@pytest.fixture(scope="module")
def cluster():
    """A Ray head on 127.0.0.1 with 2 CPUs, its own session folder and token; stopped (its process group
    killed) afterwards. Yields (address, the environment a driver needs)."""
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    # Generous start-up limits: on 2 cores shared with other work, Ray's own processes can take minutes
    # to start, and its default limits (about a minute) then abort the head or drop its workers.
    patience = {"RAY_raylet_start_wait_time_s": "600", "RAY_agent_register_timeout_ms": "600000",
                "RAY_worker_register_timeout_seconds": "600", "RAY_DASHBOARD_STARTUP_TIMEOUT_S": "600"}
    env = {**os.environ, **auth, **patience, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    head, temps = None, []
    try:
        # The raylet still gives its dashboard agent a fixed ~30 s to write its port file and aborts
        # otherwise (ray-project/ray#65983): on a starved machine the head may need another try.
        for attempt in range(3):
            temps.append(Path(tempfile.mkdtemp(prefix="ray", dir="/tmp")))  # short: socket paths <= 107 bytes
            port = free_port()
            try:
                head = start_head(temps[-1], port, env)
                break
            except RuntimeError:
                if attempt == 2:
                    raise
        yield f"127.0.0.1:{port}", auth
    finally:
        if head is not None:
            stop_head(head)
        for temp in temps:
            shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def serial(tmp_path_factory, photos):
    """The spec applied by the local executor (`dvc repro`) with `import ray` failing."""
    project = new_project(tmp_path_factory.mktemp("serial"), {"t": two_subjects()})
    blocker = project / "no-ray"
    (blocker / "ray").mkdir(parents=True)
    (blocker / "ray" / "__init__.py").write_text("raise ImportError('ray is blocked in this test')\n")
    start = time.monotonic()
    # One thread, as each Ray task below (cpus: 1): on CPU the thread count changes float rounding.
    env = base_env(photos, PYTHONPATH=f"{blocker}{os.pathsep}{REPO}", OMP_NUM_THREADS="1")
    result = run_cli(project, env, "apply", "specs/t.yaml")
    print(f"[time] serial apply: {time.monotonic() - start:.0f} s")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return project


@pytest.fixture(scope="module")
def on_ray(tmp_path_factory, photos, cluster):
    address, auth = cluster
    project = new_project(tmp_path_factory.mktemp("ray"), {"t": two_subjects(), "bad": failing_spec()})
    env = base_env(photos, PROXYTUNE_CRASH_AT="teacher:step:2", PROXYTUNE_CRASH_GROUP="1", **auth)
    start = time.monotonic()
    result = run_cli(project, env, "apply", "specs/t.yaml", "specs/bad.yaml", "--executor", "ray", "--address", address)
    print(f"[time] ray apply: {time.monotonic() - start:.0f} s")
    return project, result, base_env(photos, **auth), address


# -- tests ---------------------------------------------------------------------------------
def test_two_subjects_run_at_once_with_the_serial_runs_bytes(on_ray, serial):
    project, result, _, _ = on_ray
    assert "ray: 15 stages on 1 node (2 CPUs, 0 GPUs)" in result.stdout, result.stdout[-3000:] + result.stderr[-3000:]
    for subject in ("dog", "cat"):
        assert f"done    evaluate@t.{subject}" in result.stdout
    ours, theirs = output_files(project, "t"), output_files(serial, "t")
    assert sorted(ours) == sorted(theirs)
    compared = [rel for rel in ours if Path(rel).name not in RECORDS]
    for rel in compared:
        assert sha256_file(ours[rel]) == sha256_file(theirs[rel]), rel  # the manifest and the weights included
    assert {"dog/proxy/manifest.json", "cat/codes/codes.safetensors", "dog/student/adapter/adapter_model.safetensors",
            "cat/teacher/adapter/pytorch_lora_weights.safetensors", "dog/eval/metrics.json"} <= set(compared)
    # the two subjects' teachers ran at the same time (the last try of each, on the 2 CPUs)
    dog, cat = (attempts(project / f".proxytune/logs/teacher@t.{s}.log")[-1] for s in ("dog", "cat"))
    assert dog["start"] < cat["end"] and cat["start"] < dog["end"]


def test_dvc_is_clean_after_and_a_plain_apply_runs_nothing(on_ray):
    project, _, env, _ = on_ray
    status = subprocess.run([sys.executable, "-m", "dvc", "status", "--json", "evaluate@t.dog", "evaluate@t.cat"],
                            cwd=project, env=env, capture_output=True, text=True, check=True)
    assert json.loads(status.stdout) == {}
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    assert {f"{step}@t.{s}" for step in ("teacher", "synthesis", "codes", "student", "evaluate")
            for s in ("dog", "cat")} <= set(lock)
    again = run_cli(project, env, "apply", "specs/t.yaml")
    assert again.returncode == 0 and "up to date: no stage to run" in again.stdout, again.stdout + again.stderr
    assert "Running stage" not in again.stdout


def test_a_failed_subject_is_named_and_the_others_finish(on_ray):
    project, result, _, _ = on_ray
    assert result.returncode == 2
    assert "failed: bad.x: synthesis@bad.x: exit 2:" in result.stdout and "every proxy image was dropped" in result.stdout
    assert "summary: 2 of 3 subjects done" in result.stdout
    for step in ("codes", "student", "evaluate"):
        assert f"skipped {step}@bad.x: synthesis@bad.x failed" in result.stdout
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: 1 of 3 subjects failed (bad.x)"), result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    assert "teacher@bad.x" in lock and "synthesis@bad.x" not in lock  # what finished is kept


def test_a_killed_worker_is_retried_and_its_stage_resumes(on_ray):
    project, result, _, _ = on_ray
    assert "retried after a lost worker: teacher@bad.x, teacher@t.cat, teacher@t.dog" in result.stdout
    for subject in ("t.dog", "t.cat", "bad.x"):
        tries = attempts(project / f".proxytune/logs/teacher@{subject}.log")
        assert len(tries) == 2, [t["text"][-500:] for t in tries]
        assert "simulated crash at teacher:step:2" in tries[0]["text"] and tries[0]["end"] is None  # died with its worker
        assert "teacher: resuming from step 2" in tries[1]["text"] and tries[1]["rc"] == 0
    # the student was not killed: one try
    assert len(attempts(project / ".proxytune/logs/student@t.dog.log")) == 1


# -- without a cluster ---------------------------------------------------------------------
def test_without_ray_the_ray_executor_is_a_one_line_error(project, monkeypatch):
    from click.testing import CliRunner

    from proxytune.cli import main

    (project / "specs" / "t.yaml").write_text(yaml.safe_dump(two_subjects()))
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    result = CliRunner().invoke(main, ["apply", "specs/t.yaml", "--executor", "ray"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        f"error: --executor ray: Ray is not installed for {sys.executable}; install it with pip install \"proxytune[ray]\""]
    assert not (project / "dvc.yaml").exists()  # nothing written
    result = CliRunner().invoke(main, ["apply", "specs/t.yaml", "--address", "127.0.0.1:1"])
    assert result.exit_code == 2 and "--address: only with --executor ray" in result.output


@pytest.mark.parametrize("resources, message", [
    ({"teacher": {"gpus": -1}}, "resources.teacher.gpus: Input should be greater than or equal to 0"),
    ({"student": {"gpus": 1.5}}, "resources.student.gpus: 1.5 is above 1 and not a whole number"),
    ({"teacher": {"gpu": 1}}, "resources.teacher.gpu: unknown key"),
    ({"evaluation": {"cpus": 1}}, "resources.evaluation: unknown key"),
])
def test_bad_resources_name_the_key(resources, message):
    from proxytune.errors import SpecError
    from proxytune.spec import parse_spec

    spec = two_subjects()
    spec["resources"] = resources
    with pytest.raises(SpecError, match=re.escape(f"specs/t.yaml: {message}")):
        parse_spec(spec, "specs/t.yaml")


def test_a_stage_larger_than_every_node_is_refused_naming_the_key():
    from proxytune.errors import ProxytuneError
    from proxytune.executors import Stage, check_fits

    stage = Stage(name="teacher@t.dog", commands=("true",), outs=(), upstream=(), kind="teacher",
                  spec_file="specs/t.yaml", cpus=4, gpus=None, stale=True)
    check_fits([stage], [{"CPU": 2.0}, {"CPU": 8.0}])  # one node is large enough
    with pytest.raises(ProxytuneError, match=r"^specs/t.yaml: resources.teacher: teacher@t.dog asks 4 CPUs and 0 GPUs"):
        check_fits([stage], [{"CPU": 2.0}, {"CPU": 2.0}])
    gpu_stage = Stage(**{**stage.__dict__, "cpus": 1})
    with pytest.raises(ProxytuneError, match="asks 1 CPUs and 1 GPUs"):  # unset gpus: 1 on a cluster with GPUs
        check_fits([gpu_stage], [{"CPU": 64.0}, {"CPU": 8.0, "GPU": 0.5}])


def test_a_styles_stages_ask_for_the_resources_of_the_subject_stages_doing_the_same_work(project):
    """The plan of a spec with a subject and a style (DVC's graph, no cluster): the style's teacher asks
    resources.teacher, curation resources.synthesis, the style student resources.student and the style
    evaluation resources.evaluate, as the subject's stages do; every stage names its spec file."""
    from proxytune import executors
    from proxytune.project import ensure_dvc, resolve_spec, write_compiled

    shutil.copytree(REPO / "specs" / "styles" / "stained-glass", project / "specs" / "glass")
    spec = two_subjects()
    spec["subjects"] = spec["subjects"][:1]
    spec["styles"] = [{"name": "glass", "images": "glass", "prompts": ["a cat"], "raw": {"toyworld": 2}}]
    spec["student"]["model"] = "tiny-lumina-mgpt"
    spec["resources"] = {"teacher": {"cpus": 2}, "synthesis": {"cpus": 0.5, "gpus": 0.25}, "codes": {"cpus": 3},
                         "student": {"cpus": 4, "gpus": 1}, "evaluate": {"cpus": 0.75, "gpus": 0.5}}
    (project / "specs" / "t.yaml").write_text(yaml.safe_dump(spec))
    resolved = resolve_spec(project / "specs" / "t.yaml", project)
    write_compiled([resolved], project)
    ensure_dvc(project)
    names = [f"{step}@t.{item}" for item, steps in (("dog", ("teacher", "synthesis", "codes", "student", "evaluate")),
                                                     ("glass", ("teacher", "curation", "style_student", "style_evaluate")))
             for step in steps]
    planned = {stage.name: stage for stage in executors.plan(
        project, ["evaluate@t.dog", "style_evaluate@t.glass"], names, {"t": ("specs/t.yaml", resolved.spec.resources)})}
    assert set(planned) == set(names)
    asked = {name: (stage.kind, stage.cpus, stage.gpus, stage.spec_file) for name, stage in planned.items()}
    for subject_step, style_step in (("teacher", "teacher"), ("synthesis", "curation"), ("student", "style_student"),
                                     ("evaluate", "style_evaluate")):
        assert asked[f"{style_step}@t.glass"] == asked[f"{subject_step}@t.dog"], (style_step, asked)
    assert asked["style_student@t.glass"] == ("student", 4, 1, "specs/t.yaml")
    assert asked["curation@t.glass"] == ("synthesis", 0.5, 0.25, "specs/t.yaml")
    assert set(planned["style_evaluate@t.glass"].upstream) == {"teacher@t.glass", "style_student@t.glass"}
    # and a style stage too large for the cluster is refused naming the key it reads
    from proxytune.errors import ProxytuneError

    with pytest.raises(ProxytuneError, match=r"^specs/t.yaml: resources.student: style_student@t.glass asks 4 CPUs"):
        executors.check_fits([planned["style_student@t.glass"]], [{"CPU": 2.0, "GPU": 1.0}])
