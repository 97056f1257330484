"""Registry layer: the only module that imports mlflow.

Each `proxytune apply` is a parent run per experiment; each stage a child run with its params,
metric curves and artifacts. Adapters become registered model versions named
EXPERIMENT.SUBJECT.ROLE, the proxy set a dataset input carrying its content digest, and run tags
carry the links that `proxytune lineage` walks.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import subprocess
import warnings
from dataclasses import dataclass
from pathlib import Path

from proxytune import faults
from proxytune.errors import ProxytuneError
from proxytune.files import digest_files, folder_digests, folder_files, sha256_file

RUN_ID = re.compile(r"^[0-9a-f]{32}$")
PARENT_RUNS_ENV = "PROXYTUNE_PARENT_RUNS"  # JSON {experiment: parent run id}, set by `apply`
TAG = "proxytune."  # prefix of every tag we write
FILES_TAG = "adapter_files"  # version tag (after TAG): JSON {relative file: sha256} of the adapter

logging.getLogger("alembic").setLevel(logging.WARNING)


def _mlflow():
    # Imported lazily: mlflow takes ~1.5 s to import and most CLI calls never need it.
    import mlflow

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    return mlflow


def registry_dir(root: Path) -> Path:
    return (root / "registry").resolve()


def resolve_uri(spec_uri: str | None, root: Path) -> str:
    """Spec value, else $MLFLOW_TRACKING_URI, else the embedded sqlite store under root/registry."""
    if spec_uri:
        return spec_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    folder = registry_dir(root)
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}"


def _is_embedded(uri: str) -> bool:
    return uri.startswith("sqlite:")


def connect(uri: str):
    """Point mlflow at `uri` and return a client."""
    mlflow = _mlflow()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


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
    for run in _all_runs(client, "attributes.status = 'RUNNING'"):
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


def registered_name(experiment: str, subject: str, role: str) -> str:
    return f"{experiment}.{subject}.{role}"


def start_parent_run(experiment: str, uri: str, root: Path, tags: dict[str, str]) -> str:
    """Create the parent run of one apply and return its id (stages attach to it as children)."""
    client = connect(uri)
    run = client.create_run(
        experiment_id(experiment, uri, root),
        run_name="apply",
        tags={f"{TAG}kind": "apply", **{TAG + k: v for k, v in tags.items()}, **version_tags(), **owner_tags()},
    )
    return run.info.run_id


def end_parent_run(run_id: str, uri: str, status: str) -> None:
    connect(uri).set_terminated(run_id, status=status)


@dataclass
class StageRun:
    """One stage's child run. Use as a context manager; failures mark the run FAILED."""

    experiment: str  # the spec's name: registered models are EXPERIMENT.SUBJECT.ROLE
    subject: str
    stage: str
    uri: str
    root: Path
    tags: dict[str, str]
    mlflow_experiment: str | None = None  # defaults to `experiment`
    git_commit: str | None = None  # set on entry: HEAD of the project's git repository, if any

    def __enter__(self) -> "StageRun":
        mlflow = _mlflow()
        connect(self.uri)
        parent = json.loads(os.environ.get(PARENT_RUNS_ENV, "{}")).get(self.experiment)
        tags = {
            f"{TAG}kind": "stage",
            f"{TAG}stage": self.stage,
            f"{TAG}experiment": self.experiment,
            f"{TAG}subject": self.subject,
            **{TAG + k: str(v) for k, v in self.tags.items()},
        }
        commit = self.git_commit = git_commit(self.root)
        if commit:
            tags["mlflow.source.git.commit"] = commit
        tags |= version_tags() | owner_tags()
        self._run = mlflow.start_run(
            experiment_id=experiment_id(self.mlflow_experiment or self.experiment, self.uri, self.root),
            run_name=f"{self.stage}:{self.subject}",
            parent_run_id=parent,
            tags=tags,
        )
        self.run_id = self._run.info.run_id
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        _mlflow().end_run(status="FINISHED" if exc_type is None else "FAILED")

    # -- logging -----------------------------------------------------------------------------
    def log_params(self, params: dict) -> None:
        _mlflow().log_params({k: str(v)[:6000] for k, v in _flatten(params).items()})

    def log_metric(self, key: str, value: float, step: int | None = None) -> None:
        _mlflow().log_metric(key, float(value), step=step)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        _mlflow().log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_artifacts(self, folder: Path, artifact_path: str | None = None) -> None:
        _mlflow().log_artifacts(str(folder), artifact_path)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        _mlflow().log_artifact(str(path), artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        _mlflow().set_tags({TAG + k: str(v) for k, v in tags.items()})

    def log_dataset(self, folder: Path, name: str, digest: str, context: str) -> None:
        """Log a folder of images as a dataset input whose digest is its content digest."""
        mlflow = _mlflow()
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "source can be interpreted in multiple ways"
            source = resolve_dataset_source(str(folder.resolve()))
        # MetaDataset's own digest hashes only the source path; ours hashes the images.
        dataset = MetaDataset(source=source, name=name, digest=digest[:36])
        mlflow.log_input(dataset, context=context, tags={"digest_sha256": digest})

    def register(self, folder: Path, role: str, tags: dict[str, str]) -> str:
        """Log `folder` as artifact path `adapter` and register it as a model version; return the version.

        The sha256 of every file is recorded on the version (tag `proxytune.adapter_files`, beside
        the artifact `adapter_files.json` of the run): `registry pull` and `audit` check downloads
        against it. Version tags also carry the spec digest, the git commit (when there is one),
        backend, base model and subject.

        Idempotent: when a version of this model already holds the same adapter (`adapter_digest`)
        made from the same spec (`spec_digest`) -- e.g. registered by a stage that crashed before
        its output folder was renamed into place -- that version is reused, not duplicated.
        """
        client = connect(self.uri)
        files = folder_digests(folder)
        name = registered_name(self.experiment, self.subject, role)
        version_tags = {
            "role": role,
            "experiment": self.experiment,
            "subject": self.subject,
            **{k: self.tags[k] for k in ("spec_digest", "spec_file", "dvc_stage") if k in self.tags},
            **({"git_commit": self.git_commit} if self.git_commit else {}),
            **tags,
            "files_digest": digest_files(list(files.items())),
            FILES_TAG: json.dumps(files, sort_keys=True),
        }
        version_tags = {TAG + k: str(v) for k, v in version_tags.items()}
        self.log_dict(files, "adapter_files.json")
        try:
            client.get_registered_model(name)
        except Exception:
            try:
                client.create_registered_model(name, tags={f"{TAG}role": role})
            except Exception:
                pass  # created concurrently
        existing = _same_adapter_version(client, name, version_tags)
        if existing is not None:
            version = str(existing.version)
            self.set_tags({"reused_version": f"{name}@{version}"})
        else:
            self.log_artifacts(folder, "adapter")
            created = client.create_model_version(
                name, source=f"{self._run.info.artifact_uri}/adapter", run_id=self.run_id, tags=version_tags
            )
            version = str(created.version)
        client.set_registered_model_alias(name, "candidate", version)
        faults.checkpoint(self.stage, "registered")
        return version

    def log_series(self, key: str, values: list[float], first_step: int = 0) -> None:
        """Log a whole curve in batches (one sqlite write per 1000 points, not one per step)."""
        import time

        from mlflow.entities import Metric

        client = connect(self.uri)
        now = int(time.time() * 1000)
        points = [Metric(key, float(v), now, first_step + i) for i, v in enumerate(values)]
        for start in range(0, len(points), 1000):
            client.log_batch(self.run_id, metrics=points[start : start + 1000])

    def log_dict(self, data: dict, artifact_file: str) -> None:
        _mlflow().log_dict(data, artifact_file)


def _flatten(data: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


# -- registry queries -------------------------------------------------------------------------
def parse_ref(ref: str) -> tuple[str, str | None]:
    """'name@3' -> ('name', '3'); 'name@champion' -> ('name', 'champion'); 'name' -> ('name', None)."""
    name, _, version = ref.partition("@")
    if not name:
        raise ProxytuneError(f"{ref!r}: expected NAME[@VERSION|@ALIAS]")
    return name, version or None


def get_version(client, ref: str):
    name, version = parse_ref(ref)
    try:
        if version is None:
            versions = client.search_model_versions(f"name='{name}'")
            if not versions:
                raise ProxytuneError(f"{name}: registered model has no versions")
            return max(versions, key=lambda v: int(v.version))
        if version.isdigit():
            return client.get_model_version(name, version)
        return client.get_model_version_by_alias(name, version)
    except ProxytuneError:
        raise
    except Exception as err:
        raise ProxytuneError(f"{ref}: not in the registry ({str(err).splitlines()[0]})") from None


def list_versions(uri: str) -> list[dict]:
    client = connect(uri)
    rows = []
    for model in client.search_registered_models():
        aliases: dict[str, list[str]] = {}
        for alias, version in (model.aliases or {}).items():
            aliases.setdefault(str(version), []).append(alias)
        for version in sorted(client.search_model_versions(f"name='{model.name}'"), key=lambda v: int(v.version)):
            rows.append(
                {
                    "name": model.name,
                    "version": str(version.version),
                    "aliases": ",".join(sorted(aliases.get(str(version.version), []))),
                    "role": version.tags.get(f"{TAG}role", ""),
                    "base_model": version.tags.get(f"{TAG}base_model", ""),
                    "run_id": version.run_id,
                }
            )
    return rows


def pull(uri: str, ref: str, out_dir: Path) -> tuple[Path, str]:
    """Download a registered adapter into out_dir (atomically) and return (path, 'name@version')."""
    from proxytune.files import staged_dir

    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ProxytuneError(f"-o {out_dir}: already exists and is not an empty folder")
    client = connect(uri)
    version = get_version(client, ref)
    key = f"{version.name}@{version.version}"
    recorded = recorded_files(version)
    if recorded is None:
        raise ProxytuneError(f"{key}: no sha256 recorded for its files; refusing to pull what cannot be verified")
    with staged_dir(out_dir) as tmp:
        _download_adapter(version, tmp)
        problems = verify_files(tmp, recorded)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise ProxytuneError(f"{key}: refusing to pull a tampered or truncated artifact: {problems[0]}{more}")
    return out_dir, key


def _download_adapter(version, dest: Path) -> None:
    """Download a version's adapter folder; its files land at the top of `dest`."""
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    try:
        local = Path(_mlflow().artifacts.download_artifacts(artifact_uri=version.source, dst_path=str(dest / ".download")))
    except Exception as err:
        raise ProxytuneError(
            f"{version.name}@{version.version}: cannot download {version.source} ({str(err).splitlines()[0] if str(err) else type(err).__name__})"
        ) from None
    for child in local.iterdir():
        os.replace(child, dest / child.name)
    shutil.rmtree(dest / ".download")


def recorded_files(version) -> dict[str, str] | None:
    """{relative file: sha256} recorded at registration: the version tag, else the run's adapter_files.json."""
    raw = version.tags.get(TAG + FILES_TAG)
    if raw:
        try:
            files = json.loads(raw)
        except ValueError:
            files = None
    else:
        files = _load_json_artifact(version.run_id, "adapter_files.json") if version.run_id else None
    if not isinstance(files, dict) or not files:
        return None
    return {str(k): str(v) for k, v in files.items()}


def verify_files(folder: Path, recorded: dict[str, str]) -> list[str]:
    """Problems (one line each) between the files under `folder` and their recorded sha256."""
    present = folder_files(folder)
    problems = []
    for name, expected in sorted(recorded.items()):
        if name not in present:
            problems.append(f"{name}: missing")
            continue
        actual = sha256_file(present[name])
        if actual != expected:
            size = present[name].stat().st_size
            problems.append(f"{name}: sha256 {actual[:16]} does not match the recorded {expected[:16]} ({size} bytes)")
    problems += [f"{name}: not among the recorded files" for name in sorted(set(present) - set(recorded))]
    return problems


def _same_adapter_version(client, name: str, version_tags: dict[str, str]):
    """An existing version of `name` with the same adapter digest and spec digest, else None."""
    digest, spec = version_tags.get(f"{TAG}adapter_digest"), version_tags.get(f"{TAG}spec_digest")
    if not digest or not spec:
        return None
    for version in sorted(client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version)):
        tags = version.tags or {}
        if tags.get(f"{TAG}adapter_digest") == digest and tags.get(f"{TAG}spec_digest") == spec:
            return version
    return None


def _aliases_of(client, version) -> list[str]:
    model = client.get_registered_model(version.name)
    return sorted(alias for alias, v in (model.aliases or {}).items() if str(v) == str(version.version))


def show(uri: str, ref: str) -> dict:
    """One registered version: aliases, run, source, tags and its files with their recorded sha256."""
    client = connect(uri)
    version = get_version(client, ref)
    return {
        "ref": f"{version.name}@{version.version}",
        "name": version.name,
        "version": str(version.version),
        "aliases": _aliases_of(client, version),
        "run_id": version.run_id,
        "source": version.source,
        "status": str(version.status),
        "tags": {k: v for k, v in sorted(version.tags.items()) if k != TAG + FILES_TAG},
        "files": recorded_files(version) or {},
    }


def promote(uri: str, ref: str, alias: str) -> str:
    """Point `alias` (e.g. champion) at the version `ref` names; return 'name@version'."""
    client = connect(uri)
    version = get_version(client, ref)
    try:
        client.set_registered_model_alias(version.name, alias, version.version)
    except Exception as err:
        raise ProxytuneError(f"alias {alias!r}: {str(err).splitlines()[0]}") from None
    return f"{version.name}@{version.version}"


def _all_runs(client, filter_string: str) -> list:
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs, token = [], None
    while experiments:
        page = client.search_runs(experiments, filter_string=filter_string, max_results=1000, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            break
    return runs


def audit(uri: str) -> dict:
    """Re-hash every registered version's files, resolve every lineage link, close ghost runs.

    RUNNING runs whose process is gone are marked KILLED first (`close_ghost_runs`); a RUNNING run
    this host cannot judge (another host, no owner recorded) is a problem.

    Returns {"problems": [one line each], "killed": [one line per run marked KILLED], "versions": n,
    "files": n, "evaluations": n}.
    """
    import tempfile

    killed, unknown = close_ghost_runs(uri)
    client = connect(uri)
    versions = {}
    for model in client.search_registered_models():
        for version in client.search_model_versions(f"name='{model.name}'"):
            versions[f"{version.name}@{version.version}"] = version
    problems = [f"{describe_run(run)} is RUNNING; " + (
        "from here it cannot be told whether its process is alive: run `proxytune audit` on that host to close it"
        if TAG + "pid" in run.data.tags else
        "if no process runs it any more, close it with MlflowClient().set_terminated(run_id, 'KILLED')")
        for run in unknown]
    files_checked = 0

    def check_link(owner: str, what: str, ref: str | None) -> None:
        if not ref:
            problems.append(f"{owner}: no {what} recorded")
        elif ref not in versions:
            problems.append(f"{owner}: {what} {ref} is not in the registry")

    for key, version in sorted(versions.items(), key=lambda kv: (kv[1].name, int(kv[1].version))):
        run = _find_run(client, version.run_id)
        if run is None:
            problems.append(f"{key}: run {version.run_id} not found")
        recorded = recorded_files(version)
        if recorded is None:
            problems.append(f"{key}: no sha256 recorded for its files")
        else:
            with tempfile.TemporaryDirectory(prefix="proxytune-audit-") as tmp:
                try:
                    _download_adapter(version, Path(tmp))
                    problems += [f"{key}: {p}" for p in verify_files(Path(tmp), recorded)]
                    files_checked += len(recorded)
                except ProxytuneError as err:
                    problems.append(str(err))
            digest = version.tags.get(f"{TAG}adapter_digest")
            if digest and digest not in recorded.values():
                problems.append(f"{key}: adapter_digest {digest[:16]} is none of its recorded files")
        role = version.tags.get(f"{TAG}role")
        if role == "teacher" and run is not None and not _run_tag(run, "references_digest"):
            problems.append(f"{key}: no references digest recorded on run {run.info.run_id}")
        elif role == "student" and version.tags.get(f"{TAG}recipe", "proxy") in ("proxy", "stylear"):  # baselines: no teacher
            teachers = version.tags.get(f"{TAG}teacher_version") or (run and _run_tag(run, "teacher_version"))
            for teacher in teachers.split(",") if teachers else [None]:  # a multi-subject student has several
                check_link(key, "teacher version", teacher)
            if run is not None:
                synthesis = _run_tag(run, "synthesis_run_id")
                if not synthesis:
                    problems.append(f"{key}: no synthesis run recorded")
                else:
                    problems += [f"{key}: synthesis run {one} not found" for one in synthesis.split(",")
                                 if _find_run(client, one) is None]
                if not _run_tag(run, "proxy_digest"):
                    problems.append(f"{key}: no proxy set digest recorded")
        elif role not in ("teacher", "student"):
            problems.append(f"{key}: no proxytune role tag")
    evaluations = [run for stage in EVALUATION_STAGES.values()
                   for run in _all_runs(client, f"tags.`{TAG}stage` = '{stage}'")]
    for run in evaluations:
        owner = f"evaluation run {run.info.run_id}"
        for what in ("student_version", "teacher_version"):
            check_link(owner, what.replace("_", " "), _run_tag(run, what))
    return {"problems": problems, "killed": [describe_run(run) for run in killed], "versions": len(versions),
            "files": files_checked, "evaluations": len(evaluations)}


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


def _run_tag(run, key: str) -> str | None:
    return run.data.tags.get(TAG + key)


def _load_json_artifact(run_id: str, path: str) -> object | None:
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"  # a small JSON: no progress bar
    try:
        return _mlflow().artifacts.load_dict(f"runs:/{run_id}/{path}")
    except Exception:
        return None


def lineage(uri: str, ref: str) -> dict:
    """The chain behind a registered version: references → teacher → proxy set → student → metrics."""
    client = connect(uri)
    version = get_version(client, ref)
    role = version.tags.get(f"{TAG}role")
    run = client.get_run(version.run_id)
    if role == "student":
        student_version, student_run = version, run
        teacher_ref = _run_tag(run, "teacher_version")
        if teacher_ref and "," in teacher_ref:
            raise ProxytuneError(f"{ref}: a multi-subject student learned from several teachers ({teacher_ref}); "
                                 "run lineage on one of them")
        teacher_version = get_version(client, teacher_ref) if teacher_ref else None
    elif role == "teacher":
        teacher_version, student_version, student_run = version, None, None
    else:
        raise ProxytuneError(f"{ref}: not a proxytune adapter (no role tag)")
    chain: dict = {"ref": f"{version.name}@{version.version}"}
    if teacher_version is not None:
        teacher_run = client.get_run(teacher_version.run_id)
        chain["references"] = {
            "folder": _run_tag(teacher_run, "references_dir"),
            "digest": _run_tag(teacher_run, "references_digest"),
            "files": _load_json_artifact(teacher_run.info.run_id, "references.json") or {},
        }
        chain["teacher"] = {
            "version": f"{teacher_version.name}@{teacher_version.version}",
            "run_id": teacher_run.info.run_id,
            "base_model": teacher_version.tags.get(f"{TAG}base_model"),
            "base_model_digest": teacher_version.tags.get(f"{TAG}base_model_digest"),  # toy world built-ins
            "adapter_digest": teacher_version.tags.get(f"{TAG}adapter_digest"),
            **_origin(teacher_run),
        }
    if student_run is not None:
        synthesis_id = _run_tag(student_run, "synthesis_run_id")
        chain["proxy"] = {
            "set": "curated" if student_version.tags.get(f"{TAG}recipe") == "stylear" else "proxy",  # a style's curation
            "digest": _run_tag(student_run, "proxy_digest"),
            "num_images": _run_tag(student_run, "proxy_images"),
            "prompts_digest": _run_tag(student_run, "proxy_prompts_digest"),
            "synthesis_run_id": synthesis_id,
            **_origin(_find_run(client, synthesis_id)),
        }
        chain["student"] = {
            "version": f"{student_version.name}@{student_version.version}",
            "run_id": student_run.info.run_id,
            "base_model": student_version.tags.get(f"{TAG}base_model"),
            "base_model_digest": student_version.tags.get(f"{TAG}base_model_digest"),  # toy world built-ins
            "adapter_digest": student_version.tags.get(f"{TAG}adapter_digest"),
            **_origin(student_run),
        }
        key = f"{student_version.name}@{student_version.version}"
        evaluations = client.search_runs(
            [student_run.info.experiment_id],
            filter_string=f"tags.`{TAG}student_version` = '{key}'",
            order_by=["attributes.start_time DESC"],
        )
        chain["evaluations"] = [
            {"run_id": e.info.run_id, "kind": evaluation_kind(e), "metrics": dict(sorted(e.data.metrics.items())), **_origin(e)}
            for e in evaluations if evaluation_kind(e) is not None
        ]
    return chain


def _find_run(client, run_id: str | None):
    try:
        return client.get_run(run_id) if run_id else None
    except Exception:
        return None


def _origin(run) -> dict:
    """Where a stage run came from (DVC stage, project folder, spec): `lineage` checks staleness with it."""
    if run is None:
        return {}
    return {key: _run_tag(run, key) for key in ("dvc_stage", "project_root", "spec_file", "spec_digest")}


# -- evaluation: promotion gate and comparisons -------------------------------------------------
def record_gate(uri: str, version_ref: str, passed: bool, rule: str) -> None:
    """Tag the student version with the gate result; only a pass moves the `champion` alias to it."""
    client = connect(uri)
    version = get_version(client, version_ref)
    client.set_model_version_tag(version.name, version.version, f"{TAG}gate", "passed" if passed else "failed")
    client.set_model_version_tag(version.name, version.version, f"{TAG}gate_rule", rule)
    if passed:
        client.set_registered_model_alias(version.name, "champion", version.version)


EVALUATION_STAGES = {"subject": "evaluate", "style": "style_evaluate"}  # evaluation kind -> proxytune.stage tag


def evaluation_kind(run) -> str | None:
    """'subject' or 'style' for an evaluation run (its `proxytune.stage` tag), None for any other run.

    A style evaluation logged before style evaluations had a stage of their own carries stage
    'evaluate' and a `proxytune.style` tag: it is a style evaluation too."""
    stage = _run_tag(run, "stage")
    if stage == EVALUATION_STAGES["subject"]:
        return "style" if _run_tag(run, "style") else "subject"
    return "style" if stage == EVALUATION_STAGES["style"] else None


def evaluation_run(uri: str, ref: str):
    """The newest evaluation run (subject or style) of a registered student version, or the run with that id.

    Raises:
        ProxytuneError: no such run or version, the run is not an evaluation, or no evaluation records the version.
    """
    client = connect(uri)
    if RUN_ID.match(ref):
        try:
            run = client.get_run(ref)
        except Exception:
            raise ProxytuneError(f"{ref}: no such run") from None
        if evaluation_kind(run) is None:
            raise ProxytuneError(f"run {ref}: not an evaluation run (tag {TAG}stage is {_run_tag(run, 'stage')!r}, "
                                 f"expected one of {', '.join(EVALUATION_STAGES.values())})")
        return run
    version = get_version(client, ref)
    key = f"{version.name}@{version.version}"
    run = client.get_run(version.run_id)
    found = client.search_runs(
        [run.info.experiment_id],
        filter_string=f"tags.`{TAG}student_version` = '{key}'",
        order_by=["attributes.start_time DESC"],
    )
    found = [one for one in found if evaluation_kind(one) is not None]
    if not found:
        raise ProxytuneError(f"{key}: no evaluation run records this version")
    return found[0]


def compare(uri: str, a: str, b: str) -> dict:
    """Metrics of two evaluation runs (given as student versions or run ids), side by side, with the 95%
    interval of B - A for every MODEL.METRIC mean, resampling prompts (from each run's eval/per_prompt.json;
    paired prompt by prompt when both runs used the same prompts).

    Both must be evaluations of one kind: two subject evaluations (CLIP-I, CLIP-T, DINO, ...) or two style
    evaluations (style CLIP, style Gram, CLIP-T, leakage, ...); their metrics mean different things.

    Raises:
        ProxytuneError: A and B are evaluations of different kinds (the line names the `proxytune.stage` tags).
    """
    from proxytune import stats

    runs = {a: evaluation_run(uri, a), b: evaluation_run(uri, b)}
    kinds = {label: evaluation_kind(run) for label, run in runs.items()}
    if kinds[a] != kinds[b]:
        raise ProxytuneError(
            f"{a} is a {kinds[a]} evaluation (run {runs[a].info.run_id}) and {b} a {kinds[b]} evaluation "
            f"(run {runs[b].info.run_id}): tag {TAG}stage {EVALUATION_STAGES[kinds[a]]} vs {EVALUATION_STAGES[kinds[b]]}; "
            f"compare two evaluations of one kind")
    keys = sorted(set(runs[a].data.metrics) | set(runs[b].data.metrics))
    per_prompt = {label: _load_json_artifact(run.info.run_id, "eval/per_prompt.json") for label, run in runs.items()}
    prompts = {label: _load_json_artifact(run.info.run_id, "eval/prompts.json") for label, run in runs.items()}
    paired = prompts[a] is not None and prompts[a] == prompts[b]
    intervals = {}
    for key in keys:
        model, _, metric = key.partition(".")
        sides = [(per_prompt[label] or {}).get(model) if isinstance(per_prompt[label], dict) else None for label in (a, b)]
        if all(isinstance(side, list) and side and metric in side[0] for side in sides):
            values = [[row.get(metric) for row in side] for side in sides]
            intervals[key] = stats.prompt_difference_ci(values[0], values[1], paired)
        else:
            intervals[key] = None  # not a per-prompt mean (total_variance, gate_passed), or an older run
    return {
        "kind": kinds[a],
        "runs": {label: run.info.run_id for label, run in runs.items()},
        "metrics": {k: [runs[a].data.metrics.get(k), runs[b].data.metrics.get(k)] for k in keys},
        "intervals": intervals,
        "paired": paired,
    }


# -- report -------------------------------------------------------------------------------------
def log_report(uri: str, experiment: str, root: Path, files: list[Path], tags: dict[str, str]) -> str:
    """Log the report files as artifacts of a new run named "report" (tag kind=report); return its id."""
    client = connect(uri)
    run_tags = {f"{TAG}kind": "report", **{TAG + k: str(v) for k, v in tags.items()}, **owner_tags()}
    commit = git_commit(root)
    if commit:
        run_tags["mlflow.source.git.commit"] = commit
    run = client.create_run(experiment_id(experiment, uri, root), run_name="report", tags=run_tags)
    try:
        for path in files:
            client.log_artifact(run.info.run_id, str(path))
    except BaseException:
        client.set_terminated(run.info.run_id, status="FAILED")
        raise
    client.set_terminated(run.info.run_id, status="FINISHED")
    return run.info.run_id
