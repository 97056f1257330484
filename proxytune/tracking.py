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
import subprocess
import warnings
from dataclasses import dataclass
from pathlib import Path

from proxytune.errors import ProxytuneError
from proxytune.files import sha256_file

RUN_ID = re.compile(r"^[0-9a-f]{32}$")
PARENT_RUNS_ENV = "PROXYTUNE_PARENT_RUNS"  # JSON {experiment: parent run id}, set by `apply`
TAG = "proxytune."  # prefix of every tag we write

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


def registered_name(experiment: str, subject: str, role: str) -> str:
    return f"{experiment}.{subject}.{role}"


def start_parent_run(experiment: str, uri: str, root: Path, tags: dict[str, str]) -> str:
    """Create the parent run of one apply and return its id (stages attach to it as children)."""
    client = connect(uri)
    run = client.create_run(
        experiment_id(experiment, uri, root),
        run_name="apply",
        tags={f"{TAG}kind": "apply", **{TAG + k: v for k, v in tags.items()}},
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
        commit = git_commit(self.root)
        if commit:
            tags["mlflow.source.git.commit"] = commit
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
        """Log `folder` as artifact path `adapter` and register it as a new model version."""
        client = connect(self.uri)
        self.log_artifacts(folder, "adapter")
        files = {p.relative_to(folder).as_posix(): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}
        self.log_dict(files, "adapter_files.json")
        name = registered_name(self.experiment, self.subject, role)
        try:
            client.get_registered_model(name)
        except Exception:
            try:
                client.create_registered_model(name, tags={f"{TAG}role": role})
            except Exception:
                pass  # created concurrently
        version = client.create_model_version(
            name,
            source=f"{self._run.info.artifact_uri}/adapter",
            run_id=self.run_id,
            tags={
                f"{TAG}role": role,
                f"{TAG}experiment": self.experiment,
                f"{TAG}subject": self.subject,
                **{TAG + k: str(v) for k, v in tags.items()},
            },
        )
        client.set_registered_model_alias(name, "candidate", version.version)
        return str(version.version)

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
    mlflow = _mlflow()
    client = connect(uri)
    version = get_version(client, ref)
    with staged_dir(out_dir) as tmp:
        # The artifact is a folder: it lands as tmp/download/adapter; its files go to the top of out_dir.
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=version.source, dst_path=str(tmp / "download")))
        for child in local.iterdir():
            os.replace(child, tmp / child.name)
        shutil.rmtree(tmp / "download")
    return out_dir, f"{version.name}@{version.version}"


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
            "adapter_digest": teacher_version.tags.get(f"{TAG}adapter_digest"),
        }
    if student_run is not None:
        chain["proxy"] = {
            "digest": _run_tag(student_run, "proxy_digest"),
            "num_images": _run_tag(student_run, "proxy_images"),
            "prompts_digest": _run_tag(student_run, "proxy_prompts_digest"),
            "synthesis_run_id": _run_tag(student_run, "synthesis_run_id"),
        }
        chain["student"] = {
            "version": f"{student_version.name}@{student_version.version}",
            "run_id": student_run.info.run_id,
            "base_model": student_version.tags.get(f"{TAG}base_model"),
            "adapter_digest": student_version.tags.get(f"{TAG}adapter_digest"),
        }
        key = f"{student_version.name}@{student_version.version}"
        evaluations = client.search_runs(
            [student_run.info.experiment_id],
            filter_string=f"tags.`{TAG}student_version` = '{key}'",
            order_by=["attributes.start_time DESC"],
        )
        chain["evaluations"] = [
            {"run_id": e.info.run_id, "metrics": dict(sorted(e.data.metrics.items()))} for e in evaluations
        ]
    return chain


# -- evaluation: promotion gate and comparisons -------------------------------------------------
def record_gate(uri: str, version_ref: str, passed: bool, rule: str) -> None:
    """Tag the student version with the gate result; only a pass moves the `champion` alias to it."""
    client = connect(uri)
    version = get_version(client, version_ref)
    client.set_model_version_tag(version.name, version.version, f"{TAG}gate", "passed" if passed else "failed")
    client.set_model_version_tag(version.name, version.version, f"{TAG}gate_rule", rule)
    if passed:
        client.set_registered_model_alias(version.name, "champion", version.version)


def evaluation_run(uri: str, ref: str):
    """The newest evaluation run of a registered student version, or the run with that id."""
    client = connect(uri)
    if RUN_ID.match(ref):
        try:
            return client.get_run(ref)
        except Exception:
            raise ProxytuneError(f"{ref}: no such run") from None
    version = get_version(client, ref)
    key = f"{version.name}@{version.version}"
    run = client.get_run(version.run_id)
    found = client.search_runs(
        [run.info.experiment_id],
        filter_string=f"tags.`{TAG}student_version` = '{key}' and tags.`{TAG}stage` = 'evaluate'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not found:
        raise ProxytuneError(f"{key}: no evaluation run records this version")
    return found[0]


def compare(uri: str, a: str, b: str) -> dict:
    """Metrics of two evaluation runs (given as student versions or run ids), side by side."""
    runs = {a: evaluation_run(uri, a), b: evaluation_run(uri, b)}
    keys = sorted(set(runs[a].data.metrics) | set(runs[b].data.metrics))
    return {
        "runs": {label: run.info.run_id for label, run in runs.items()},
        "metrics": {k: [runs[a].data.metrics.get(k), runs[b].data.metrics.get(k)] for k in keys},
    }


# -- report -------------------------------------------------------------------------------------
def log_report(uri: str, experiment: str, root: Path, files: list[Path], tags: dict[str, str]) -> str:
    """Log the report files as artifacts of a new run named "report" (tag kind=report); return its id."""
    client = connect(uri)
    run_tags = {f"{TAG}kind": "report", **{TAG + k: str(v) for k, v in tags.items()}}
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
