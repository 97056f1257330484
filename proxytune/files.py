"""Small file helpers: atomic writes, content digests, staging folders that appear whole or not at all."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def digest_files(entries: list[tuple[str, str]]) -> str:
    """One digest for a set of (relative name, sha256) pairs, independent of their order."""
    lines = "".join(f"{name}\t{sha}\n" for name, sha in sorted(entries))
    return sha256_bytes(lines.encode())


def folder_files(folder: str | Path) -> dict[str, Path]:
    """Every file under `folder` by its relative POSIX name, sorted by name."""
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}


def folder_digests(folder: str | Path) -> dict[str, str]:
    """The sha256 of every file under `folder`, by its relative POSIX name."""
    return {name: sha256_file(path) for name, path in folder_files(folder).items()}


def digest_dir(folder: str | Path) -> str:
    """One digest of a folder's files and their relative names."""
    return digest_files(list(folder_digests(folder).items()))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, then rename over `path`.

    An OSError without a file name (a failed write or fsync: ENOSPC on a full disk) gets `path` as
    its file name, so the one-line error the CLI prints names the file.
    """
    path = Path(path)
    try:
        _write_bytes_atomic(path, data)
    except OSError as err:
        if err.filename is None:
            err.filename = str(path)
        raise


def _write_bytes_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual permissions
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_png_atomic(path: str | Path, image) -> None:
    """Save a PIL image as PNG with `write_bytes_atomic` (a crash never leaves a truncated image)."""
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    write_bytes_atomic(path, buffer.getvalue())


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def write_json_atomic(path: str | Path, data: object) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}  # EDQUOT: over a disk quota


def write_problem(folder: str | Path, *, create: bool = False) -> str | None:
    """Why a new file cannot be written in `folder` (its OSError's text), else None; found by making and
    removing a probe file there (after creating the folder when `create`). A full disk is raised as is:
    the CLI's own line names it and says that a re-run resumes."""
    folder = Path(folder)
    try:
        if create:
            folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".proxytune-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        if err.errno in DISK_FULL:
            raise
        return "a file, not a folder" if folder.is_file() else err.strerror or type(err).__name__
    return None


def check_new_folder(path: str | Path) -> None:
    """Before a command that writes a new folder reads anything: `path` must not exist yet, and its
    parent must be an existing folder this process can write in.

    Raises:
        ProxytuneError: one line naming the path and the fix.
    """
    from proxytune.errors import ProxytuneError

    path = Path(path)
    if path.is_file():
        raise ProxytuneError(f"{path}: a file already has this name; choose a new folder")
    if path.exists():
        state = "is empty" if path.is_dir() and not any(path.iterdir()) else "is not empty"
        raise ProxytuneError(f"{path}: already exists and {state}; choose a new folder (it is written whole or not at all)")
    parent = Path(os.path.abspath(path)).parent
    if not parent.is_dir():
        what = "is a file" if parent.exists() else "does not exist"
        raise ProxytuneError(f"{path}: its parent folder {parent} {what}; create the folder first or choose another one")
    problem = write_problem(parent)
    if problem:
        raise ProxytuneError(f"{path}: cannot write in {parent} ({problem}); choose a folder you can write")


@contextlib.contextmanager
def staged_dir(final: str | Path) -> Iterator[Path]:
    """Yield a fresh temp folder beside `final`; on success it replaces `final` in one rename.

    On an exception the temp folder is removed and `final` is left as it was, so a stage output
    is either complete or absent.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.staging-", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def link_or_copy(src: str | Path, dst: str | Path) -> None:
    """Hard-link `src` to `dst` (no copy of a large image set on one file system), else copy it."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def canonical_safetensors(data: bytes) -> bytes:
    """The same .safetensors bytes with the header's keys in sorted order.

    The safetensors writer keeps `__metadata__` in a hash map whose order changes between
    processes, so the same tensors and metadata can give different bytes. Sorting the header makes
    the file a function of its content (same spec + seed => byte-identical outputs).
    """
    import struct

    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    body = data[8 + length :]
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format allows space padding; keep tensors 8-byte aligned
    return struct.pack("<Q", len(text)) + text + body


def safetensors_bytes(tensors: dict, metadata: dict[str, str] | None = None) -> bytes:
    """`safetensors.torch.save` in canonical form: every writer of a .safetensors output uses this."""
    from safetensors.torch import save

    return canonical_safetensors(save(tensors, metadata=metadata))


def canonicalize_safetensors(path: str | Path) -> None:
    """Rewrite a .safetensors file another library wrote (diffusers, peft) in canonical form."""
    path = Path(path)
    write_bytes_atomic(path, canonical_safetensors(path.read_bytes()))


def process_alive(pid: int) -> bool:
    """Whether a process with this pid exists and is not a zombie.

    A process killed with its parent stays a zombie until someone reaps it (in a container whose
    init does not, for ever); signal 0 still reaches it, so /proc's state decides."""
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc (not Linux): trust the signal
    return stat[stat.rindex(")") + 2 :].split()[0] not in ("Z", "X")
