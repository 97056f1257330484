"""`proxytune audit`: re-hash every registered version's files, resolve every lineage link, close ghost runs."""

from __future__ import annotations

from pathlib import Path

from proxytune.errors import ProxytuneError
from proxytune.tracking.lineage import EVALUATION_STAGES
from proxytune.tracking.registry import download_adapter, recorded_files, verify_files
from proxytune.tracking.store import TAG, all_runs, close_ghost_runs, connect, describe_run, find_run, run_tag


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
        run = find_run(client, version.run_id)
        if run is None:
            problems.append(f"{key}: run {version.run_id} not found")
        recorded = recorded_files(uri, version)
        if recorded is None:
            problems.append(f"{key}: no sha256 recorded for its files")
        else:
            with tempfile.TemporaryDirectory(prefix="proxytune-audit-") as tmp:
                try:
                    download_adapter(uri, version, Path(tmp))
                    problems += [f"{key}: {p}" for p in verify_files(Path(tmp), recorded)]
                    files_checked += len(recorded)
                except ProxytuneError as err:
                    problems.append(str(err))
            digest = version.tags.get(f"{TAG}adapter_digest")
            if digest and digest not in recorded.values():
                problems.append(f"{key}: adapter_digest {digest[:16]} is none of its recorded files")
        role = version.tags.get(f"{TAG}role")
        if role == "teacher" and run is not None and not run_tag(run, "references_digest"):
            problems.append(f"{key}: no references digest recorded on run {run.info.run_id}")
        elif role == "student" and version.tags.get(f"{TAG}recipe", "proxy") in ("proxy", "stylear"):  # baselines: no teacher
            teachers = version.tags.get(f"{TAG}teacher_version") or (run and run_tag(run, "teacher_version"))
            for teacher in teachers.split(",") if teachers else [None]:  # a multi-subject student has several
                check_link(key, "teacher version", teacher)
            if run is not None:
                synthesis = run_tag(run, "synthesis_run_id")
                if not synthesis:
                    problems.append(f"{key}: no synthesis run recorded")
                else:
                    problems += [f"{key}: synthesis run {one} not found" for one in synthesis.split(",")
                                 if find_run(client, one) is None]
                if not run_tag(run, "proxy_digest"):
                    problems.append(f"{key}: no proxy set digest recorded")
        elif role not in ("teacher", "student"):
            problems.append(f"{key}: no proxytune role tag")
    evaluations = [run for stage in EVALUATION_STAGES.values()
                   for run in all_runs(client, f"tags.`{TAG}stage` = '{stage}'")]
    for run in evaluations:
        owner = f"evaluation run {run.info.run_id}"
        for what in ("student_version", "teacher_version"):
            check_link(owner, what.replace("_", " "), run_tag(run, what))
    return {"problems": problems, "killed": [describe_run(run) for run in killed], "versions": len(versions),
            "files": files_checked, "evaluations": len(evaluations)}
