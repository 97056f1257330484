"""Glue between the CLI and the layers: resolve specs against the file system, write compiled files,
drive DVC through its CLI."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterator

import yaml

from proxytune import compile as compiler
from proxytune.backends.students import meta as student_meta
from proxytune.backends.students.meta import STUDENT_META
from proxytune.errors import ProxytuneError, SpecError
from proxytune.files import process_alive, sha256_file, write_problem, write_text_atomic
from proxytune.images import list_images, open_rgb
from proxytune.spec import load_spec, resolve_images

DVC_ENV = {"DVC_NO_ANALYTICS": "1", "DVC_IGNORE_UPDATER": "1"}
LOCK_DIR = ".proxytune"  # project-level state of proxytune itself (git-ignored by its own .gitignore)


def resolve_spec(path: str | Path, root: Path, *, check_images: bool = True) -> compiler.ResolvedSpec:
    """Validate a spec and look up what compile needs: its digest, the reference folders and, for a
    style, its raw-data folder and curation prompts (a prompt file read, a generated set composed).

    Raises:
        SpecError / ProxytuneError: bad spec, missing folder, empty folder or unreadable image.
    """
    from proxytune.spec.style import resolve_style

    path = Path(path)
    spec = load_spec(path)
    check_resolution(spec, path, root)
    references = {}
    for index, subject in enumerate(spec.subjects):
        folder = resolve_images(subject, path, index)
        if check_images:
            try:
                for image in list_images(folder):
                    open_rgb(image)
            except ProxytuneError as err:
                raise SpecError(f"{path}: subjects[{index}].images: {err}") from None
        references[subject.name] = compiler.relative_to_root(folder, root)
    styles = {}
    for index, style in enumerate(spec.styles):
        folder, raw, prompts = resolve_style(style, path, index)
        references[style.name] = compiler.relative_to_root(folder, root)
        styles[style.name] = {"raw": compiler.relative_to_root(raw, root) if raw else None, "prompts": prompts}
    check_identifiers(spec, path, root)
    shown = compiler.relative_to_root(path, root)
    return compiler.ResolvedSpec(spec=spec, spec_path=shown, spec_digest=sha256_file(path), references=references,
                                 styles=styles)


def resolve_specs(paths: tuple[str, ...] | list[str], root: Path) -> list[compiler.ResolvedSpec]:
    """`resolve_spec` of each spec file, in order."""
    return [resolve_spec(path, root) for path in paths]


def check_resolution(spec, path: Path, root: Path) -> None:
    """`teacher.resolution` must be a multiple of what the teacher pipeline divides it by (VAE, patches).

    Raises:
        SpecError: it is not; the message names the nearest usable sizes.
    """
    from proxytune.backends.teachers.teacher_sizes import resolution_multiple

    size, multiple = spec.teacher.resolution, resolution_multiple(spec.teacher.model, root, spec.teacher.revision)
    if multiple is None or size % multiple == 0:
        return
    below, above = size - size % multiple, size - size % multiple + multiple
    nearest = f"{below} or {above}" if below else f"{above}"
    raise SpecError(f"{path}: teacher.resolution: {size} is not a multiple of {multiple}, which {spec.teacher.model} "
                    f"needs (its VAE and denoiser downsample by it); use {nearest}")


def _llamagen_student(ref: str, root: Path) -> bool:
    """Whether a student model is known, without loading it, to be a llamagen student (the built-in
    tiny or toy one, or a local folder whose proxytune_student.json says so); a hub id is checked when it loads."""
    if ref in ("tiny-llamagen", "toy-llamagen"):
        return True
    try:
        meta = student_meta.read_file((root / Path(ref).expanduser()) / STUDENT_META)
    except (OSError, ValueError):
        return False
    return meta is not None and meta.get("backend", "llamagen") == "llamagen"


def check_identifiers(spec, path: Path, root: Path) -> None:
    """A llamagen student sees prompts through LlamaGen's caption cleaning: an identifier the cleaning
    removes is refused, one it changes ("S*" -> "s") is warned about, on stderr.

    Raises:
        SpecError: `subjects[i].token` does not survive, or two subjects' tokens clean to the same word.
    """
    import sys

    from proxytune.backends.captions import clean_caption, identifier_problem

    if not _llamagen_student(spec.student.model, root):
        return
    seen: dict[str, int] = {}
    for index, subject in enumerate(spec.subjects):
        key = f"{path}: subjects[{index}].token"
        problem = identifier_problem(subject.token, subject.class_noun)
        if problem and problem[0] == "error":
            raise SpecError(f"{key}: {problem[1]}")
        if problem:
            print(f"warning: {key}: {problem[1]}", file=sys.stderr)
        cleaned = clean_caption(subject.token)
        if spec.student.multi_subject and cleaned in seen:
            raise SpecError(f"{key}: {subject.token!r} and subjects[{seen[cleaned]}].token "
                            f"{spec.subjects[seen[cleaned]].token!r} both reach the llamagen student as {cleaned!r}")
        seen[cleaned] = index


def check_unique(resolved: list[compiler.ResolvedSpec]) -> None:
    seen: dict[str, str] = {}
    for item in resolved:
        if item.spec.name in seen and seen[item.spec.name] != item.spec_path:
            raise SpecError(f"{item.spec_path}: name: experiment {item.spec.name!r} is also defined in {seen[item.spec.name]}")
        seen[item.spec.name] = item.spec_path


def write_compiled(resolved: list[compiler.ResolvedSpec], root: Path) -> dict:
    """Merge these specs into root/dvc.yaml and write their params files (each atomically)."""
    check_unique(resolved)
    dvc_path = root / "dvc.yaml"
    existing = yaml.safe_load(dvc_path.read_text()) if dvc_path.exists() else None
    dvc, params_files = compiler.compile_specs(resolved, existing)
    for rel, params in params_files.items():
        text = "# generated by `proxytune compile`; edit the spec, not this file\n" + yaml.safe_dump(params, sort_keys=False)
        target = root / rel
        if not target.exists() or target.read_text() != text:
            write_text_atomic(target, text)
    header = "# generated by `proxytune compile` from the specs; edits here are overwritten\n"
    text = header + yaml.safe_dump(dvc, sort_keys=False, width=120)
    if not dvc_path.exists() or dvc_path.read_text() != text:
        write_text_atomic(dvc_path, text)
    return dvc


def check_writable(root: Path) -> None:
    """Before compile or apply writes anything: the project folder must take a new file.

    Raises:
        ProxytuneError: it does not (read-only, not ours); one line naming it and the fix.
    """
    problem = write_problem(root)
    if problem:
        raise ProxytuneError(f"{root}: the project folder is not writable ({problem}); apply and compile write "
                             "dvc.yaml, runs/, .proxytune/ and registry/ there: make it writable or copy the project "
                             "to a folder you can write")


def _dvc() -> list[str]:
    """The command that runs DVC: the `dvc` package of the interpreter running proxytune, not an executable
    found on PATH (a virtualenv used without activation, or pipx, has neither `dvc` nor `proxytune` on PATH)."""
    import importlib.util

    if importlib.util.find_spec("dvc") is None:
        raise ProxytuneError(f"dvc: not installed for {sys.executable} (install proxytune with its dependencies)")
    return [sys.executable, "-m", "dvc"]


def dvc_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment DVC runs in. The interpreter's own bin folder comes first on PATH: DVC runs each
    stage's `proxytune stage ...` through a shell, which must find the `proxytune` installed beside it."""
    env = {**os.environ, **DVC_ENV, **(extra or {})}
    bin_dir = str(Path(sys.executable).parent)
    rest = [entry for entry in env.get("PATH", "").split(os.pathsep) if entry and entry != bin_dir]
    env["PATH"] = os.pathsep.join([bin_dir, *rest])
    return env


