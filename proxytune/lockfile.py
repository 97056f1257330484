"""The lock of the tested set: `constraints.txt` at the repository root.

It pins every distribution that proxytune[dev] installs (`name==version`, pip's constraints format)
at the version the tests passed with, on Python 3.11 / Linux x86_64. The README's setup command
installs through it (`pip install -e ".[dev]" -c constraints.txt`), `.ci/run` does the same in a new
virtualenv, and every stage run records the lock's digest (see proxytune.versions).

Refresh it on purpose, with one command from the repository root:

    python -m proxytune.lockfile refresh [-- PYTEST ARGS]

It creates a new virtualenv in a temporary folder, installs torch and `-e ".[dev]"` there without
the lock (so pip takes the newest releases pyproject's ranges allow), writes their versions to
constraints.txt, runs `python -m pytest` there (default `-q`: the whole suite) and prints the versions
that moved, for the commit message. When the tests fail (or the run is interrupted) the old lock is
put back.
"""

from __future__ import annotations

import hashlib
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

from proxytune.errors import ProxytuneError

LOCK_FILE = "constraints.txt"
TORCH = "torch==2.13.0"  # installed first, alone: as the README's setup command does
NOT_LOCKED = {"pip", "proxytune"}  # the installer itself, and the project the lock is for
PIN = re.compile(r"^([A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)==([A-Za-z0-9][A-Za-z0-9.!+_-]*)$")


def normalize(name: str) -> str:
    """PEP 503 name: 'Flask_CORS' and 'flask-cors' are one project."""
    return re.sub(r"[-_.]+", "-", name).lower()


def public(version: str) -> str:
    """The version without a local label: '2.13.0+cpu' -> '2.13.0' (the lock pins public versions, so
    that a CPU build and PyPI's build of one release both satisfy it)."""
    return version.split("+", 1)[0]


def parse(text: str, source: str = LOCK_FILE) -> dict[str, str]:
    """{normalized name: version} of a lock; comments and blank lines are skipped.

    Raises:
        ProxytuneError: a line that is not NAME==VERSION, or a name pinned twice (one line, naming it).
    """
    pins: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = PIN.match(line)
        if match is None:
            raise ProxytuneError(f"{source}:{number}: expected NAME==VERSION, got {line!r}")
        name = normalize(match.group(1))
        if name in pins:
            raise ProxytuneError(f"{source}:{number}: {name} is pinned twice")
        pins[name] = match.group(2)
    return pins


def digest(pins: dict[str, str]) -> str:
    """sha256 of the sorted `name==version` lines: the set, not the file's comments or order."""
    body = "".join(f"{name}=={pins[name]}\n" for name in sorted(pins))
    return hashlib.sha256(body.encode()).hexdigest()


def render(pins: dict[str, str], tests: str) -> str:
    header = [
        "# The tested set: every distribution proxytune[dev] installs, at the version the tests passed with.",
        "# Made by `python -m proxytune.lockfile refresh` (a new virtualenv, the newest releases pyproject allows,",
        f"# then `{tests}`, which passed) on Python {platform.python_version()}, {platform.system()} {platform.machine()}.",
        "# Used by the README's setup command: pip install -e \".[dev]\" -c constraints.txt. Do not edit by hand.",
    ]
    return "\n".join(header + [f"{name}=={pins[name]}" for name in sorted(pins)]) + "\n"


def lock_path() -> Path | None:
    """constraints.txt of the source tree this package runs from (it may be missing there); None for
    an installed wheel, which carries no lock."""
    root = Path(__file__).resolve().parents[1]
    return root / LOCK_FILE if (root / "pyproject.toml").is_file() else None


def read(path: Path) -> dict[str, str]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ProxytuneError(f"{path}: the lock is missing") from None
    except OSError as err:
        raise ProxytuneError(f"{path}: cannot read the lock ({err.strerror or err})") from None
    return parse(text, str(path))


def current_pins() -> dict[str, str]:
    """Pins of every distribution in this interpreter's environment, but pip and proxytune."""
    from importlib import metadata

    pins: dict[str, str] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name and normalize(name) not in NOT_LOCKED:
            pins.setdefault(normalize(name), public(dist.version))  # the first on sys.path is the one imported
    return pins


