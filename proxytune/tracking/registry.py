"""Registered adapter versions: their names and references (NAME@VERSION|@ALIAS), list, show, pull
and promote, the sha256 of every file recorded at registration and checked on download, and the
promotion gate's result."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path

from proxytune.errors import ProxytuneError
from proxytune.files import folder_files, sha256_file
from proxytune.tracking import guard
from proxytune.tracking.store import TAG, artifact_uri, connect, load_json_artifact, load_mlflow

FILES_TAG = "adapter_files"  # version tag (after TAG): JSON {relative file: sha256} of the adapter
# An alias must not read as a version: NAME@7 resolves version 7 (parse_ref), and MLflow reserves v7 and latest.
VERSION_LIKE = re.compile(r"^(v?\d+|latest)$", re.IGNORECASE)
ALIAS = re.compile(r"^[\w-]{1,255}$")  # MLflow's own rule: letters, digits, _ and -


def registered_name(experiment: str, subject: str, role: str) -> str:
    return f"{experiment}.{subject}.{role}"


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
    """Download a registered adapter into out_dir (atomically) and return (path, 'name@version').

    Raises:
        ProxytuneError: `out_dir` is inside the registry's own folder or artifact store, or is not an
            empty folder; the version is unknown, unverifiable, or its files do not match their sha256.
    """
    from proxytune.files import staged_dir

    client = connect(uri)
    version = get_version(client, ref)
    key = f"{version.name}@{version.version}"
    store, target = _store_folder(uri, version), out_dir.resolve()
    if store is not None and target.is_relative_to(store):
        raise ProxytuneError(f"-o {out_dir}: inside the registry's own store {store}; pulling there would change "
                             "what the registry holds: choose a folder outside it")
    if Path.cwd().resolve().is_relative_to(target):  # the folder is replaced in one rename: not the one we stand in
        raise ProxytuneError(f"-o {out_dir}: the current folder or one above it; pull into a new folder, e.g. -o pulled")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ProxytuneError(f"-o {out_dir}: already exists and is not an empty folder; choose a new folder")
    recorded = recorded_files(uri, version)
    if recorded is None:
        raise ProxytuneError(f"{key}: no sha256 recorded for its files; refusing to pull what cannot be verified")
    with staged_dir(target) as tmp:
        download_adapter(uri, version, tmp)
        problems = verify_files(tmp, recorded)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise ProxytuneError(f"{key}: refusing to pull a tampered or truncated artifact: {problems[0]}{more}")
    return out_dir, key


def _store_folder(uri: str, version) -> Path | None:
    """The local folder a pull must not write into: the embedded store's registry folder, else the
    local artifact root the version lives under; None for a store with no local files."""
    db = guard.sqlite_path(uri)
    if db is not None and db.parent.name == "registry":
        return db.parent.resolve()
    source = artifact_uri(uri, version.source, version.run_id)
    if source.startswith("file:") and version.run_id and f"/{version.run_id}/artifacts" in source:
        from urllib.request import url2pathname

        root = source.partition(f"/{version.run_id}/artifacts")[0]
        return Path(url2pathname(root.removeprefix("file://"))).resolve()
    return None


def download_adapter(uri: str, version, dest: Path) -> None:
    """Download a version's adapter folder; its files land at the top of `dest`."""
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    source = artifact_uri(uri, version.source, version.run_id)
    try:
        with guard.translated(uri):
            local = Path(load_mlflow().artifacts.download_artifacts(artifact_uri=source, dst_path=str(dest / ".download")))
    except ProxytuneError:
        raise
    except Exception as err:
        from proxytune.errors import disk_full_message

        # MLflow gathers a failed download's errors into the text of one exception: a full disk shows as Errno 28
        if disk_full_message(err) is not None or f"[Errno {errno.ENOSPC}]" in str(err):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dest.parent)) from None  # the CLI's one line
        raise ProxytuneError(
            f"{version.name}@{version.version}: cannot download {source} ({str(err).splitlines()[0] if str(err) else type(err).__name__})"
        ) from None
    for child in local.iterdir():
        os.replace(child, dest / child.name)
    shutil.rmtree(dest / ".download")


def recorded_files(uri: str, version) -> dict[str, str] | None:
    """{relative file: sha256} recorded at registration: the version tag, else the run's adapter_files.json."""
    raw = version.tags.get(TAG + FILES_TAG)
    if raw:
        try:
            files = json.loads(raw)
        except ValueError:
            files = None
    else:
        files = load_json_artifact(uri, version.run_id, "adapter_files.json") if version.run_id else None
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


def same_adapter_version(client, name: str, version_tags: dict[str, str]):
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
        "source": artifact_uri(uri, version.source, version.run_id),
        "status": str(version.status),
        "tags": {k: v for k, v in sorted(version.tags.items()) if k != TAG + FILES_TAG},
        "files": recorded_files(uri, version) or {},
    }


def check_alias(alias: str) -> None:
    """Refuse an alias that reads as a version ('7', 'v7', 'latest') or that MLflow would refuse.

    Raises:
        ProxytuneError: the line names the alias and the rule.
    """
    if VERSION_LIKE.match(alias):
        raise ProxytuneError(f"alias {alias!r}: reads as a version (NAME@{alias} would mean "
                             f"{'the latest version' if alias.lower() == 'latest' else 'version ' + alias.lstrip('vV')}); "
                             "choose a name that starts with a letter, e.g. champion or release-7")
    if not ALIAS.match(alias):
        raise ProxytuneError(f"alias {alias!r}: only letters, digits, _ and - (at most 255), e.g. champion")


def promote(uri: str, ref: str, alias: str) -> str:
    """Point `alias` (e.g. champion) at the version `ref` names; return 'name@version'.

    Raises:
        ProxytuneError: the alias reads as a version or breaks MLflow's rule; the version is unknown;
            the store refuses the write (read-only, locked: one line from `guard`).
    """
    check_alias(alias)
    client = connect(uri)
    version = get_version(client, ref)
    try:
        client.set_registered_model_alias(version.name, alias, version.version)
    except ProxytuneError:
        raise
    except Exception as err:
        raise ProxytuneError(f"alias {alias!r}: {str(err).splitlines()[0]}") from None
    return f"{version.name}@{version.version}"


def record_gate(uri: str, version_ref: str, passed: bool, rule: str) -> None:
    """Tag the student version with the gate result; only a pass moves the `champion` alias to it."""
    client = connect(uri)
    version = get_version(client, version_ref)
    client.set_model_version_tag(version.name, version.version, f"{TAG}gate", "passed" if passed else "failed")
    client.set_model_version_tag(version.name, version.version, f"{TAG}gate_rule", rule)
    if passed:
        client.set_registered_model_alias(version.name, "champion", version.version)