def in_git_repo(root: Path) -> bool:
    try:
        out = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=root, capture_output=True, text=True)
    except OSError:
        return False
    return out.returncode == 0 and Path(out.stdout.strip()).resolve() == root.resolve()


def in_git_work_tree(root: Path) -> bool:
    """Whether root is inside any git work tree (its own or a parent's)."""
    try:
        out = subprocess.run(["git", "rev-parse", "--is-inside-work-tree"], cwd=root, capture_output=True, text=True)
    except OSError:
        return False
    return out.returncode == 0 and out.stdout.strip() == "true"


def _dvc_config_text(root: Path) -> str:
    texts = []
    for name in ("config", "config.local"):
        try:
            texts.append((root / ".dvc" / name).read_text())
        except OSError:
            pass
    return "\n".join(texts)


def ensure_dvc(root: Path) -> None:
    """`dvc init` (with --no-scm when root is not a git repository) once per project.

    A .dvc/ made inside git but used outside any git work tree (a source archive of the project: the
    committed .dvc/config has no `no_scm`) makes every DVC command fail with "is not a git repository";
    such a checkout gets `core.no_scm = true` in its own, git-ignored .dvc/config.local.
    """
    if (root / ".dvc").is_dir():
        if "no_scm" not in _dvc_config_text(root) and not in_git_work_tree(root):
            args = [*_dvc(), "config", "--local", "core.no_scm", "true"]
            result = subprocess.run(args, cwd=root, env=dvc_env(), capture_output=True, text=True)
            if result.returncode != 0:
                last = (result.stderr.strip().splitlines() or ["?"])[-1]
                raise ProxytuneError(f"{root / '.dvc'}: not inside a git work tree, and setting core.no_scm failed: {last}")
        return
    args = [*_dvc(), "init", "-q"] + ([] if in_git_repo(root) else ["--no-scm"])
    result = subprocess.run(args, cwd=root, env=dvc_env(), capture_output=True, text=True)
    if result.returncode != 0:
        raise ProxytuneError(f"dvc init failed in {root}: {(result.stderr.strip().splitlines() or ['?'])[-1]}")


