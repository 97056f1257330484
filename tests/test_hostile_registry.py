"""The registry and tracking corpus (issue 30): a registered project met by a hostile world.

Corrupt, locked and read-only stores, a dead server, aliases that read as versions, pulls aimed at
the store, deleted versions, a full disk, a moved or copied project. Refused: the exit code (2, or 1
for an `audit` that found a problem), one line naming the file, alias, folder or server, no
traceback, and the store and folders unchanged. Must-accept cases run to the end.

The project is made once per module the way `apply` makes its registry (parent run, teacher,
synthesis, student and evaluation runs through `tracking.runs`, two registered adapters) but without
training anything; each case works on a copy of it.
"""

import errno
import hashlib
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import REPO
from proxytune.cli import main
from proxytune.tracking import guard

TEACHER, STUDENT = "t.dog.teacher@1", "t.dog.student@1"


def adapter(root: Path, role: str) -> Path:
    folder = root / "runs" / "t" / "dog" / role / "adapter"
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(role.encode() * 64)
    (folder / "adapter_config.json").write_text(json.dumps({"r": 4}))
    return folder


@pytest.fixture(scope="module")
def registered(tmp_path_factory) -> Path:
    """A project whose embedded registry holds t.dog.teacher@1 and t.dog.student@1 with their lineage."""
    from proxytune.files import sha256_file
    from proxytune.tracking import runs, store

    root = tmp_path_factory.mktemp("registered") / "proj"
    root.mkdir()
    saved = {k: os.environ.pop(k, None) for k in ("MLFLOW_TRACKING_URI", runs.PARENT_RUNS_ENV)}
    uri = store.resolve_uri(None, root)
    patch = pytest.MonkeyPatch()
    patch.setattr(runs, "version_tags", dict)  # package versions on every run: slow, and no case reads them
    parent = runs.start_parent_run("t", uri, root, {})
    os.environ[runs.PARENT_RUNS_ENV] = json.dumps({"t": parent})
    try:
        with runs.StageRun("t", "dog", "teacher", uri, root, {"spec_digest": "s"}) as run:
            run.set_tags({"references_digest": "r" * 64})
            run.log_dict({"00.jpg": "0" * 64}, "references.json")
            folder = adapter(root, "teacher")
            run.register(folder, "teacher", {"adapter_digest": sha256_file(folder / "adapter_model.safetensors")})
        with runs.StageRun("t", "dog", "synthesis", uri, root, {"spec_digest": "s"}) as synthesis:
            pass
        with runs.StageRun("t", "dog", "student", uri, root, {"spec_digest": "s"}) as run:
            run.set_tags({"teacher_version": TEACHER, "synthesis_run_id": synthesis.run_id, "proxy_digest": "p" * 64})
            folder = adapter(root, "student")
            run.register(folder, "student", {"adapter_digest": sha256_file(folder / "adapter_model.safetensors"),
                                             "teacher_version": TEACHER})
        with runs.StageRun("t", "dog", "evaluate", uri, root, {"student_version": STUDENT, "teacher_version": TEACHER}) as run:
            run.log_metrics({"student.dino": 0.5})
        runs.end_parent_run(parent, uri, "FINISHED")
    finally:
        patch.undo()
        for key, value in saved.items():
            os.environ.pop(key, None)
            if value is not None:
                os.environ[key] = value
    return root


@pytest.fixture
def proj(registered, tmp_path, monkeypatch) -> Path:
    """A copy of the registered project; the current folder is inside it."""
    copy = tmp_path / "proj"
    shutil.copytree(registered, copy, symlinks=True)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("PROXYTUNE_REGISTRY_WAIT", "1")
    for key in guard.HTTP_DEFAULTS:  # a server case sets them for the process: restore them afterwards
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    monkeypatch.chdir(copy)
    return copy


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()[:16]
            for p in sorted(folder.rglob("*")) if p.is_file()}


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def one_line(result, code: int, *words: str, capfd=None) -> str:
    """The exit code, exactly one line on stderr holding `words`, and no traceback anywhere."""
    assert result.exit_code == code, (result.output, result.exception)
    assert "Traceback" not in result.output
    if capfd is not None:
        assert "Traceback" not in capfd.readouterr().err
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def db(project: Path) -> Path:
    return project / "registry" / "mlflow.db"


