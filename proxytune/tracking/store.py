"""Where runs are stored: tracking URIs, the MLflow client, experiments, the tags every run carries
(git commit, versions, owning process), closing runs whose process died, the server probe, and where
an artifact of the embedded store is now that its project may have been moved or copied."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
from pathlib import Path

from proxytune.errors import ProxytuneError
from proxytune.tracking import guard

TAG = "proxytune."  # prefix of every tag we write

logging.getLogger("alembic").setLevel(logging.WARNING)


def load_mlflow():
    """The mlflow module, imported on first use: it takes ~1.5 s and most CLI calls never need it."""
    import mlflow

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    return mlflow


def registry_dir(root: Path) -> Path:
    return (root / "registry").resolve()


def resolve_uri(spec_uri: str | None, root: Path, create: bool = True) -> str:
    """Spec value, else $MLFLOW_TRACKING_URI, else the embedded sqlite store under root/registry.

    Raises:
        ProxytuneError: `create` is False and root has no embedded store (a registry command run
            outside the project must not leave an empty registry behind).
    """
    uri = spec_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        db = guard.sqlite_path(uri)
        if not create and db is not None and not db.exists():
            raise ProxytuneError(f"{db}: no MLflow store there (tracking URI {uri}); check the path")
        return uri
    folder = registry_dir(root)
    if not create and not (folder / "mlflow.db").exists():
        raise ProxytuneError(f"{folder / 'mlflow.db'}: no registry here; run this in the project folder "
                             "(where `proxytune apply` ran), or give --uri")
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}"


def _is_embedded(uri: str) -> bool:
    return uri.startswith("sqlite:")


def connect(uri: str):
    """Point mlflow at `uri` and return a client whose failures are one line (`guard`).

    Raises:
        ProxytuneError: the store is unusable (`guard.prepare`: corrupt, locked too long, no server).
    """
    guard.prepare(uri)
    mlflow = load_mlflow()
    with guard.translated(uri):  # an unsupported URI fails here
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    return guard.Client(client, uri)


def artifact_uri(uri: str, stored: str, run_id: str | None) -> str:
    """Where an artifact that run `run_id` logged to `stored` is now.

    The embedded store (`PROJECT/registry/mlflow.db`) records absolute file URIs under
    `PROJECT/registry/artifacts`; once the project is moved or copied they name the old place, so
    they are read against the registry folder the store is in now. Every other store keeps its URIs.
    """
    db = guard.sqlite_path(uri)
    if db is None or db.parent.name != "registry" or not run_id or not stored.startswith("file:"):
        return stored
    marker = f"/{run_id}/artifacts"
    head, found, tail = stored.partition(marker)
    if not found or not head.endswith("/registry/artifacts"):
        return stored
    return (db.parent.resolve() / "artifacts").as_uri() + marker + tail


def experiment_id(name: str, uri: str, root: Path) -> str:
    client = connect(uri)
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    if _is_embedded(uri):
        location = (registry_dir(root) / "artifacts").as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:  # created concurrently by another process
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def git_commit(root: Path) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def version_tags() -> dict[str, str]:
    """proxytune.version.{python,proxytune,torch,diffusers,transformers,peft,accelerate},
    proxytune.lock_digest and proxytune.lock_status (and proxytune.version_problems when a known
    incompatibility holds): what a bug report needs. Package metadata only; never fails a run."""
    from proxytune import versions

    try:
        found = versions.report().tags()
    except Exception as err:  # unreadable metadata must not cost a training run
        found = {"version_error": f"{type(err).__name__}: {err}"[:4000]}
    return {TAG + k: v for k, v in found.items()}


def _start_ticks(pid: int) -> str | None:
    """When process `pid` started, in clock ticks since boot (Linux /proc), or None where unreadable."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22, starttime; the name before ")" may hold spaces


