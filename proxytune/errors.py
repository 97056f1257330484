"""User-facing errors: the CLI prints these as one line and exits with code 2."""


class ProxytuneError(Exception):
    """Bad input or an unrecoverable condition a user can fix (spec, images, model names, paths)."""


class SpecError(ProxytuneError):
    """A spec file failed to parse or validate; the message names the file and the key path."""


def first_line(err: BaseException) -> str:
    """`err` as one line for a message: its type and the first line of its text ("OSError: ...")."""
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def disk_full_message(err: BaseException, fallback: str | None = None) -> str | None:
    """One line for a full disk anywhere in `err`'s chain of causes, else None.

    A full disk is an OSError with ENOSPC or EDQUOT, or SQLite's "database or disk is full" (the
    embedded MLflow store). The line names the file (the error's own, else `fallback`, else the
    current folder) and the free space left on its file system, and says that a re-run resumes.
    """
    import errno
    import os
    import shutil
    import sqlite3
    from pathlib import Path

    codes = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}  # EDQUOT: over a disk quota
    seen, path, found = set(), None, False
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in codes:
            found, path = True, err.filename
            break
        if isinstance(err, sqlite3.OperationalError) and "disk is full" in str(err):
            found = True
            break
        err = err.__cause__ or err.__context__
    if not found:
        return None
    where = Path(os.fsdecode(path) if path is not None else (fallback or os.getcwd()))
    probe = where if where.exists() else next((p for p in where.parents if p.exists()), Path("/"))
    try:
        free = f"{shutil.disk_usage(probe).free / 2**20:.0f} MiB free there"
    except OSError:
        free = "free space unknown"
    return f"{where}: no space left on device ({free}); free some space and re-run the same command to resume"


def access_message(err: BaseException) -> str | None:
    """One line for a file or folder this process may not use (permission denied, a read-only file
    system) anywhere in `err`'s chain of causes, else None. The line names the path and the fix."""
    import errno
    import os

    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            where = os.fsdecode(err.filename) if err.filename is not None else os.getcwd()
            if err.errno == errno.EROFS:
                return f"{where}: on a read-only file system; work in a writable folder and re-run the same command"
            return (f"{where}: permission denied; give this user access to it (or work in a folder you own) and "
                    "re-run the same command")
        err = err.__cause__ or err.__context__
    return None
