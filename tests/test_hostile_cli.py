"""The command line in a hostile world (issue 30, the commands' half): crafted stage params, odd
converter inputs and outputs, read-only folders, a bad PROXYTUNE_HOME or HOME, a full disk, Ctrl-C.

Refused: exit 2 (130 for Ctrl-C), one line on stderr naming the file (and key) and the fix, no
traceback, nothing changed that should not change. Accepted: unicode and spaces in paths under
LC_ALL=C, and two applies of one project at once (the second waits for the first).

Read-only folders are made with chmod; as root, which permissions do not stop, the test also drops
CAP_DAC_OVERRIDE for the duration (Linux), so the folder is read-only for this process too."""

import contextlib
import ctypes
import errno
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from conftest import REPO, copy_images, tiny_spec
from proxytune.cli import main


# -- helpers -----------------------------------------------------------------------------------------
def snapshot(*folders: Path) -> dict:
    """Every path under the folders with its size and modification time."""
    seen = {}
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            stat = path.lstat()
            seen[str(path)] = (stat.st_size if path.is_file() else -1, stat.st_mtime_ns)
    return seen


def refused(result, start: str, *words: str, code: int = 2) -> str:
    """The one stderr line of a refused command: it starts with `start` and holds `words`."""
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith(start), lines[0]
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


DAC_CAPS = (1 << 1) | (1 << 2)  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH: root ignores file modes with them


@contextlib.contextmanager
def read_only(*folders: Path):
    """The folders read-only (mode 0555) for this thread, root included; restored afterwards."""
    for folder in folders:
        folder.chmod(0o555)
    libc, header, data = None, None, None
    try:
        if os.geteuid() == 0:
            libc = ctypes.CDLL(None, use_errno=True)
            header, data = _CapHeader(0x20080522, 0), (_CapData * 2)()  # _LINUX_CAPABILITY_VERSION_3
            assert libc.capget(ctypes.byref(header), data) == 0, ctypes.get_errno()
            data[0].effective &= ~DAC_CAPS
            assert libc.capset(ctypes.byref(header), data) == 0, ctypes.get_errno()
        yield
    finally:
        if libc is not None:
            data[0].effective |= data[0].permitted & DAC_CAPS
            assert libc.capset(ctypes.byref(header), data) == 0, ctypes.get_errno()
        for folder in folders:
            folder.chmod(0o755)


def compile_project(project: Path, spec: dict | None = None) -> Path:
    """Write and compile a tiny spec in `project` (the current folder); its subject's params file."""
    spec = spec or tiny_spec()
    (project / "specs" / "t.yaml").write_text(yaml.safe_dump(spec, allow_unicode=True))
    result = CliRunner().invoke(main, ["compile", "specs/t.yaml"])
    assert result.exit_code == 0, result.output
    return project / "runs" / "t" / "dog" / "params.yaml"


# -- `proxytune stage` with crafted params ----------------------------------------------------------------
def edit(params: dict, key: str, value) -> dict:
    out = yaml.safe_load(yaml.safe_dump(params))
    section, _, field = key.partition(".")
    if field:
        out[section][field] = value
    else:
        out[key] = value
    return out


CRAFTED = {
    "escaping-experiment": ("experiment", "../../evil", "experiment: '../../evil' is not an experiment name"),
    "slash-in-experiment": ("experiment", "t/dog", "experiment: 't/dog' is not an experiment name"),
    "three-part-experiment": ("experiment", "t--a--b", "experiment: 't--a--b' is not an experiment name"),
    "other-experiment": ("experiment", "u", "not runs/u/dog/params.yaml of the project"),
    "escaping-subject": ("subject.name", "../dog", "subject.name: Value error, must be 1-64 characters"),
    "student-dir-outside": ("student_dir", "/tmp/elsewhere/student", "student_dir: '/tmp/elsewhere/student' is not runs/t/_joint/student"),
    "upstream-dir-outside": ("upstream_dir", "../../x", "upstream_dir: '../../x' is not runs/t/dog"),
    "member-outside": ("members", ["runs/t/../../../etc"], "members[0]: 'runs/t/../../../etc' is not a subject folder"),
    "unknown-key": ("registry_dir", "/tmp", "registry_dir: Extra inputs are not permitted"),
}


@pytest.mark.parametrize("key,value,words", CRAFTED.values(), ids=CRAFTED.keys())
def test_crafted_stage_params_are_refused_before_any_work(project, key, value, words):
    path = compile_project(project)
    path.write_text(yaml.safe_dump(edit(yaml.safe_load(path.read_text()), key, value)))
    before = snapshot(project)
    result = CliRunner().invoke(main, ["stage", "teacher", "--params", "runs/t/dog/params.yaml"])
    refused(result, "error: runs/t/dog/params.yaml: ", words, "proxytune")
    assert snapshot(project) == before  # no teacher/, no registry/, no .work/
    assert not (project / "registry").exists() and not (project.parent / "evil").exists()


