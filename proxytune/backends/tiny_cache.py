"""The tiny-model cache, and where a spec's model reference points: a built-in tiny, a folder or a hub id.

Tiny architectures are random-initialised from a config with a fixed seed and saved once with
`save_pretrained` into a cache folder; from then on they load through exactly the same
`from_pretrained` calls as a real checkpoint, so the tiny path exercises the real one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from proxytune.errors import ProxytuneError

TINY_MARKER = "proxytune_tiny.json"  # present in every materialised tiny folder: weights are random
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def cache_root() -> Path:
    """Folder for materialised tiny models (PROXYTUNE_HOME, default ~/.cache/proxytune)."""
    return Path(os.environ.get("PROXYTUNE_HOME", Path.home() / ".cache" / "proxytune")).expanduser()


def check_cache_root() -> Path:
    """The tiny-model cache folder, created when missing, once a probe file could be written in it.

    Raises:
        ProxytuneError: PROXYTUNE_HOME (or ~/.cache/proxytune) is a file, lies under a file, or is not
            writable; one line naming it and the fix.
    """
    from proxytune.files import write_problem

    root = cache_root()
    name = "PROXYTUNE_HOME" if "PROXYTUNE_HOME" in os.environ else "the tiny-model cache (PROXYTUNE_HOME unset)"
    problem = write_problem(root, create=True)
    if problem:
        raise ProxytuneError(f"{name} {root}: {problem}; built-in tiny and toy models are cached there: set "
                             "PROXYTUNE_HOME to a folder you can write")
    return root


def materialize(key: str, build: Callable[[Path], None], *, random_init: bool = True) -> Path:
    """Build a tiny model folder once (into a temp dir, then an atomic rename) and return its path.

    `key` must change whenever the builder's output would. `random_init=False` is for folders made
    from trained weights (the toy world's): they get no TINY_MARKER. Concurrent callers (the processes of an
    `accelerate launch`, parallel test workers) take turns on a file lock: one builds, the others
    find the finished folder.
    """
    import fcntl

    target = cache_root() / "tiny" / key
    if (target / ".complete").exists():
        return target
    check_cache_root()
    target.parent.mkdir(parents=True, exist_ok=True)
    locks = cache_root() / "locks"
    locks.mkdir(exist_ok=True)
    with open(locks / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the holder dies
        if (target / ".complete").exists():
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=target.parent))
        try:
            import torch

            with torch.random.fork_rng(devices=[]):  # builders seed torch; the caller's RNG must not move
                build(tmp)
            if random_init:
                (tmp / TINY_MARKER).write_text(json.dumps({"name": key, "random_init": True}) + "\n")
            (tmp / ".complete").write_text("ok\n")
            if target.exists():  # a half-built folder from a crash
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve(ref: str, builtins: dict[str, Callable[[], Path]], *, what: str) -> str:
    """Turn a spec model field into something `from_pretrained` accepts.

    Args:
        ref: a built-in tiny name, a local directory, or a hub id ("org/name").
        builtins: tiny name -> function returning its materialised folder.
        what: the role, for error messages ("teacher model").
    Raises:
        ProxytuneError: when `ref` is none of the three.
    """
    if ref in builtins:
        return str(builtins[ref]())
    path = Path(ref).expanduser()
    if path.is_dir():
        return str(path.resolve())
    if ref.startswith((".", "/", "~")) or os.sep in ref and not HUB_ID.match(ref):
        raise ProxytuneError(f"{what} {ref!r}: no such local directory")
    if HUB_ID.match(ref):
        return ref
    names = ", ".join(sorted(builtins))
    raise ProxytuneError(f"unknown {what} {ref!r}: use a built-in ({names}), a local directory or a hub id")


def is_random_init(path: str | Path) -> bool:
    """True for a materialised tiny model (random weights): reports must say so."""
    return (Path(path) / TINY_MARKER).exists()
