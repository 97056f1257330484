"""The store's failures as one line each, in one place: a corrupt, locked or read-only embedded SQLite
store and an MLflow server that does not answer.

`prepare` runs once per store and process before MLflow touches it: it bounds MLflow's HTTP retries
(a dead server otherwise costs minutes), asks a server's /health, and checks an embedded store with
the standard library's sqlite3 (a valid MLflow database; no other process holding its lock, waiting a
bounded time and saying so). `Client` wraps an MlflowClient so that whatever a call raises later is
translated by `translate`, and what MLflow logs on the way (SQLAlchemy's tracebacks) is dropped when
the failure becomes one line.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import sys
import time
import urllib.parse
from pathlib import Path

from proxytune.errors import ProxytuneError

LOCK_WAIT_ENV = "PROXYTUNE_REGISTRY_WAIT"  # seconds to wait for another process's lock on the store
LOCK_WAIT_S = 30.0
QUIET_WAIT_S = 1.0  # a lock held for less than this is ordinary contention: wait without a word
HTTP_DEFAULTS = {  # MLflow's own are 7 retries and 120 s per request: about four minutes on a dead server
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}
MLFLOW_TABLES = {"experiments", "runs", "registered_models", "model_versions"}
_prepared: set[str] = set()


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///PATH` URI (also `sqlite:///file:PATH?...&uri=true`), else None."""
    if not uri.startswith("sqlite:///"):
        return None
    rest = uri[len("sqlite:///"):]
    rest = rest.split("?", 1)[0]
    if rest.startswith("file:"):
        rest = urllib.parse.unquote(rest[len("file:"):])
    return Path(rest).absolute() if rest and rest != ":memory:" else None


def is_server(uri: str) -> bool:
    return uri.lower().startswith(("http://", "https://"))


def prepare(uri: str) -> None:
    """Check the store `uri` names once per process, before MLflow opens it.

    Raises:
        ProxytuneError: the server does not answer; the database is not a valid MLflow store, or
            stays locked by another process longer than $PROXYTUNE_REGISTRY_WAIT seconds (30).
    """
    if uri in _prepared:
        return
    if is_server(uri):
        for key, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)  # the user's own setting wins
        from proxytune.tracking.store import check_reachable

        try:
            check_reachable(uri)
        except ProxytuneError as err:
            raise ProxytuneError(f"{err}; start it, or point --uri / MLFLOW_TRACKING_URI at one that runs") from None
    else:
        db = sqlite_path(uri)
        if db is not None:
            check_database(db)
    _prepared.add(uri)


def invalid_store(db: Path, detail: str) -> ProxytuneError:
    return ProxytuneError(f"{db}: not a valid MLflow store ({detail}); restore it from a backup, "
                          "or move it aside to start an empty registry")


def check_database(db: Path) -> None:
    """`db` is absent (MLflow creates it), or a readable MLflow database that no other process locks.

    Waits while another process holds the lock (saying so on stderr after `QUIET_WAIT_S`), at most
    $PROXYTUNE_REGISTRY_WAIT seconds. A database this process may not write is checked for reading only.
    """
    if not db.exists():
        return
    if not db.is_file():
        raise invalid_store(db, "not a file")
    try:
        wait = float(os.environ.get(LOCK_WAIT_ENV) or LOCK_WAIT_S)
    except ValueError:
        raise ProxytuneError(f"{LOCK_WAIT_ENV}={os.environ[LOCK_WAIT_ENV]!r}: not a number of seconds, e.g. 60") from None
    start, said = time.monotonic(), False
    while True:
        try:
            _probe(db)
            return
        except sqlite3.OperationalError as err:
            if "locked" not in str(err) and "busy" not in str(err):
                raise invalid_store(db, str(err)) from None
        except sqlite3.DatabaseError as err:
            raise invalid_store(db, str(err)) from None
        waited = time.monotonic() - start
        if waited >= wait:
            raise locked(db, waited)
        if not said and waited >= QUIET_WAIT_S:
            print(f"waiting for {db}: another process holds its lock (a running apply or promote?); "
                  f"giving up after {wait:g} s", file=sys.stderr, flush=True)
            said = True
        time.sleep(0.2)


def locked(db: Path, waited: float) -> ProxytuneError:
    return ProxytuneError(f"{db}: still locked by another process after {waited:.0f} s; let it finish "
                          f"(or stop it) and re-run, or wait longer with {LOCK_WAIT_ENV}=SECONDS")