def read_only_uri(project: Path) -> str:
    """The registry made read-only: its files lose write permission, and SQLite opens the database
    read-only (as root, permissions alone would not stop a write)."""
    for path in [project / "registry", *(project / "registry").rglob("*")]:
        path.chmod(path.stat().st_mode & ~0o222)
    return f"sqlite:///file:{db(project)}?mode=ro&uri=true"


@pytest.fixture(autouse=True)
def writable_again(tmp_path):
    yield
    for path in [tmp_path, *tmp_path.rglob("*")]:
        if not path.is_symlink():
            path.chmod(path.stat().st_mode | 0o200)


# -- a corrupt store: one line naming the file, nothing changed ------------------------------------
def truncate(project: Path) -> None:
    data = db(project).read_bytes()
    db(project).write_bytes(data[: len(data) // 3])


def garbage(project: Path) -> None:
    db(project).write_bytes(b"this is not a database\n" * 50)


def emptied(project: Path) -> None:
    db(project).write_bytes(b"")


def foreign(project: Path) -> None:
    db(project).unlink()
    con = sqlite3.connect(db(project))
    con.execute("CREATE TABLE notes (text)")
    con.commit()
    con.close()


def a_folder(project: Path) -> None:
    db(project).unlink()
    db(project).mkdir()


CORRUPT = [
    (truncate, ["registry", "list"], "database disk image is malformed"),
    (truncate, ["audit"], "database disk image is malformed"),
    (truncate, ["registry", "pull", TEACHER, "-o", "../out"], "database disk image is malformed"),
    (truncate, ["registry", "promote", TEACHER, "champion"], "database disk image is malformed"),
    (garbage, ["registry", "list"], "file is not a database"),
    (garbage, ["registry", "show", TEACHER], "file is not a database"),
    (garbage, ["lineage", STUDENT], "file is not a database"),
    (emptied, ["registry", "list"], "no tables, while"),
    (foreign, ["registry", "list"], "without MLflow's tables"),
    (a_folder, ["audit"], "not a file"),
]


@pytest.mark.parametrize("damage,args,detail", CORRUPT, ids=[f"{d.__name__}-{a[-1] if a[0] == 'audit' else a[1]}"
                                                             for d, a, _ in CORRUPT])
def test_a_corrupt_store_is_one_line(proj, capfd, damage, args, detail):
    damage(proj)
    before = snapshot(proj)
    line = one_line(invoke(*args), 2, str(db(proj)), "not a valid MLflow store", detail,
                    "restore it from a backup, or move it aside", capfd=capfd)
    assert line.startswith(f"error: {db(proj)}: ")
    assert snapshot(proj) == before and not (proj.parent / "out").exists()


# -- a locked store: a bounded wait that says what it waits for, then one line ----------------------
def test_a_locked_store_waits_a_bounded_time_then_says_so(proj, capfd):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sqlite3, sys, time\n"
         "con = sqlite3.connect(sys.argv[1], isolation_level=None); con.execute('BEGIN EXCLUSIVE')\n"
         "print('held', flush=True); time.sleep(30)\n", str(db(proj))], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        os.environ["PROXYTUNE_REGISTRY_WAIT"] = "1.5"
        start = time.monotonic()
        result = invoke("registry", "promote", TEACHER, "champion")
        elapsed = time.monotonic() - start
    finally:
        holder.kill()
        holder.wait()
    assert result.exit_code == 2 and 1.5 <= elapsed < 10, (result.output, elapsed)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 2, result.stderr
    assert lines[0].startswith(f"waiting for {db(proj)}: another process holds its lock") and "after 1.5 s" in lines[0]
    assert re.match(rf"error: {re.escape(str(db(proj)))}: still locked by another process after \d+ s; ", lines[1])
    assert "PROXYTUNE_REGISTRY_WAIT=SECONDS" in lines[1] and "Traceback" not in capfd.readouterr().err
    assert "champion" not in invoke("registry", "list").output  # free again, and nothing was promoted


# -- a read-only registry: reading works, a write is one line without MLflow's traceback -----------
def test_a_promote_on_a_read_only_registry_is_one_line(proj, capfd):
    uri = read_only_uri(proj)
    before = snapshot(proj)
    one_line(invoke("registry", "promote", TEACHER, "champion", "--uri", uri), 2, str(db(proj)),
             "the registry is read-only here", capfd=capfd)
    assert snapshot(proj) == before


@pytest.mark.parametrize("args,expected", [
    (["registry", "list"], "t.dog.teacher@1"),
    (["registry", "show", TEACHER], "adapter_model.safetensors"),
    (["audit"], "audit: ok (2 versions, 4 files, 1 evaluation runs checked"),
    (["registry", "pull", STUDENT, "-o", "../out"], "pulled t.dog.student@1"),
], ids=["list", "show", "audit", "pull"])
def test_reading_a_read_only_registry_works(proj, args, expected):
    uri = read_only_uri(proj)
    before = snapshot(proj)
    result = invoke(*args, "--uri", uri)
    assert result.exit_code == 0 and expected in result.output, result.output
    assert snapshot(proj) == before


def test_a_stage_run_on_a_read_only_registry_is_one_error(proj):
    from proxytune.errors import ProxytuneError
    from proxytune.tracking import runs

    uri = read_only_uri(proj)
    before = snapshot(proj)
    with pytest.raises(ProxytuneError, match=r"mlflow.db: the registry is read-only here and this command writes to it"):
        with runs.StageRun("t", "dog", "teacher", uri, proj, {}):
            pass
    assert snapshot(proj) == before


def failure(*texts: str) -> Exception:
    """An exception whose chain of causes carries `texts`, outermost first (as MLflow wraps SQLAlchemy)."""
    err = None
    for text in reversed(texts):
        try:
            raise RuntimeError(text) from err
        except RuntimeError as raised:
            err = raised
    return err


@pytest.mark.parametrize("uri,texts,expected", [
    ("sqlite:////p/registry/mlflow.db", ["SQLAlchemy error", "(sqlite3.OperationalError) database is locked"],
     "/p/registry/mlflow.db: locked by another process for longer than MLflow waits"),
    ("sqlite:////p/registry/mlflow.db", ["(sqlite3.OperationalError) unable to open database file"],
     "/p/registry/mlflow.db: cannot open it ((sqlite3.OperationalError) unable to open database file)"),
    ("sqlite:///file:/p/registry/mlflow.db?mode=ro&uri=true", ["attempt to write a readonly database"],
     "/p/registry/mlflow.db: the registry is read-only here"),
    ("sqlite:////p/registry/mlflow.db", ["Detected out-of-date database schema (found version x)"],
     "/p/registry/mlflow.db: not a valid MLflow store (Detected out-of-date database schema"),
    ("http://127.0.0.1:9", ["API request to http://127.0.0.1:9/api/2.0/x failed with exception "
                            "HTTPConnectionPool(host='127.0.0.1', port=9): Max retries exceeded"],
     "MLflow server http://127.0.0.1:9 does not answer (API request to"),
    ("sqlite:////p/registry/mlflow.db", ["(sqlite3.OperationalError) database or disk is full"], None),
    ("sqlite:////p/registry/mlflow.db", ["RESOURCE_DOES_NOT_EXIST: model version not found"], None),
], ids=["locked-after-mlflows-wait", "cannot-open", "read-only", "old-schema", "server", "disk-full", "other"])
def test_store_failures_after_the_check_are_translated_once(uri, texts, expected):
    line = guard.translate(failure(*texts), uri)
    assert (line is None) if expected is None else str(line).startswith(expected), line


# -- a dead tracking server: an answer within seconds ------------------------------------------------
@pytest.mark.parametrize("args", [["registry", "list"], ["registry", "show", TEACHER], ["audit"],
                                  ["registry", "pull", TEACHER, "-o", "../out"],
                                  ["registry", "promote", TEACHER, "champion"]], ids=lambda a: "-".join(a[:2]))
def test_a_dead_server_is_one_line_within_seconds(proj, capfd, args):
    start = time.monotonic()
    one_line(invoke(*args, "--uri", "http://127.0.0.1:9"), 2, "cannot reach the MLflow server http://127.0.0.1:9",
             "start it, or point --uri / MLFLOW_TRACKING_URI at one that runs", capfd=capfd)
    assert time.monotonic() - start < 10
    assert not (proj.parent / "out").exists()


def test_mlflow_http_retries_are_bounded_but_a_users_setting_wins(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "7")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "")
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
    with pytest.raises(Exception, match="cannot reach"):
        guard.prepare("http://127.0.0.1:9/")
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "2" and os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "7"


