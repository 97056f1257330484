"""`proxytune apply`: validate, compile and run the specs' stale stages (`dvc repro`, or Ray), inside one
MLflow parent run per experiment, under the project lock.

The CLI parses and prints; this module does the work and reports through two callbacks: `echo(line)`
for each line of output and `on_wait()` once when another apply holds the project lock.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from proxytune import compile as compiler
from proxytune import fitcheck, layout, project
from proxytune.errors import ProxytuneError
from proxytune.tracking import runs, store

Echo = Callable[[str], None]


def apply(paths: tuple[str, ...], subjects: tuple[str, ...], *, dry_run: bool, executor: str, address: str | None,
          root: Path, echo: Echo, on_wait: Callable[[], None], fit: fitcheck.Request | None = None) -> None:
    """Run the stale stages of the spec files `paths` (only `subjects`' when given) in project `root`.

    On a GPU (or for the card `fit` names) every stage is planned first and one that is to run and cannot
    fit is refused before anything is written (proxytune.fitcheck).

    Raises:
        ProxytuneError: a bad argument or spec, an unreachable server or model, a stage that cannot fit the
            GPU, or a stage that failed (finished stages are kept: re-running resumes).
    """
    if address is not None and executor != "ray":
        raise ProxytuneError("--address: only with --executor ray")
    if executor == "ray":
        from proxytune.executors import require_ray

        require_ray()  # before anything is written
    resolved = project.resolve_specs(paths, root)
    known = {s.name for item in resolved for s in item.spec.subjects}
    unknown = sorted(set(subjects) - known)
    if unknown:
        raise ProxytuneError(f"--subject: no subject named {', '.join(unknown)} in {', '.join(paths)}")
    project.check_writable(root)
    if not dry_run:
        check_servers(paths, resolved)
        check_cache(resolved)
    check_models(paths, resolved, root)
    fit = fit or fitcheck.Request()
    resolved, check = _plan_for_card(paths, resolved, root, fit, executor, echo)
    targets = compiler.targets(resolved, set(subjects) or None)
    if check is not None and not (root / "dvc.lock").exists():  # nothing ran here yet: every planned stage will
        check.enforce(check.planned(set(subjects)), fit, echo)
        check = None
    with project.project_lock(root, on_wait):
        if not dry_run:
            close_interrupted(root, echo)
        before = _compiled_files(resolved, root) if check is not None else {}
        project.write_compiled(resolved, root)
        project.ensure_dvc(root)
        stale = project.stale_stages(root, targets)
        if check is not None:
            try:
                check.enforce(stale, fit, echo)
            except ProxytuneError:
                _restore(before, root)  # a refused apply leaves dvc.yaml and the params files as they were
                raise
        if not stale:
            echo("up to date: no stage to run")
            return
        echo(f"stages to run: {', '.join(stale)}")
        if dry_run:
            echo("dry run: nothing was run")
            return
        code, failure = _run_stages(root, targets, stale, paths, resolved, executor, address, echo)
    if code != 0:
        raise ProxytuneError(failure or f"dvc repro failed (exit {code}); fix the error above and re-run apply: finished stages are kept")
    echo("done")


def _plan_for_card(paths: tuple[str, ...], resolved: list, root: Path, fit: fitcheck.Request, executor: str,
                   echo: Echo) -> tuple[list, fitcheck.Check | None]:
    """The specs after their memory modes on the card the stages will run on, and the plan's check; the specs
    unchanged and None when there is no card (CPU) to check."""
    card = fitcheck.find_card(fit, executor, echo)
    if card is not None:
        return fitcheck.prepare(paths, resolved, root, *card, echo)
    for path, item in zip(paths, resolved):
        if item.spec.memory == "auto":
            echo(f"memory: auto ({path}): no CUDA GPU here, so the spec's own settings are used "
                 "(name the card with --gpu or --memory)")
    return resolved, None


def _compiled_files(resolved: list, root: Path) -> dict[Path, bytes | None]:
    """The bytes (None: absent) of every file write_compiled is about to write for `resolved`."""
    import yaml

    dvc_path = root / "dvc.yaml"
    existing = yaml.safe_load(dvc_path.read_text()) if dvc_path.exists() else None
    _, params_files = compiler.compile_specs(resolved, existing)
    paths = [dvc_path, *(root / rel for rel in params_files)]
    return {path: path.read_bytes() if path.exists() else None for path in paths}


def _restore(before: dict[Path, bytes | None], root: Path) -> None:
    """Put back the files `_compiled_files` saw: rewrite the old bytes, remove new files and their new folders."""
    from proxytune.files import write_bytes_atomic

    for path, data in before.items():
        if data is not None:
            if not path.exists() or path.read_bytes() != data:
                write_bytes_atomic(path, data)
            continue
        path.unlink(missing_ok=True)
        folder = path.parent
        while folder != root and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
            folder = folder.parent


def _run_stages(root: Path, targets: list[str], stale: list[str], paths: tuple[str, ...], resolved, executor: str,
                address: str | None, echo: Echo) -> tuple[int | None, str | None]:
    """Run the stages inside a parent run per spec; (exit code, error line). Runs under the project lock."""
    uris = {item.spec.name: store.resolve_uri(item.spec.tracking.uri, root) for item in resolved}
    project.record_apply(root, list(uris.values()))  # until end_apply: a killed apply is seen next time
    parents, code, failure = {}, None, None
    try:
        for item in resolved:
            experiment = item.spec.tracking.experiment or item.spec.name
            tags = {"spec_file": item.spec_path, "spec_digest": item.spec_digest, "stages": ",".join(stale)}
            parents[item.spec.name] = runs.start_parent_run(experiment, uris[item.spec.name], root, tags)
        env_parents = dict(parents)
        for item in resolved:  # a student variant's (and a proxy-count step's) stages are children of its spec's run
            for variant in item.spec.student.variants:
                env_parents[layout.variant_experiment(item.spec.name, variant)] = parents[item.spec.name]
            for count in item.spec.student.proxy_count.grow if item.spec.student.proxy_count else []:
                env_parents[layout.grow_experiment(item.spec.name, count)] = parents[item.spec.name]
        stage_env = {runs.PARENT_RUNS_ENV: json.dumps(env_parents)}
        if executor == "ray":
            code, failure = run_on_ray(root, targets, stale, paths, resolved, address, stage_env, echo)
        else:
            code = project.repro(root, targets, stage_env)
    finally:
        for name, run_id in parents.items():
            status = "FINISHED" if code == 0 else "KILLED" if code is None else "FAILED"  # None: interrupted
            runs.end_parent_run(run_id, uris[name], status)
        if code != 0:  # a stage process killed hard (out of memory, SIGKILL) left its run RUNNING
            for uri in set(uris.values()):
                store.close_ghost_runs(uri)
        project.end_apply(root)
    return code, failure


def close_interrupted(root: Path, echo: Echo) -> None:
    """When an earlier apply in this project was killed, close what it left open (its entries in DVC's
    stage lock file, its MLflow runs still RUNNING) and say so in one line. Runs under the project lock."""
    previous = project.unfinished_apply(root)
    dead = project.release_dead_dvc_locks(root)  # else DVC warns "Process ... had been killed"
    if previous is None and not dead:
        return
    closed = 0
    for uri in (previous or {}).get("uris", []):
        try:
            closed += len(store.close_ghost_runs(uri)[0])
        except Exception:  # that store is unreachable now: `audit` reports the runs later
            pass
    pid = (previous or {}).get("pid") or dead[0]
    note = f"; {closed} of its MLflow runs marked KILLED" if closed else ""
    echo(f"resuming after an interrupted run (process {pid} was killed): finished stages are kept{note}")
    project.end_apply(root)


def check_servers(paths: tuple[str, ...], resolved) -> None:
    """Fail fast (one line, before anything is written) when a spec's MLflow server does not answer."""
    checked: set[str] = set()
    for path, item in zip(paths, resolved):
        uri = store.remote_uri(item.spec.tracking.uri)
        if uri is None or uri in checked:
            continue
        key = "tracking.uri" if item.spec.tracking.uri else "tracking.uri (unset; from $MLFLOW_TRACKING_URI)"
        try:
            store.check_reachable(uri)
        except ProxytuneError as err:
            raise ProxytuneError(f"{path}: {key}: {err}") from None
        checked.add(uri)


def check_cache(resolved) -> None:
    """When a spec names a built-in tiny or toy model, its stages cache it under PROXYTUNE_HOME: check
    that folder here, once, rather than in every stage after DVC has started."""
    from proxytune.backends.tiny_cache import check_cache_root

    def names_builtin(value) -> bool:
        if isinstance(value, dict):
            return any(names_builtin(v) for v in value.values())
        if isinstance(value, list):
            return any(names_builtin(v) for v in value)
        return isinstance(value, str) and value.startswith(("tiny-", "toy-"))

    if any(names_builtin(item.spec.model_dump(mode="json")) for item in resolved):
        check_cache_root()


def check_models(paths: tuple[str, ...], resolved, root: Path) -> None:
    """Resolve every model a spec names (teacher, student, encoders) before anything is written: a local
    folder must hold what its loader reads, a hub id must be cached or reachable (see proxytune.preflight)."""
    from proxytune.preflight import check_spec_models

    seen: dict = {}
    for path, item in zip(paths, resolved):
        check_spec_models(item.spec, path, root, seen)


def run_on_ray(root: Path, targets: list[str], stale: list[str], paths: tuple[str, ...], resolved, address: str | None,
               env: dict[str, str], echo: Echo) -> tuple[int, str | None]:
    """--executor ray: plan from DVC's graph, run on the cluster with a progress bar, print the summary.
    Returns (exit code, the error line when a subject failed)."""
    from tqdm.auto import tqdm

    from proxytune import executors

    plan = executors.plan(root, targets, stale, {item.spec.name: (path, item.spec.resources)
                                                 for path, item in zip(paths, resolved)})
    ray = executors.connect(address)
    try:
        total = ray.cluster_resources()
        nodes = len(executors.alive_nodes(ray))
        echo(f"ray: {len(plan)} stages on {nodes} node{'s' * (nodes != 1)} ({total.get('CPU', 0):g} CPUs, "
             f"{total.get('GPU', 0):g} GPUs); stage logs in {executors.LOG_DIR}/")
        bar = tqdm(total=len(plan), desc="stages", unit="stage")
        running: set[str] = set()
        # "started" is a submission: Ray starts it when a node has its CPUs and GPUs free
        marks = {"started": "queued ", "ran": "done   ", "current": "current", "failed": "FAILED ", "skipped": "skipped"}

        def on_event(event: str, stage, detail: str) -> None:
            if event == "started":
                running.add(stage.name)
            elif event != "waiting":
                running.discard(stage.name)
                bar.update(1)
            if event in marks:
                note = {"current": "up to date after its upstream ran", "skipped": f"{detail} failed"}.get(event, detail)
                tqdm.write(f"{marks[event]} {stage.name}" + (f": {note}" if note else ""))
            bar.set_postfix_str(f"{len(running)} queued or running" if running else "", refresh=True)

        try:
            outcome = executors.execute(root, plan, executors.forwarded_env(env), on_event)
        finally:
            bar.close()
    finally:
        ray.shutdown()
    units = sorted({stage.unit for stage in plan})
    failed = outcome.failed_units(plan)
    retried = sorted(name for name, tries in outcome.attempts.items() if tries > 1)
    echo(f"summary: {len(units) - len(failed)} of {len(units)} subjects done, {len(outcome.ran)} stages ran"
         + (f", {len(outcome.current)} found up to date" if outcome.current else "")
         + (f"; retried after a lost worker: {', '.join(retried)}" if retried else ""))
    for unit, why in sorted(failed.items()):
        echo(f"failed: {unit}: {why}")
    if not failed:
        return 0, None
    return 1, (f"{len(failed)} of {len(units)} subjects failed ({', '.join(sorted(failed))}); the others are done and "
               f"in dvc.lock: fix the error above and re-run apply (finished stages are kept)")