def _probe(db: Path) -> None:
    """Read the schema and check the pages (read-only), then take and release the write lock where
    this process may write. Raises sqlite3 errors as they come."""
    writable = os.access(db, os.W_OK) and os.access(db.parent, os.W_OK)
    # read-write where allowed: a crashed writer's journal is rolled back as any later writer would
    con = sqlite3.connect(f"file:{urllib.parse.quote(str(db))}?mode={'rw' if writable else 'ro'}", uri=True, timeout=0)
    try:
        tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        problem = con.execute("PRAGMA quick_check(1)").fetchone()[0]
    finally:
        con.close()
    if problem != "ok":
        raise sqlite3.DatabaseError(f"database disk image is malformed: {problem}")
    if not tables and db.with_name("artifacts").is_dir() and any(db.with_name("artifacts").iterdir()):
        raise sqlite3.DatabaseError(f"no tables, while {db.with_name('artifacts')} beside it holds logged runs")
    if tables and not MLFLOW_TABLES <= tables:
        raise sqlite3.DatabaseError(f"an SQLite database without MLflow's tables ({', '.join(sorted(MLFLOW_TABLES - tables))})")
    if not writable:
        return
    con = sqlite3.connect(str(db), timeout=0, isolation_level=None)
    try:
        con.execute("BEGIN IMMEDIATE")  # fails at once while another connection holds the write lock
        con.execute("ROLLBACK")
    except sqlite3.OperationalError as err:
        if "readonly" not in str(err) and "unable to open" not in str(err):
            raise
    finally:
        con.close()


def translate(err: BaseException, uri: str) -> ProxytuneError | None:
    """One line for a store failure anywhere in `err`'s chain of causes, else None (a full disk is
    left to `errors.disk_full_message`)."""
    texts, seen = [], set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        texts.append(str(err))
        err = err.__cause__ or err.__context__
    text = "\n".join(texts)
    first = next((t.strip().splitlines()[0] for t in texts if t.strip()), "")
    for sign, what in (("unsupported URI", "a scheme MLflow does not support"),
                       ("filesystem tracking backend", "a folder (MLflow's retired file store)")):
        if sign in text:
            return ProxytuneError(f"tracking URI {uri!r}: {what}; give sqlite:///PATH/mlflow.db, "
                                  "http(s)://SERVER or a database URL (postgresql://, mysql://)")
    db = sqlite_path(uri)
    if db is not None:
        if "disk is full" in text:
            return None
        if "database is locked" in text:
            return ProxytuneError(f"{db}: locked by another process for longer than MLflow waits; let it finish "
                                  "(or stop it) and re-run")
        if "readonly database" in text:
            return ProxytuneError(f"{db}: the registry is read-only here and this command writes to it; run it "
                                  "where the registry is writable (reading commands such as `registry list` work)")
        if "unable to open database" in text:
            return ProxytuneError(f"{db}: cannot open it ({first[:200]}); check that its folder exists and is writable")
        for sign in ("file is not a database", "malformed", "no such table", "out-of-date database schema"):
            if sign in text:
                return invalid_store(db, next((t for t in text.splitlines() if sign in t), sign).strip()[:200])
    if is_server(uri) and any(sign in text for sign in ("Max retries exceeded", "Connection refused", "timed out",
                                                        "Failed to establish", "NameResolutionError")):
        return ProxytuneError(f"MLflow server {uri} does not answer ({first[:200]}); start it, or point --uri / "
                              "MLFLOW_TRACKING_URI at one that runs")
    return None


@contextlib.contextmanager
def translated(uri: str):
    """Run a block against the store: a failure `translate` knows becomes a ProxytuneError, and what
    MLflow logged meanwhile is dropped; anything else is re-raised after MLflow's log is replayed."""
    logger = logging.getLogger("mlflow")
    held: list[logging.LogRecord] = []
    catcher = logging.Handler()
    catcher.emit = held.append
    handlers, propagate = logger.handlers[:], logger.propagate
    logger.handlers, logger.propagate = [catcher], False
    try:
        yield
    except ProxytuneError:
        raise
    except Exception as err:
        line = translate(err, uri)
        if line is not None:
            held.clear()
            raise line from None
        raise
    finally:
        logger.handlers, logger.propagate = handlers, propagate
        for record in held:
            logger.handle(record)


class Client:
    """An MlflowClient whose every call runs inside `translated`."""

    def __init__(self, client, uri: str):
        self._client, self._uri = client, uri

    def __getattr__(self, name: str):
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            with translated(self._uri):
                return attr(*args, **kwargs)

        return call
