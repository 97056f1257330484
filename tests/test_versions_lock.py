"""The lock of the tested set (constraints.txt), the README/CI install through it, the versions every
stage run records, and `proxytune doctor` / `--version` with known-bad combinations simulated."""

import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import REPO, make_params, tiny_spec
from proxytune import lockfile, versions
from proxytune.cli import main
from proxytune.errors import ProxytuneError

KEY = ("torch", "diffusers", "transformers", "peft", "accelerate")


def pyproject_requirements() -> list[str]:
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]


def readme_block(title: str) -> str:
    """The first ```bash block under the README's `## title`."""
    text = (REPO / "README.md").read_text()
    section = text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```bash\n(.*?)```", section, re.S).group(1).strip()


# -- the lock -----------------------------------------------------------------------------------
def test_lock_pins_every_dependency_within_pyproject_ranges():
    from packaging.requirements import Requirement

    pins = lockfile.read(REPO / lockfile.LOCK_FILE)
    for line in pyproject_requirements():
        req = Requirement(line)
        name = lockfile.normalize(req.name)
        assert name in pins, f"{name} is a dependency in pyproject.toml but not pinned in constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), f"lock {name}=={pins[name]} is outside {line!r}"
    assert pins["torch"] == lockfile.TORCH.split("==")[1]
    assert "pip" not in pins and "proxytune" not in pins
    # the known break is not in the tested set
    assert not versions.known_breaks(versions.Installed(dict(pins)))


def test_lock_parse_errors_name_file_and_line_and_digest_is_of_the_set():
    assert lockfile.parse("# tested\nTorch==2.13.0\n\nflask_cors==6.0.1  # comment\n") == {"torch": "2.13.0", "flask-cors": "6.0.1"}
    with pytest.raises(ProxytuneError, match=r"^constraints.txt:2: expected NAME==VERSION, got 'peft>=0.17'$"):
        lockfile.parse("torch==2.13.0\npeft>=0.17\n")
    with pytest.raises(ProxytuneError, match=r"^x.txt:2: flask-cors is pinned twice$"):
        lockfile.parse("Flask-CORS==6.0.1\nflask_cors==6.0.2\n", "x.txt")
    a = lockfile.digest(lockfile.parse("# one header\nb==2\na==1\n"))
    assert a == lockfile.digest(lockfile.parse("a==1\n# another header\nb==2\n"))  # comments, order: same set
    assert a != lockfile.digest(lockfile.parse("a==1\nb==3\n"))
    pins = {"a": "1", "b": "2"}
    assert lockfile.parse(lockfile.render(pins, "python -m pytest -q")) == pins
    assert lockfile.moves({"a": "1", "b": "2", "gone": "1"}, {"a": "1", "b": "3", "new": "0.1"}) == [
        "b 2 -> 3", "gone 1 removed", "new 0.1 added"]
    with pytest.raises(ProxytuneError, match="the lock is missing"):
        lockfile.read(Path("/nonexistent/constraints.txt"))