def moves(old: dict[str, str], new: dict[str, str]) -> list[str]:
    """What changed from one lock to the next, one line each: 'transformers 5.23.0 -> 5.24.0'."""
    lines = []
    for name in sorted(set(old) | set(new)):
        if name not in new:
            lines.append(f"{name} {old[name]} removed")
        elif name not in old:
            lines.append(f"{name} {new[name]} added")
        elif old[name] != new[name]:
            lines.append(f"{name} {old[name]} -> {new[name]}")
    return lines


def _write(path: Path, data: bytes) -> None:
    staged = path.with_name(f".{path.name}.tmp")
    staged.write_bytes(data)
    os.replace(staged, path)


def _run(command: list[str], cwd: Path, env: dict[str, str] | None = None) -> None:
    print(f"+ {shlex.join(command)}", flush=True)
    done = subprocess.run(command, cwd=cwd, env=env)
    if done.returncode != 0:
        raise ProxytuneError(f"`{shlex.join(command)}` exited {done.returncode}; {LOCK_FILE} is unchanged")


def refresh(root: Path, pytest_args: list[str], python: str = sys.executable, keep: bool = False) -> list[str]:
    """New virtualenv, unlocked install, tests; on success rewrite root/constraints.txt. Returns the moves."""
    if not (root / "pyproject.toml").is_file():
        raise ProxytuneError(f"{root}: not the proxytune repository (no pyproject.toml); run from its root")
    lock = root / LOCK_FILE
    old = read(lock) if lock.exists() else {}
    work = Path(tempfile.mkdtemp(prefix="proxytune-lock-"))
    try:
        venv = work / "venv"
        _run([python, "-m", "venv", str(venv)], root)
        vpy = str(venv / "bin" / "python")
        env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PIP_CONSTRAINT")}
        _run([vpy, "-m", "pip", "install", TORCH], root, env)
        _run([vpy, "-m", "pip", "install", "-e", ".[dev]"], root, env)
        out = subprocess.run([vpy, "-m", "proxytune.lockfile", "freeze"], cwd=root, env=env, capture_output=True, text=True)
        if out.returncode != 0:
            raise ProxytuneError(f"listing the new virtualenv failed: {out.stderr.strip().splitlines()[-1:]}")
        new = parse(out.stdout, "the new virtualenv")
        tests = shlex.join(["python", "-m", "pytest", *pytest_args])
        # The tests run with the new lock in place (they check it against pyproject and record its
        # digest); anything but a pass puts the old one back.
        previous = lock.read_bytes() if lock.exists() else None
        _write(lock, render(new, tests).encode())
        try:
            _run([vpy, "-m", "pytest", *pytest_args], root, {**env, "PROXYTUNE_HOME": str(work / "home")})
        except BaseException:
            if previous is None:
                lock.unlink()
            else:
                _write(lock, previous)
            raise
    finally:
        if keep:
            print(f"kept the virtualenv: {work / 'venv'}")
        else:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
    return moves(old, new)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m proxytune.lockfile", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    cmd = sub.add_parser("refresh", help="new venv, newest allowed releases, tests; on success rewrite constraints.txt")
    cmd.add_argument("--python", default=sys.executable, help="interpreter for the new virtualenv (default: this one)")
    cmd.add_argument("--keep-venv", action="store_true", help="keep the temporary virtualenv and print its path")
    cmd.add_argument("pytest_args", nargs="*", help="after --: arguments for python -m pytest (default: -q)")
    sub.add_parser("freeze", help="print this environment's pins (used inside the new virtualenv)")
    args = parser.parse_args(argv)
    try:
        if args.command == "freeze":
            pins = current_pins()
            sys.stdout.write("".join(f"{name}=={pins[name]}\n" for name in sorted(pins)))
            return 0
        root = Path.cwd()
        moved = refresh(root, args.pytest_args or ["-q"], args.python, args.keep_venv)
        pins = read(root / LOCK_FILE)
        print(f"wrote {LOCK_FILE}: {len(pins)} pins, digest {digest(pins)[:16]}")
        print("moved:" if moved else "no version moved")
        for line in moved:
            print(f"  {line}")
        return 0
    except ProxytuneError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