def owner_tags() -> dict[str, str]:
    """proxytune.pid, proxytune.host and proxytune.pid_start of this process: on every run it starts,
    so that a later apply or audit can tell a run whose process was killed (`close_ghost_runs`)."""
    pid = os.getpid()
    start = _start_ticks(pid)
    return {f"{TAG}pid": str(pid), f"{TAG}host": socket.gethostname(), **({f"{TAG}pid_start": start} if start else {})}


def _owner_gone(tags: dict[str, str]) -> bool | None:
    """Whether a run's process is gone: True (no such pid on this host, or the pid now belongs to a
    process that started later), False (alive), None (another host, or no owner recorded)."""
    pid, host = tags.get(f"{TAG}pid", ""), tags.get(f"{TAG}host")
    if not pid.isdigit() or host != socket.gethostname():
        return None
    from proxytune.files import process_alive

    if not process_alive(int(pid)):
        return True
    recorded, now = tags.get(f"{TAG}pid_start"), _start_ticks(int(pid))
    return recorded is not None and now is not None and now != recorded


GHOST_KINDS = ("apply", "stage", "report")  # proxytune.kind of the runs proxytune starts


def close_ghost_runs(uri: str) -> tuple[list, list]:
    """Mark proxytune's RUNNING runs whose process is gone KILLED.

    Returns (runs marked KILLED, RUNNING runs this host cannot judge: started on another host or
    with no owner recorded). Runs of live processes are left alone.
    """
    client = connect(uri)
    killed, unknown = [], []
    for run in all_runs(client, "attributes.status = 'RUNNING'"):
        tags = run.data.tags
        if tags.get(f"{TAG}kind") not in GHOST_KINDS:
            continue
        gone = _owner_gone(tags)
        if gone:
            client.set_terminated(run.info.run_id, status="KILLED")
            killed.append(run)
        elif gone is None:
            unknown.append(run)
    return killed, unknown


def describe_run(run) -> str:
    """'run ID (NAME, experiment E, pid P on HOST)': how a ghost run is named in messages."""
    tags = run.data.tags
    owner = (f"pid {tags[TAG + 'pid']} on {tags.get(TAG + 'host', '?')}" if TAG + "pid" in tags
             else "no owner recorded")
    return f"run {run.info.run_id} ({run.info.run_name}, experiment {run.info.experiment_id}, {owner})"


def all_runs(client, filter_string: str) -> list:
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs, token = [], None
    while experiments:
        page = client.search_runs(experiments, filter_string=filter_string, max_results=1000, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            break
    return runs


def run_tag(run, key: str) -> str | None:
    return run.data.tags.get(TAG + key)


def find_run(client, run_id: str | None):
    """The run, or None when there is no such run (a store that fails is still an error)."""
    try:
        return client.get_run(run_id) if run_id else None
    except ProxytuneError:
        raise
    except Exception:
        return None


def load_json_artifact(uri: str, run_id: str, path: str) -> object | None:
    """A JSON artifact of a run (found where `artifact_uri` says), or None when it is missing or not JSON."""
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"  # a small JSON: no progress bar
    run = find_run(connect(uri), run_id)
    if run is None:
        return None
    try:
        return load_mlflow().artifacts.load_dict(f"{artifact_uri(uri, run.info.artifact_uri, run_id)}/{path}")
    except Exception:
        return None


def remote_uri(spec_uri: str | None) -> str | None:
    """The tracking URI a spec resolves to when it is an MLflow server (http/https), else None."""
    uri = spec_uri or os.environ.get("MLFLOW_TRACKING_URI")
    return uri if uri and uri.lower().startswith(("http://", "https://")) else None


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Ask the server's /health, waiting at most `timeout` seconds.

    Raises:
        ProxytuneError: nothing answers (refused, unknown host, timeout) or the server answers 5xx.
    """
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):
            return
    except urllib.error.HTTPError as err:
        if err.code < 500:
            return  # something answered (an auth proxy may guard /health): the server is there
        raise ProxytuneError(f"MLflow server {uri} answered HTTP {err.code}") from None
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", None) or err
        raise ProxytuneError(f"cannot reach the MLflow server {uri} ({reason}) within {timeout:g} s") from None