def test_a_params_file_of_another_project_neither_writes_there_nor_here(project, tmp_path_factory, monkeypatch):
    other = tmp_path_factory.mktemp("other-project")
    (other / "specs").mkdir()
    monkeypatch.chdir(other)
    params = compile_project(other)
    record = params.parent / "teacher" / "record.json"
    record.parent.mkdir()
    record.write_text('{"run_id": "theirs"}\n')  # what an applied project holds
    monkeypatch.chdir(project)
    before = snapshot(project, other)
    result = CliRunner().invoke(main, ["stage", "teacher", "--params", str(params)])
    refused(result, f"error: {params}: ", f"not runs/t/dog/params.yaml of the project in {project}",
            "from the root of the project that holds the file")
    assert snapshot(project, other) == before and record.read_text() == '{"run_id": "theirs"}\n'
    assert not (project / "registry").exists()


@pytest.mark.parametrize("content,words", [
    (None, "a folder, not a params file"),
    ("just a string\n", "malformed params file"),
    ("teacher: [\n", "malformed params file"),
    (b"\xff\xfe\x00", "cannot read the params file"),
], ids=["a-folder", "not-a-mapping", "broken-yaml", "not-utf8"])
def test_a_params_file_that_is_no_params_file(project, content, words):
    compile_project(project)
    target = project / "runs" / "t" / "dog" / ("params.yaml" if content is not None else "")
    if content is not None:
        target.write_bytes(content.encode() if isinstance(content, str) else content)
    before = snapshot(project)
    result = CliRunner().invoke(main, ["stage", "teacher", "--params", str(target)])
    refused(result, f"error: {target}: ", words)
    assert snapshot(project) == before


def test_ctrl_c_during_a_stage_is_one_line_exit_130_and_leaves_nothing_half_written(project, monkeypatch):
    from proxytune.stages import teacher

    compile_project(project)

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(teacher.TeacherTrainer, "setup", interrupted)
    result = CliRunner().invoke(main, ["stage", "teacher", "--params", "runs/t/dog/params.yaml"])
    refused(result, "interrupted: re-run the same command to resume", code=130)
    assert not (project / "runs" / "t" / "dog" / "teacher").exists()


# -- converters ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def release(tmp_path_factory) -> dict:
    """LlamaGen's tiny release files (GPT .pt, VQ .pt, T5 folder) and a work folder beside them."""
    from releases import llamagen

    root = tmp_path_factory.mktemp("hostile-release")
    paths = llamagen.build_release(root / "downloads")
    with torch.serialization.safe_globals([__import__("argparse").Namespace]):
        gpt = torch.load(paths["t2i_XL_stage1_256.pt"], map_location="cpu", weights_only=True)["model"]
        vq = torch.load(paths["vq_ds16_t2i.pt"], map_location="cpu", weights_only=True)
    from safetensors.torch import save_file

    save_file({k: (v * 100).to(torch.int32).contiguous() for k, v in gpt.items()}, root / "ints.safetensors")
    vq["model"]["quantize.embedding.weight"] = torch.zeros(64, 11)  # a codebook width its quant_conv does not give
    torch.save(vq, root / "vq_wrong_shape.pt")
    (root / "empty.pt").write_bytes(b"")
    (root / "notes.pt").write_text("not a checkpoint\n")
    (root / "full").mkdir()
    (root / "full" / "keep.txt").write_text("mine\n")
    (root / "empty-dir").mkdir()
    return {**paths, "root": root}


def llamagen(release: dict, gpt, out, vq=None) -> list[str]:
    return ["convert", "llamagen", str(gpt), str(out), "--vq", str(vq or release["vq_ds16_t2i.pt"]),
            "--text-encoder", str(release["flan-t5-xl"]), "--heads", "4"]


def vqgan(checkpoint, out) -> list[str]:
    return ["convert", "vqgan", str(checkpoint), str(out), "--layout", "llamagen", "--image-size", "64"]