# -- aliases that read as versions, and other names --------------------------------------------------
@pytest.mark.parametrize("alias,words", [
    ("7", "reads as a version (NAME@7 would mean version 7)"),
    ("v7", "reads as a version (NAME@v7 would mean version 7)"),
    ("LATEST", "reads as a version (NAME@LATEST would mean the latest version)"),
    ("a/b", "only letters, digits, _ and -"),
    ("two words", "only letters, digits, _ and -"),
], ids=["digits", "v-digits", "latest", "slash", "space"])
def test_aliases_that_cannot_be_resolved_are_refused(proj, alias, words):
    before = snapshot(proj)
    one_line(invoke("registry", "promote", TEACHER, alias), 2, f"alias {alias!r}: ", words)
    assert snapshot(proj) == before


def test_an_alias_that_starts_with_a_letter_is_accepted_and_resolves(proj, tmp_path):
    result = invoke("registry", "promote", TEACHER, "release-7")
    assert result.exit_code == 0 and "t.dog.teacher@release-7 → t.dog.teacher@1" in result.output, result.output
    assert invoke("registry", "pull", "t.dog.teacher@release-7", "-o", str(tmp_path / "out")).exit_code == 0


# -- pulls: never into the store, never over a folder, nothing half-written -------------------------
def test_a_pull_into_the_registrys_own_artifacts_is_refused(proj):
    before = snapshot(proj)
    run_folder = next((proj / "registry" / "artifacts").iterdir())
    for target in (run_folder / "artifacts" / "adapter", proj / "registry" / "artifacts" / "new", proj / "registry"):
        one_line(invoke("registry", "pull", TEACHER, "-o", str(target)), 2, f"-o {target}: inside the registry's own store")
    assert snapshot(proj) == before
    assert invoke("audit").exit_code == 0


