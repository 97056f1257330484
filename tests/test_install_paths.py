"""Install paths (issue 12): proxytune works from a virtualenv that is not activated (DVC and the stages'
`proxytune` are not on PATH) and from a source archive without .git (the committed .dvc/ lacks no_scm)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from click.testing import CliRunner

from conftest import REPO, tiny_spec
from proxytune import project as project_module
from proxytune.cli import main

BARE_PATH = "/usr/bin:/bin"  # what a shell has when the virtualenv holding dvc and proxytune is not activated


def test_bare_path_lacks_dvc_and_proxytune():
    """The tests below mean something only if this PATH finds neither executable."""
    assert shutil.which("dvc", path=BARE_PATH) is None
    assert shutil.which("proxytune", path=BARE_PATH) is None


def test_apply_runs_dvc_without_it_on_path(project):
    (project / "specs" / "t.yaml").write_text(yaml.safe_dump(tiny_spec()))
    env = {**os.environ, "PATH": BARE_PATH, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "proxytune.cli", "apply", "specs/t.yaml", "--dry-run"],
                            cwd=project, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "stages to run: " in result.stdout and "dry run: nothing was run" in result.stdout
    assert (project / ".dvc").is_dir()


def test_stages_find_proxytune_without_it_on_path(tmp_path, monkeypatch):
    """DVC runs each stage's `proxytune stage ...` through a shell: the interpreter's own bin folder must be
    on the PATH it gets, whatever the caller's PATH is."""
    monkeypatch.setenv("PATH", BARE_PATH)
    stage = {"cmd": "proxytune --help > out.txt", "outs": [{"out.txt": {"cache": False}}]}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"probe": stage}}))
    project_module.ensure_dvc(tmp_path)
    assert project_module.repro(tmp_path, ["probe"], {}) == 0
    assert "Usage: " in (tmp_path / "out.txt").read_text()
    assert project_module.dvc_env()["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)


def copy_source_archive(target: Path) -> Path:
    """What a release tarball holds of the project's DVC setup: the committed .dvc/ and .dvcignore, no .git."""
    (target / ".dvc").mkdir(parents=True)
    for name in (".dvc/config", ".dvc/.gitignore", ".dvcignore"):
        shutil.copy(REPO / name, target / name)
    return target


def test_apply_works_in_a_source_archive_without_git(project):
    assert subprocess.run(["git", "rev-parse", "--is-inside-work-tree"], cwd=project, capture_output=True).returncode != 0
    copy_source_archive(project)
    committed = (project / ".dvc" / "config").read_text()
    assert "no_scm" not in committed  # the case: a .dvc/ made inside git, used outside it
    (project / "specs" / "t.yaml").write_text(yaml.safe_dump(tiny_spec()))
    result = CliRunner().invoke(main, ["apply", "specs/t.yaml", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "stages to run: " in result.output and "not a git repository" not in result.output
    assert (project / ".dvc" / "config").read_text() == committed  # the archive's own files stay as shipped
    assert "no_scm" in (project / ".dvc" / "config.local").read_text()  # per checkout, git-ignored
    again = CliRunner().invoke(main, ["apply", "specs/t.yaml", "--dry-run"])
    assert again.exit_code == 0, again.output