CONVERTER_CASES = {
    "integer-safetensors": (lambda r, w: llamagen(r, r["root"] / "ints.safetensors", w / "out"),
                            "error: '{root}/ints.safetensors': ", "is torch.int32, not floating-point weights"),
    "vq-wrong-shape": (lambda r, w: vqgan(r["root"] / "vq_wrong_shape.pt", w / "out"),
                       "error: llamagen VQGAN checkpoint '{root}/vq_wrong_shape.pt': ", "'quant_conv.weight' has shape"),
    "vq-wrong-shape-via-llamagen": (lambda r, w: llamagen(r, r["t2i_XL_stage1_256.pt"], w / "out", r["root"] / "vq_wrong_shape.pt"),
                                    "error: llamagen VQGAN checkpoint '{root}/vq_wrong_shape.pt': ", "not a consistent VQGAN"),
    "parent-missing": (lambda r, w: llamagen(r, r["t2i_XL_stage1_256.pt"], w / "no" / "out"),
                       "error: {work}/no/out: ", "its parent folder {work}/no does not exist"),
    "parent-is-a-file": (lambda r, w: vqgan(r["vq_ds16_t2i.pt"], r["root"] / "notes.pt" / "out"),
                         "error: {root}/notes.pt/out: ", "its parent folder {root}/notes.pt is a file"),
    "output-not-empty": (lambda r, w: vqgan(r["vq_ds16_t2i.pt"], r["root"] / "full"),
                         "error: {root}/full: ", "already exists and is not empty; choose a new folder"),
    "output-empty-folder": (lambda r, w: llamagen(r, r["t2i_XL_stage1_256.pt"], r["root"] / "empty-dir"),
                            "error: {root}/empty-dir: ", "already exists and is empty"),
    "output-is-a-file": (lambda r, w: ["convert", "janus", str(r["root"] / "full"), str(r["root"] / "notes.pt")],
                         "error: {root}/notes.pt: ", "a file already has this name"),
    "input-is-a-folder": (lambda r, w: llamagen(r, r["root"] / "full", w / "out"),
                          "error: LlamaGen checkpoint '{root}/full': ", "a folder, not a checkpoint file"),
    "input-is-empty": (lambda r, w: vqgan(r["root"] / "empty.pt", w / "out"),
                       "error: llamagen VQGAN checkpoint '{root}/empty.pt': ", "an empty file (0 bytes)"),
    "input-not-a-checkpoint": (lambda r, w: llamagen(r, r["root"] / "notes.pt", w / "out"),
                               "error: LlamaGen checkpoint '{root}/notes.pt': ", "not a PyTorch checkpoint (neither a zip"),
    "input-missing": (lambda r, w: vqgan(r["root"] / "nowhere.pt", w / "out"),
                      "error: llamagen VQGAN checkpoint '{root}/nowhere.pt': ", "no such file"),
    "janus-input-is-a-file": (lambda r, w: ["convert", "janus", str(r["root"] / "empty.pt"), str(w / "out")],
                              "error: Janus checkpoint '{root}/empty.pt': ", "a file, not the release's folder"),
    "lumina-vqgan-is-empty": (lambda r, w: ["convert", "lumina-mgpt", str(r["root"] / "empty-dir"), str(w / "out"),
                                            "--vqgan", str(r["root"] / "empty.pt")],
                              "error: taming VQGAN checkpoint '{root}/empty.pt': ", "an empty file"),
    "stylear-input-is-a-file": (lambda r, w: ["convert", "stylear", str(r["root"] / "notes.pt"), str(w / "out")],
                                "error: {root}/notes.pt: ", "a file, not StyleAR's released folder"),
}


@pytest.mark.parametrize("args,start,words", CONVERTER_CASES.values(), ids=CONVERTER_CASES.keys())
def test_converter_inputs_and_outputs_are_one_line_with_nothing_left(release, tmp_path, args, start, words):
    root = release["root"]
    before = snapshot(root, tmp_path)
    result = CliRunner().invoke(main, args(release, tmp_path))
    names = {"root": root, "work": tmp_path}
    refused(result, start.format(**names), words.format(**names))
    assert snapshot(root, tmp_path) == before  # no output, no staging or scratch folder