def test_a_pull_through_a_symlink_into_the_store_is_refused(proj):
    (proj / "shortcut").symlink_to(proj / "registry" / "artifacts")
    before = snapshot(proj)
    one_line(invoke("registry", "pull", TEACHER, "-o", "shortcut/x"), 2, "-o shortcut/x: inside the registry's own store")
    assert snapshot(proj) == before


def test_a_pull_onto_a_non_empty_folder_or_a_file_is_refused(proj, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("keep me")
    (tmp_path / "file").write_text("a file")
    for target in ("full", "file"):
        one_line(invoke("registry", "pull", TEACHER, "-o", str(tmp_path / target)), 2,
                 f"-o {tmp_path / target}: already exists and is not an empty folder")
    assert (tmp_path / "full" / "mine.txt").read_text() == "keep me" and (tmp_path / "file").read_text() == "a file"


@pytest.mark.parametrize("target", [".", "", ".."], ids=["dot", "empty", "parent"])
def test_a_pull_onto_the_current_folder_is_refused(proj, tmp_path, monkeypatch, target):
    here = tmp_path / "empty"
    here.mkdir()
    monkeypatch.chdir(here)
    uri = f"sqlite:///{db(proj)}"
    one_line(invoke("registry", "pull", TEACHER, "-o", target, "--uri", uri), 2,
             f"-o {target or '.'}: the current folder or one above it")
    assert here.is_dir() and list(here.iterdir()) == []


def test_a_pull_into_a_folder_whose_parents_are_missing_creates_them(proj, tmp_path):
    target = tmp_path / "a" / "b" / "adapter"
    result = invoke("registry", "pull", TEACHER, "-o", str(target))
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in target.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_a_full_disk_during_a_pull_leaves_nothing(proj, tmp_path, monkeypatch):
    def full(src, dst, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))

    monkeypatch.setattr(shutil, "copy2", full)
    one_line(invoke("registry", "pull", TEACHER, "-o", str(tmp_path / "out")), 2, "no space left on device",
             "free some space and re-run the same command")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["proj"]  # no out/, no staging folder


