"""Runs proxytune writes: the parent run of an apply, each stage's child run (`StageRun`: params,
metric curves, artifacts, the proxy set as a dataset input, adapter registration) and the report run."""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from proxytune import faults
from proxytune.files import digest_files, folder_digests
from proxytune.tracking import guard
from proxytune.tracking.registry import FILES_TAG, registered_name, same_adapter_version
from proxytune.tracking.store import (TAG, artifact_uri, connect, experiment_id, git_commit, load_mlflow, owner_tags,
                                      version_tags)

PARENT_RUNS_ENV = "PROXYTUNE_PARENT_RUNS"  # JSON {experiment: parent run id}, set by `apply`


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
        mlflow = load_mlflow()
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
        with guard.translated(self.uri):  # a store that fails here is one line, not MLflow's traceback
            self._run = mlflow.start_run(
                experiment_id=experiment_id(self.mlflow_experiment or self.experiment, self.uri, self.root),
                run_name=f"{self.stage}:{self.subject}",
                parent_run_id=parent,
                tags=tags,
            )
        self.run_id = self._run.info.run_id
        # A moved or copied project: its store still names the old folder; log where the store is now.
        self.artifact_uri = artifact_uri(self.uri, self._run.info.artifact_uri, self.run_id)
        self._moved = self.artifact_uri != self._run.info.artifact_uri
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        load_mlflow().end_run(status="FINISHED" if exc_type is None else "FAILED")

    # -- logging -----------------------------------------------------------------------------
    def log_params(self, params: dict) -> None:
        load_mlflow().log_params({k: str(v)[:6000] for k, v in _flatten(params).items()})

    def log_metric(self, key: str, value: float, step: int | None = None) -> None:
        load_mlflow().log_metric(key, float(value), step=step)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        load_mlflow().log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def _moved_repository(self):
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        return get_artifact_repository(self.artifact_uri)

    def log_artifacts(self, folder: Path, artifact_path: str | None = None) -> None:
        if self._moved:
            self._moved_repository().log_artifacts(str(folder), artifact_path)
        else:
            load_mlflow().log_artifacts(str(folder), artifact_path)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if self._moved:
            self._moved_repository().log_artifact(str(path), artifact_path)
        else:
            load_mlflow().log_artifact(str(path), artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        load_mlflow().set_tags({TAG + k: str(v) for k, v in tags.items()})

    def log_dataset(self, folder: Path, name: str, digest: str, context: str) -> None:
        """Log a folder of images as a dataset input whose digest is its content digest."""
        mlflow = load_mlflow()
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
        existing = same_adapter_version(client, name, version_tags)
        if existing is not None:
            version = str(existing.version)
            self.set_tags({"reused_version": f"{name}@{version}"})
        else:
            self.log_artifacts(folder, "adapter")
            created = client.create_model_version(
                name, source=f"{self.artifact_uri}/adapter", run_id=self.run_id, tags=version_tags
            )
            version = str(created.version)
        client.set_registered_model_alias(name, "candidate", version)
        faults.kill_point(self.stage, "registered")
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
        if not self._moved:
            load_mlflow().log_dict(data, artifact_file)
            return
        import tempfile

        with tempfile.TemporaryDirectory(prefix="proxytune-artifact-") as tmp:
            path = Path(tmp) / Path(artifact_file).name
            path.write_text(json.dumps(data, indent=2))
            self.log_artifact(path, str(Path(artifact_file).parent) if Path(artifact_file).parent != Path(".") else None)


def _flatten(data: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def log_report(uri: str, experiment: str, root: Path, files: list[Path], tags: dict[str, str]) -> str:
    """Log the report files as artifacts of a new run named "report" (tag kind=report); return its id."""
    client = connect(uri)
    run_tags = {f"{TAG}kind": "report", **{TAG + k: str(v) for k, v in tags.items()}, **owner_tags()}
    commit = git_commit(root)
    if commit:
        run_tags["mlflow.source.git.commit"] = commit
    run = client.create_run(experiment_id(experiment, uri, root), run_name="report", tags=run_tags)
    where = artifact_uri(uri, run.info.artifact_uri, run.info.run_id)
    try:
        for path in files:
            if where != run.info.artifact_uri:  # a moved or copied project (see StageRun)
                from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

                get_artifact_repository(where).log_artifact(str(path))
            else:
                client.log_artifact(run.info.run_id, str(path))
    except BaseException:
        client.set_terminated(run.info.run_id, status="FAILED")
        raise
    client.set_terminated(run.info.run_id, status="FINISHED")
    return run.info.run_id