def test_a_read_only_output_folder(release, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    with read_only(locked):
        result = CliRunner().invoke(main, llamagen(release, release["t2i_XL_stage1_256.pt"], locked / "out"))
    refused(result, f"error: {locked}/out: ", f"cannot write in {locked} (Permission denied)")
    assert list(locked.iterdir()) == []


@pytest.mark.parametrize("failure", ["disk-full", "ctrl-c"])
def test_a_full_disk_or_ctrl_c_while_converting_leaves_nothing_and_a_rerun_converts(release, tmp_path, monkeypatch, failure):
    import safetensors.torch

    real = safetensors.torch.save_file

    def broken(*args, **kwargs):
        if failure == "ctrl-c":
            raise KeyboardInterrupt
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    out = tmp_path / "vq é 🐶 out"  # and a name with unicode and spaces is fine
    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    result = CliRunner().invoke(main, vqgan(release["vq_ds16_t2i.pt"], out))
    if failure == "ctrl-c":
        refused(result, "interrupted: re-run the same command to resume", code=130)
    else:
        refused(result, "error: ", "no space left on device", "re-run the same command to resume")
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its staging copy
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    result = CliRunner().invoke(main, vqgan(release["vq_ds16_t2i.pt"], out))
    assert result.exit_code == 0, result.output
    assert (out / "config.json").is_file() and (out / "diffusion_pytorch_model.safetensors").is_file()


# -- the environment ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["apply", "compile"])
def test_a_read_only_project(project, command):
    (project / "specs" / "t.yaml").write_text(yaml.safe_dump(tiny_spec()))
    before = snapshot(project)
    with read_only(project, project / "specs"):
        result = CliRunner().invoke(main, [command, "specs/t.yaml"])
    refused(result, f"error: {project}: the project folder is not writable (Permission denied)",
            "make it writable or copy the project")
    assert snapshot(project) == before


def cache_case(tmp_path: Path, monkeypatch, case: str) -> str:
    """Point the tiny-model cache at something unusable; the start of the expected line."""
    blocker = tmp_path / "a-file"
    blocker.write_text("x\n")
    if case == "home-is-a-file":
        monkeypatch.setenv("PROXYTUNE_HOME", str(blocker))
        return f"error: PROXYTUNE_HOME {blocker}: a file, not a folder"
    if case == "home-under-a-file":
        monkeypatch.setenv("PROXYTUNE_HOME", str(blocker / "cache"))
        return f"error: PROXYTUNE_HOME {blocker / 'cache'}: Not a directory"
    monkeypatch.delenv("PROXYTUNE_HOME")  # the default, under an unwritable HOME
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    return f"error: the tiny-model cache (PROXYTUNE_HOME unset) {home}/.cache/proxytune: Permission denied"


@pytest.mark.parametrize("case", ["home-is-a-file", "home-under-a-file", "unwritable-HOME"])
def test_an_unusable_tiny_model_cache_is_refused_before_anything_is_written(project, tmp_path_factory, monkeypatch, case):
    elsewhere = tmp_path_factory.mktemp("cache-case")
    start = cache_case(elsewhere, monkeypatch, case)
    (project / "specs" / "t.yaml").write_text(yaml.safe_dump(tiny_spec()))
    before = snapshot(project)
    with read_only(elsewhere / "home") if case == "unwritable-HOME" else contextlib.nullcontext():
        result = CliRunner().invoke(main, ["apply", "specs/t.yaml"])
    refused(result, start, "set PROXYTUNE_HOME to a folder you can write")
    assert snapshot(project) == before


def test_a_full_disk_while_compiling_leaves_no_half_written_file_and_a_rerun_completes(project, monkeypatch):
    (project / "specs" / "t.yaml").write_text(yaml.safe_dump(tiny_spec()))
    real, calls = os.fsync, []

    def second_write_fails(fd):  # params.yaml is written, then the disk is full for dvc.yaml
        calls.append(fd)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd)

    monkeypatch.setattr(os, "fsync", second_write_fails)
    result = CliRunner().invoke(main, ["compile", "specs/t.yaml"])
    refused(result, f"error: {project / 'dvc.yaml'}: no space left on device", "re-run the same command to resume")
    leftovers = [p for p in project.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == [] and not (project / "dvc.yaml").exists()
    monkeypatch.setattr(os, "fsync", real)
    result = CliRunner().invoke(main, ["compile", "specs/t.yaml"])
    assert result.exit_code == 0, result.output
    assert "teacher" in yaml.safe_load((project / "dvc.yaml").read_text())["stages"]


def test_other_commands_in_a_read_only_folder(project):
    out = project / "refs"
    out.mkdir()
    with read_only(out):
        result = CliRunner().invoke(main, ["toyworld", "subjects", "--out", str(out / "toys")])
    refused(result, f"error: {out}/toys: permission denied; give this user access to it", "re-run the same command")
    assert list(out.iterdir()) == []



@pytest.mark.parametrize("command", ["validate", "compile", "apply", "report", "plan"])
def test_a_spec_that_is_a_folder_is_one_line(project, command):
    before = snapshot(project)
    result = CliRunner().invoke(main, [command, "specs"])
    refused(result, "error: specs: cannot read spec (a folder, not a file)")
    assert snapshot(project) == before


# -- must accept -------------------------------------------------------------------------------------------
def cli(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, "PYTHONPATH": str(REPO), **env}
    return subprocess.run([sys.executable, "-m", "proxytune.cli", *args], cwd=cwd, env=environ, capture_output=True,
                          text=True, timeout=300)


def test_unicode_and_spaces_in_paths_under_lc_all_c(tmp_path, photos, monkeypatch):
    from proxytune.stages.params import load_params

    project = tmp_path / "projet é 🐶 x"
    (project / "specs").mkdir(parents=True)
    copy_images(photos / "dog", project / "références chien", count=3)
    spec = tiny_spec()
    spec["subjects"][0].update({"images": "../références chien", "class": "chien"})
    (project / "specs" / "t.yaml").write_text(yaml.safe_dump(spec, allow_unicode=True))
    result = cli(project, "apply", "--dry-run", "specs/t.yaml", LC_ALL="C", LANG="C")
    assert result.returncode == 0, result.stderr
    assert "stages to run: codes@t.dog, evaluate@t.dog, student@t.dog, synthesis@t.dog, teacher@t.dog" in result.stdout
    monkeypatch.chdir(project)  # the stage's own check accepts the params file compile wrote there
    params = load_params("runs/t/dog/params.yaml")
    assert params.references_dir == (project / "références chien").resolve()


def test_two_applies_at_once_the_second_waits_and_the_project_stays_consistent(project):
    (project / "specs" / "t.yaml").write_text(yaml.safe_dump(tiny_spec()))
    holder = subprocess.Popen(  # the first apply, holding the project lock for two seconds
        [sys.executable, "-c",
         "import sys, time; from pathlib import Path; from proxytune.project import project_lock\n"
         "with project_lock(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(2)\n", str(project)],
        env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        start = time.monotonic()
        result = CliRunner().invoke(main, ["apply", "--dry-run", "specs/t.yaml"])
        assert result.exit_code == 0, result.output
        assert result.stderr.strip() == "waiting for another proxytune apply in this project…"
        assert time.monotonic() - start > 0.5 and holder.wait(timeout=30) == 0
    finally:
        if holder.poll() is None:
            holder.kill()
    assert "stages to run: " in result.stdout
    stages = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    assert sorted(stages["teacher"]["foreach"]) == ["t.dog"]
    assert not [p for p in project.rglob("*.tmp")]


def test_every_params_file_compile_writes_passes_the_stages_check(project, photos):
    """Variants (upstream_dir), a joint student (members, student_dir) and a style: all accepted as written."""
    from proxytune.stages.params import load_params

    copy_images(photos / "dog", project / "specs" / "refs", count=3)
    joint = tiny_spec("b", student={"multi_subject": True})
    joint["subjects"] = [{"name": "dog", "class": "dog", "images": "dreambench:dog", "token": "S1*"},
                         {"name": "cat", "class": "cat", "images": "dreambench:cat", "token": "S2*"}]
    specs = {"a": tiny_spec("a", student={"variants": {"v": {"steps": 10}}}), "b": joint,
             "s": {"name": "s", "student": {"model": "tiny-lumina-mgpt"},
                   "styles": [{"name": "glass", "images": "refs", "prompts": ["a cat"], "raw": {"toyworld": 4}}]}}
    for name, spec in specs.items():
        (project / "specs" / f"{name}.yaml").write_text(yaml.safe_dump(spec))
    result = CliRunner().invoke(main, ["compile", *(f"specs/{name}.yaml" for name in specs)])
    assert result.exit_code == 0, result.output
    files = sorted(p.relative_to(project).as_posix() for p in (project / "runs").rglob("params.yaml"))
    assert files == ["runs/a--v/dog/params.yaml", "runs/a/dog/params.yaml", "runs/b/_joint/params.yaml",
                     "runs/b/cat/params.yaml", "runs/b/dog/params.yaml", "runs/s/glass/params.yaml"]
    loaded = {path: load_params(path) for path in files}
    assert loaded["runs/a--v/dog/params.yaml"].out("teacher").as_posix() == "runs/a/dog/teacher"
    assert loaded["runs/b/_joint/params.yaml"].joint_subjects == ["runs/b/dog", "runs/b/cat"]


def test_a_read_only_lock_folder_in_a_writable_project(project):
    (project / "specs" / "t.yaml").write_text(yaml.safe_dump(tiny_spec()))
    (project / ".proxytune").mkdir()
    before = snapshot(project)
    with read_only(project / ".proxytune"):
        result = CliRunner().invoke(main, ["compile", "specs/t.yaml"])
    refused(result, f"error: {project / '.proxytune'}", "permission denied; give this user access to it")
    assert snapshot(project) == before