# -- versions that are not there, or no longer ---------------------------------------------------------
def delete_teacher(project: Path) -> None:
    from proxytune.tracking import store

    client = store.connect(store.resolve_uri(None, project))
    client.set_registered_model_alias("t.dog.teacher", "champion", "1")
    client.delete_model_version("t.dog.teacher", "1")


@pytest.mark.parametrize("ref,words", [
    ("t.dog.teacher@9", "t.dog.teacher@9: not in the registry"),
    ("t.dog.teacher@nope", "t.dog.teacher@nope: not in the registry"),
    ("@1", "'@1': expected NAME[@VERSION|@ALIAS]"),
    ("t.dög.teacher@1", "t.dög.teacher@1: not in the registry"),
], ids=["no-such-version", "no-such-alias", "no-name", "unicode-name"])
def test_a_reference_to_nothing_is_one_line(proj, tmp_path, ref, words):
    one_line(invoke("registry", "pull", ref, "-o", str(tmp_path / "out")), 2, words)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("ref", ["t.dog.teacher@1", "t.dog.teacher@champion"], ids=["version", "alias"])
def test_a_deleted_version_and_an_alias_that_pointed_at_it(proj, tmp_path, ref):
    delete_teacher(proj)
    one_line(invoke("registry", "pull", ref, "-o", str(tmp_path / "out")), 2, f"{ref}: not in the registry")
    assert not (tmp_path / "out").exists()


def test_audit_names_a_link_to_a_deleted_version(proj):
    delete_teacher(proj)
    result = invoke("audit")
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    problems = [line for line in result.stdout.splitlines() if line.startswith("problem: ")]
    assert f"problem: {STUDENT}: teacher version {TEACHER} is not in the registry" in problems, result.output


def test_audit_of_a_run_whose_artifact_was_removed_exits_1(proj):
    removed = next((proj / "registry" / "artifacts").rglob("adapter_config.json"))
    removed.unlink()
    result = invoke("audit")
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    problems = [line for line in result.stdout.splitlines() if line.startswith("problem: ")]
    assert len(problems) == 1 and "adapter_config.json: missing" in problems[0], result.output
    assert result.stdout.splitlines()[-1].startswith("audit: 1 problems")