def test_freeze_lists_this_environment_in_lock_format():
    out = subprocess.run([sys.executable, "-m", "proxytune.lockfile", "freeze"], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    pins = lockfile.parse(out, "freeze")
    assert pins["torch"] == metadata.version("torch").split("+")[0]  # the public version: '+cpu' dropped
    assert "pip" not in pins and "proxytune" not in pins


def test_refresh_writes_the_lock_only_after_the_tests_pass(tmp_path, monkeypatch):
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'proxytune'\n")
    lock = tmp_path / lockfile.LOCK_FILE
    lock.write_text("torch==2.13.0\ntransformers==5.23.0\n")
    commands = []

    def fake_run(command, cwd, env=None):
        commands.append(command[1:])
        if command[1:3] == ["-m", "pytest"]:
            assert "transformers==5.24.0" in lock.read_text()  # the tests see the new lock
            if fail:
                raise ProxytuneError("`python -m pytest -q` exited 1; constraints.txt is unchanged")

    class Done:
        returncode, stdout, stderr = 0, "torch==2.13.0\ntransformers==5.24.0\npytest==9.0.0\n", ""

    monkeypatch.setattr(lockfile, "_run", fake_run)
    monkeypatch.setattr(lockfile.subprocess, "run", lambda *a, **k: Done())
    fail = True
    with pytest.raises(ProxytuneError, match="exited 1; constraints.txt is unchanged"):
        lockfile.refresh(tmp_path, ["-q"])
    assert lock.read_text() == "torch==2.13.0\ntransformers==5.23.0\n"  # put back
    # the install is the README's, without the lock: torch alone first, then the project, then the tests
    assert [c[:3] for c in commands] == [["-m", "venv", commands[0][2]], ["-m", "pip", "install"],
                                         ["-m", "pip", "install"], ["-m", "pytest", "-q"]]
    assert commands[1][3:] == [lockfile.TORCH] and commands[2][3:] == ["-e", ".[dev]"]

    fail = False
    assert lockfile.refresh(tmp_path, ["-q"]) == ["pytest 9.0.0 added", "transformers 5.23.0 -> 5.24.0"]
    assert lockfile.read(lock) == {"torch": "2.13.0", "transformers": "5.24.0", "pytest": "9.0.0"}
    assert "`python -m pytest -q`, which passed" in lock.read_text()


# -- README and CI install the same way -----------------------------------------------------------
def test_readme_setup_installs_from_the_lock_and_ci_runs_exactly_it_in_a_new_venv():
    setup, tests = readme_block("Setup"), readme_block("Tests")
    command = [line for line in setup.splitlines() if line.startswith("pip install")]
    assert command == [f"pip install {lockfile.TORCH} -c {lockfile.LOCK_FILE} && pip install -e \".[dev]\" -c {lockfile.LOCK_FILE}"]
    ci = (REPO / ".ci" / "run").read_text()
    lines = [line.strip() for line in ci.splitlines()]
    assert command[0] in lines and tests in lines
    venv = next(i for i, line in enumerate(lines) if " -m venv " in line)  # a new, empty one each run
    activate = next(i for i, line in enumerate(lines) if re.match(r"^(\.|source) .*/bin/activate", line))
    assert "mktemp -d" in ci and venv < activate < lines.index(command[0]) < lines.index(tests)
    assert "lockfile refresh" in (REPO / "README.md").read_text()


# -- doctor and --version -------------------------------------------------------------------------
GOOD = {"proxytune": "0.1.0", "torch": "2.13.0+cpu", "diffusers": "0.42.1", "transformers": "5.23.0",
        "peft": "0.21.2", "accelerate": "1.15.0", "packaging": "26.2"}
REQUIRES = {"proxytune": ["torch>=2.5", "diffusers>=0.40", "transformers<5.24,>=5.4", "peft>=0.20", "accelerate>=1.10",
                          "pytest>=8; extra == \"dev\""],
            "diffusers": ["packaging"], "transformers": ["packaging>=20.0"]}


@pytest.fixture
def simulated(tmp_path, monkeypatch):
    """Point --version/doctor at a simulated environment and a lock of GOOD."""
    lock = tmp_path / lockfile.LOCK_FILE
    lock.write_text(lockfile.render({k: v.split("+")[0] for k, v in GOOD.items() if k != "proxytune"}, "pytest"))
    monkeypatch.setattr(lockfile, "lock_path", lambda: lock)

    def use(**changes):
        installed = {**GOOD, **changes}
        monkeypatch.setattr(versions.Installed, "current",
                            classmethod(lambda cls: cls({k: v for k, v in installed.items() if v}, REQUIRES)))
    use()
    return use


def test_doctor_passes_on_the_tested_set_and_prints_the_versions(simulated):
    result = CliRunner().invoke(main, ["doctor", "--strict"])
    assert result.exit_code == 0, result.output
    for name in KEY:
        assert re.search(rf"^{name} +{re.escape(GOOD[name])}$", result.output, re.M)
    assert "the installed set matches it" in result.output and "doctor: ok" in result.output


def test_doctor_fails_on_transformers_524_with_peft_021(simulated):
    simulated(transformers="5.24.0")
    result = CliRunner().invoke(main, ["doctor"])
    assert result.exit_code == 1
    assert "incompatible: transformers 5.24.0 with peft 0.21.2: transformers 5.24 requires peft>=0.22" in result.output
    assert "incompatible: transformers 5.24.0 does not satisfy proxytune's requirement transformers<5.24,>=5.4" in result.output
    assert "transformers 5.24.0 (lock 5.23.0)" in result.output
    assert 'pip install -e ".[dev]" -c constraints.txt' in result.output
    # --version says the same and still exits 0 (it is for reporting)
    shown = CliRunner().invoke(main, ["--version"])
    assert shown.exit_code == 0 and "incompatible: transformers 5.24.0 with peft 0.21.2" in shown.output
    # with a peft that transformers 5.24 accepts, only proxytune's own bound remains
    simulated(transformers="5.24.0", peft="0.22.0")
    assert "with peft" not in CliRunner().invoke(main, ["doctor"]).output


def test_simulated_requirements_are_pyprojects_floors():
    """The simulated Requires-Dist above follows pyproject.toml's key floors (a raised floor is raised there too)."""
    from packaging.requirements import Requirement

    declared = {Requirement(r).name: Requirement(r).specifier for r in pyproject_requirements()}
    for line in REQUIRES["proxytune"][:-1]:
        req = Requirement(line)
        assert req.specifier == declared[req.name], (line, str(declared[req.name]))


def test_doctor_flags_a_diffusers_that_ignores_dtype(simulated):
    """diffusers 0.39 reads only torch_dtype: a teacher loaded with dtype= would run in float32 silently."""
    simulated(diffusers="0.39.0")
    result = CliRunner().invoke(main, ["doctor"])
    assert result.exit_code == 1
    assert "incompatible: diffusers 0.39.0 does not satisfy proxytune's requirement diffusers>=0.40" in result.output


def test_doctor_strict_fails_when_the_installed_set_leaves_the_lock(simulated):
    simulated(accelerate="1.16.0")  # allowed by pyproject, not the tested version
    assert CliRunner().invoke(main, ["doctor"]).exit_code == 0
    result = CliRunner().invoke(main, ["doctor", "--strict"])
    assert result.exit_code == 1
    assert "accelerate 1.16.0 (lock 1.15.0)" in result.output and "doctor --strict: the installed set is not the lock" in result.output


def test_lock_differences_follow_the_dependency_closure():
    env = versions.Installed(
        {"proxytune": "0.1.0", "a": "1", "b": "2", "c": "3", "unrelated": "9", "winonly": "1", "pytest": "8.1"},
        {"proxytune": ["a>=1", "pytest; extra == 'dev'", "winonly; sys_platform == 'nonexistent'"],
         "a": ["b[fast]"], "b": ["c; extra == 'fast'"]},
    )
    assert versions.dependency_closure(env) == {"a", "b", "c", "pytest"}
    assert versions.lock_differences(env, {"a": "1", "b": "2.1", "pytest": "8.1"}) == ["b 2 (lock 2.1)", "c 3 is not in the lock"]
    assert versions.unmet_requirements(versions.Installed({"proxytune": "0.1.0"}, {"proxytune": ["a>=1"]})) == [
        "a is not installed (proxytune requires a>=1)"]


def test_versions_module_imports_no_heavy_library():
    code = ("import sys; from proxytune import versions; versions.report(); "
            "print(sorted(m for m in ('torch', 'mlflow', 'diffusers', 'transformers', 'peft') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"


# -- versions in every stage run ----------------------------------------------------------------
def test_stage_and_apply_runs_record_versions_and_lock_digest(project):
    import mlflow

    from proxytune.stages import runtime
    from proxytune.tracking import runs, store

    params = make_params(project, tiny_spec())
    with runtime.stage_run(params, "teacher") as run:
        pass
    uri = store.resolve_uri(None, project)
    parent = runs.start_parent_run("t", uri, project, {})
    client = mlflow.MlflowClient(tracking_uri=uri)
    for run_id in (run.run_id, parent):
        tags = client.get_run(run_id).data.tags
        for name in KEY:
            assert tags[f"proxytune.version.{name}"] == metadata.version(name)
        assert tags["proxytune.version.proxytune"] == metadata.version("proxytune")
        pins = lockfile.read(REPO / lockfile.LOCK_FILE)
        assert tags["proxytune.lock_digest"] == lockfile.digest(pins)
        assert tags["proxytune.lock_status"] == versions.report().lock_status()