def stale_stages(root: Path, targets: list[str]) -> list[str]:
    """Stages among `targets` and their upstream that `dvc repro` would run."""
    import json

    result = subprocess.run(
        [*_dvc(), "status", "--json", "--with-deps", *targets], cwd=root, env=dvc_env(), capture_output=True, text=True
    )
    if result.returncode != 0:
        raise ProxytuneError(f"dvc status failed: {(result.stderr.strip().splitlines() or ['?'])[-1]}")
    return sorted(json.loads(result.stdout or "{}"))


def repro(root: Path, targets: list[str], env: dict[str, str]) -> int:
    """Run `dvc repro` on the targets, streaming its output (and the stages' progress bars)."""
    return subprocess.run([*_dvc(), "repro", *targets], cwd=root, env=dvc_env(env)).returncode


def dvc_status(root: Path, stages: list[str]) -> dict | None:
    """`dvc status --json` of exactly these stages (no upstream); None when DVC cannot tell."""
    import json

    if not stages:
        return {}
    try:
        result = subprocess.run(
            [*_dvc(), "status", "--json", *stages], cwd=root, env=dvc_env(), capture_output=True, text=True, timeout=120
        )
        return json.loads(result.stdout or "{}") if result.returncode == 0 else None
    except (OSError, subprocess.SubprocessError, ValueError, ProxytuneError):
        return None


@contextlib.contextmanager
def project_lock(root: Path, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold the project's exclusive lock: one `apply` (or `compile`) at a time per project.

    Two applies in one project would race on dvc.yaml (read, merge, write) and on DVC's own lock,
    which makes a concurrent `dvc repro` fail rather than wait. With this lock the second apply
    waits (calling `on_wait` once), then compiles on top of the first one's dvc.yaml and runs only
    what is still stale. It is a `filelock` lock on .proxytune/apply.lock (flock(2) on POSIX, msvcrt
    locking on Windows): the operating system releases it when the holder exits or is
    killed, so a crash never leaves a stale lock behind.
    """
    from filelock import FileLock, Timeout

    folder = root / LOCK_DIR
    folder.mkdir(exist_ok=True)
    if not (folder / ".gitignore").exists():
        (folder / ".gitignore").write_text("*\n")
    lock = FileLock(folder / "apply.lock")
    try:
        lock.acquire(blocking=False)
    except Timeout:
        if on_wait is not None:
            on_wait()
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


# -- an apply that was killed ------------------------------------------------------------------------
APPLY_STATE = "apply.json"  # in LOCK_DIR while an apply runs stages; what a killed apply leaves behind


def unfinished_apply(root: Path) -> dict | None:
    """{"pid", "uris"} of an earlier apply in this project that was killed before it ended, else None.

    Read under the project lock: no other apply of this project runs now.
    """
    import json

    try:
        state = json.loads((root / LOCK_DIR / APPLY_STATE).read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def record_apply(root: Path, uris: list[str]) -> None:
    """Note this apply and its tracking URIs until `end_apply`: the next apply sees a killed one."""
    from proxytune.files import write_json_atomic

    write_json_atomic(root / LOCK_DIR / APPLY_STATE, {"pid": os.getpid(), "uris": sorted(set(uris))})


def end_apply(root: Path) -> None:
    (root / LOCK_DIR / APPLY_STATE).unlink(missing_ok=True)


def release_dead_dvc_locks(root: Path) -> list[int]:
    """Remove the entries of dead processes from DVC's stage lock file (.dvc/tmp/rwlock); their pids.

    A `dvc repro` killed during a stage leaves its entry there, and the next one removes it with
    "WARNING: Process ... had been killed. Auto removed it from the lock file."; `apply` says this
    in its own words instead. Called under the project lock (no `dvc repro` of ours is running);
    a file of another shape than DVC 3's {"read": {path: [info]}, "write": {path: info}} is left
    alone (DVC then warns as before).
    """
    import json

    path = root / ".dvc" / "tmp" / "rwlock"
    try:
        lock = json.loads(path.read_text())
        write, read = lock.get("write", {}), lock.get("read", {})
        infos = list(write.values()) + [info for readers in read.values() for info in readers]
        pids = {int(info["pid"]) for info in infos}
    except (OSError, ValueError, AttributeError, TypeError, KeyError):
        return []
    dead = sorted(pid for pid in pids if not process_alive(pid))
    if not dead:
        return []
    kept = {"write": {k: v for k, v in write.items() if int(v["pid"]) not in dead},
            "read": {k: [i for i in v if int(i["pid"]) not in dead] for k, v in read.items()}}
    kept = {mode: {k: v for k, v in entries.items() if v} for mode, entries in kept.items()}
    write_text_atomic(path, json.dumps({mode: entries for mode, entries in kept.items() if entries}))
    return dead