def test_a_registry_command_outside_a_project_leaves_no_registry(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    one_line(invoke("registry", "list"), 2, f"{tmp_path / 'registry' / 'mlflow.db'}: no registry here", "--uri")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("uri,words", [
    ("foo://x", "tracking URI 'foo://x': a scheme MLflow does not support; give sqlite:///PATH/mlflow.db"),
    ("./x", "tracking URI './x': a folder (MLflow's retired file store)"),
    ("sqlite:///nope/x.db", "no MLflow store there (tracking URI sqlite:///nope/x.db); check the path"),
], ids=["unknown-scheme", "a-folder", "no-such-sqlite"])
def test_a_tracking_uri_that_names_no_store_is_one_line(tmp_path, monkeypatch, uri, words):
    monkeypatch.chdir(tmp_path)
    one_line(invoke("registry", "list", "--uri", uri), 2, words)
    assert list(tmp_path.iterdir()) == []


# -- a moved or copied project ------------------------------------------------------------------------
def test_a_moved_project_pulls_and_audits_and_forgets_its_old_place(proj, tmp_path, monkeypatch):
    moved = tmp_path / "elsewhere" / "renamed"
    moved.parent.mkdir()
    shutil.move(proj, moved)
    monkeypatch.chdir(moved)
    outputs = [invoke("registry", "pull", TEACHER, "-o", str(tmp_path / "out")), invoke("audit"),
               invoke("registry", "show", STUDENT), invoke("lineage", STUDENT)]
    assert [r.exit_code for r in outputs] == [0, 0, 0, 0], [r.output for r in outputs]
    assert "audit: ok (2 versions, 4 files" in outputs[1].output
    assert f"source:  {(moved / 'registry' / 'artifacts').as_uri()}/" in outputs[2].output
    assert "00.jpg" in outputs[3].output  # references.json, read from the new place
    assert all(str(proj) not in r.output for r in outputs)
    assert not proj.exists()  # nothing re-created at the old place


def test_a_copy_writes_its_new_runs_into_itself_not_the_original(registered, proj, tmp_path):
    from proxytune.tracking import runs, store

    original = snapshot(registered)
    uri = store.resolve_uri(None, proj)
    with runs.StageRun("t", "dog", "teacher", uri, proj, {"spec_digest": "s2"}) as run:
        run.log_dict({"00.jpg": "1" * 64}, "references.json")
        folder = proj / "adapter2"
        folder.mkdir()
        (folder / "adapter_model.safetensors").write_bytes(b"second")
        version = run.register(folder, "teacher", {})
    assert version == "2" and snapshot(registered) == original
    assert (proj / "registry" / "artifacts" / run.run_id / "artifacts" / "references.json").is_file()
    assert invoke("registry", "show", "t.dog.teacher@2").output.count(proj.as_uri()) == 1
    result = invoke("registry", "pull", "t.dog.teacher@2", "-o", str(tmp_path / "out"))
    assert result.exit_code == 0 and (tmp_path / "out" / "adapter_model.safetensors").read_bytes() == b"second"


@pytest.mark.parametrize("uri,stored", [
    ("http://mlflow.example:5000", "mlflow-artifacts:/1/abc/artifacts/adapter"),
    ("http://mlflow.example:5000", "file:///old/registry/artifacts/abc/artifacts/adapter"),
    ("sqlite:////data/team.db", "file:///old/registry/artifacts/abc/artifacts/adapter"),
    ("sqlite:////new/registry/mlflow.db", "s3://bucket/registry/artifacts/abc/artifacts/adapter"),
], ids=["server", "server-file", "other-sqlite", "embedded-s3"])
def test_only_the_embedded_store_reads_its_artifacts_against_where_it_is(uri, stored):
    from proxytune.tracking.store import artifact_uri

    assert artifact_uri(uri, stored, "abc") == stored
    assert artifact_uri("sqlite:////new/registry/mlflow.db", "file:///old/registry/artifacts/abc/artifacts/adapter",
                        "abc") == "file:///new/registry/artifacts/abc/artifacts/adapter"


# -- other processes and locales -------------------------------------------------------------------------
def cli_process(project: Path, *args: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "proxytune.cli", *args], cwd=project, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(REPO), **env})


def test_two_promotes_at_once_and_unicode_names_under_lc_all_c(proj):
    """Three processes at once in the C locale: two promotes (one to a unicode alias) both land; a
    unicode name that is not registered is one line."""
    env = {"LC_ALL": "C", "LANG": "C"}
    promotes = [cli_process(proj, "registry", "promote", ref, alias, **env)
                for ref, alias in ((TEACHER, "chämpion"), (STUDENT, "champion"))]
    refused = cli_process(proj, "registry", "show", "t.dög.teacher@1", **env)
    results = [p.communicate(timeout=300) for p in promotes]
    assert [p.returncode for p in promotes] == [0, 0], results
    assert "t.dog.teacher@chämpion → t.dog.teacher@1" in results[0][0]
    out, err = refused.communicate(timeout=300)
    lines = [line for line in err.splitlines() if line.strip()]
    assert refused.returncode == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("error: t.dög.teacher@1: not in the registry")
    listing = invoke("registry", "list").output.splitlines()
    assert "candidate,champion " in listing[0] and "candidate,chämpion " in listing[1], listing
