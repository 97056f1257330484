"""Run the stale stages of the DVC graph as Ray tasks (`proxytune apply --executor ray`).

DVC stays the source of truth; this module only schedules:
  * what runs: the stages `dvc status` lists for the targets (project.stale_stages) and, as `dvc repro`
    would, the stages downstream of them, which are asked again (`dvc status STAGE`) once their
    upstream has run. The dependency order is DVC's own stage graph (`Repo.index.graph`).
  * how: each stage's own `cmd` from dvc.yaml, through the shell the way DVC runs it (DVC_ROOT and
    DVC_STAGE set, the stage's outputs removed first), in a Ray task that asks for the CPUs and GPUs
    of the spec's `resources` section. A stage starts as soon as its upstream stages are done.
  * what is recorded: when a stage's task succeeds, the driver commits it (`Repo.commit(stage,
    force=True)`, which is `dvc commit -f STAGE`: outputs hashed into the cache, the run cache and
    the stage's dvc.lock entry). Commits happen one at a time in the driver, so dvc.lock and DVC's
    repository lock are never contended by the tasks.

A task whose worker dies (node lost, worker killed, the stage process killed by a signal such as the
out-of-memory killer) is retried by Ray up to `max_retries` times; teacher and student resume from
their checkpoints under runs/.../.work/. A stage that fails (non-zero exit) is not retried: the
stages downstream of it are skipped, everything else goes on, and the outcome names it.

The project folder must be on a file system that every node mounts at the same path (the tasks run
in it); the driver forwards its PROXYTUNE_*, MLFLOW_*, HF_* and model-library variables to each stage,
everything else comes from the worker's environment. Each attempt's output goes to
.proxytune/logs/STAGE.log in the project.

Nothing here imports ray at module level: the local executor works without it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from proxytune import layout
from proxytune.errors import ProxytuneError

MAX_RETRIES = 3  # retries of a task whose worker died; a stage's own failure is not retried
LOG_DIR = ".proxytune/logs"  # one log per stage, inside the project's git-ignored state folder
FORWARDED = ("PROXYTUNE_", "MLFLOW_", "HF_", "HUGGINGFACE_", "TRANSFORMERS_", "DIFFUSERS_", "TORCH_HOME",
             "DVC_NO_ANALYTICS")
NOT_FORWARDED = {layout.LAUNCHED_ENV}  # set by a stage for its own accelerate processes only
RAY_MISSING = "--executor ray: Ray is not installed for {python}; install it with pip install \"proxytune[ray]\""


class StageKilled(Exception):
    """The stage's process died from a signal (out-of-memory killer, node shutdown): Ray retries the task."""


@dataclass(frozen=True)
class Stage:
    """One stage of the plan, with what its Ray task asks for."""

    name: str  # DVC's address: teacher@EXP.SUBJECT, student-joint.EXP
    commands: tuple[str, ...]  # dvc.yaml `cmd` (DVC allows a list, run in turn)
    outs: tuple[str, ...]  # outputs DVC removes before running (relative to the project)
    upstream: tuple[str, ...]  # planned stages it waits for
    kind: str  # resources key: teacher, synthesis, codes, student, evaluate (a style's stages: STYLE_RESOURCES;
    #            "" for a stage proxytune did not write)
    spec_file: str | None  # the spec it comes from, for error messages
    cpus: float
    gpus: float | None  # None: 1 on a cluster with GPUs, else 0
    stale: bool  # listed by `dvc status`; False: downstream of one, asked again when its turn comes

    @property
    def unit(self) -> str:
        """What a failure is reported for: the subject (EXP.SUBJECT), or the stage itself."""
        return self.name.split("@", 1)[1] if "@" in self.name else self.name

    @property
    def log(self) -> str:
        return f"{LOG_DIR}/{self.name}.log"


@dataclass
class Outcome:
    ran: list[str] = field(default_factory=list)  # ran and committed to dvc.lock
    current: list[str] = field(default_factory=list)  # downstream of a re-run stage, found up to date
    failed: dict[str, str] = field(default_factory=dict)  # stage -> one-line reason
    skipped: dict[str, str] = field(default_factory=dict)  # stage -> the failed stage upstream of it
    attempts: dict[str, int] = field(default_factory=dict)  # stage -> tasks it took (> 1: a worker died)

    def failed_units(self, plan: list[Stage]) -> dict[str, str]:
        """{subject: 'STAGE: reason'} for every subject with a failed or skipped stage."""
        units: dict[str, str] = {}
        by_name = {stage.name: stage for stage in plan}
        for name, why in self.failed.items():
            units.setdefault(by_name[name].unit, f"{name}: {why}")
        for name, upstream in self.skipped.items():
            units.setdefault(by_name[name].unit, f"{name}: not run, {upstream} failed")
        return units


# -- the plan: DVC's graph and status --------------------------------------------------------------
# A style's stages ask for the resources of the subject stage that does the same work (spec/resources.py):
# curation generates images with the tuned teacher as synthesis does, the style student trains an AR
# student, the style evaluation generates and scores. The style's teacher is a `teacher` stage.
STYLE_RESOURCES = {"curation": "synthesis", "style_student": "student", "style_evaluate": "evaluate",
                   **layout.GROW_GROUPS}  # a growing proxy count's stages: a student or an evaluation


def stage_kind(name: str) -> tuple[str, str | None]:
    """(resources key, experiment) of a stage proxytune compiled; ("", None) for any other stage."""
    parsed = layout.parse_stage_name(name)
    if parsed is None:
        return "", None
    step, experiment, _ = parsed
    return STYLE_RESOURCES.get(step, step), layout.base_experiment(experiment)


def plan(root: Path, targets: list[str], stale: list[str], specs: dict[str, tuple[str, object]]) -> list[Stage]:
    """The stages to run for `targets`, upstream first, from DVC's stage graph.

    Args:
        stale: what `dvc status --with-deps` lists for the targets.
        specs: experiment -> (spec file, its ResourcesSpec).
    Returns:
        Every stale stage and every stage downstream of one (up to the targets), in DVC's order.
    """
    import networkx as nx
    from dvc.repo import Repo

    from proxytune.spec.resources import StageResources

    with Repo(str(root)) as repo:
        graph = repo.index.graph  # edges run from a stage to the stages whose outputs it reads
        by_name = {stage.addressing: stage for stage in graph}
        unknown = [t for t in targets if t not in by_name]
        if unknown:
            raise ProxytuneError(f"dvc.yaml: no stage {unknown[0]} (re-run apply to compile it)")
        order, seen = [], set()
        for target in targets:
            for stage in nx.dfs_postorder_nodes(graph, by_name[target]):  # dependencies first
                if stage.addressing not in seen:
                    seen.add(stage.addressing)
                    order.append(stage)
        listed, runs, planned = set(stale), set(), []
        for stage in order:
            upstream = [dep.addressing for dep in graph.successors(stage)]
            if stage.frozen or not stage.cmd:
                continue  # DVC runs neither a frozen stage nor a data source
            if stage.addressing not in listed and not any(name in runs for name in upstream):
                continue
            runs.add(stage.addressing)
            kind, experiment = stage_kind(stage.addressing)
            spec_file, resources = specs.get(experiment, (None, None))
            asked = getattr(resources, kind, None) if kind else None
            asked = asked if asked is not None else StageResources()
            commands = tuple(stage.cmd) if isinstance(stage.cmd, list) else (stage.cmd,)
            planned.append(Stage(
                name=stage.addressing, commands=commands,
                outs=tuple(str(out.def_path) for out in stage.outs if not out.persist),
                upstream=tuple(name for name in upstream if name in runs), kind=kind, spec_file=spec_file,
                cpus=asked.cpus, gpus=asked.gpus, stale=stage.addressing in listed,
            ))
    return planned


def commit(root: Path, name: str) -> None:
    """Record a finished stage in dvc.lock as `dvc commit -f STAGE` does (outputs into the cache too).

    Raises:
        ProxytuneError: DVC could not (an output is missing, the repository lock is held elsewhere).
    """
    import logging

    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    logging.getLogger("dvc").setLevel(logging.WARNING)  # not "Updating lock file" under the progress bar
    try:
        with Repo(str(root)) as repo:
            repo.commit(name, force=True)
    except DvcException as err:
        raise ProxytuneError(f"dvc commit {name} failed: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None


def still_stale(root: Path, name: str) -> bool:
    """Whether DVC sees a stage as changed now (asked when a stage upstream of it has just run)."""
    from proxytune.project import dvc_status

    status = dvc_status(root, [name])
    return status is None or bool(status)  # DVC could not tell: run it


# -- Ray ------------------------------------------------------------------------------------------
def require_ray():
    """The ray module, or a one-line error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ProxytuneError(RAY_MISSING.format(python=sys.executable)) from None
    return ray


def connect(address: str | None):
    """Join the Ray cluster at `address` ($RAY_ADDRESS when None; without either, start a Ray instance
    on this machine). Returns the ray module.

    Raises:
        ProxytuneError: Ray is not installed, or no cluster answers at the address.
    """
    ray = require_ray()
    if ray.is_initialized():
        return ray
    try:
        ray.init(address=address, logging_level="WARNING", configure_logging=True)
    except Exception as err:  # ConnectionError, a bad address format, a version mismatch, ...
        where = f"--address {address}" if address else "--executor ray"
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ProxytuneError(f"{where}: cannot start or join a Ray cluster: {first}") from None
    return ray


def check_fits(plan_: list[Stage], nodes: list[dict[str, float]]) -> None:
    """Every stage must fit on one node of the cluster, else Ray would wait for it forever.

    Args:
        nodes: each alive node's total resources ({"CPU": 8.0, "GPU": 1.0, ...}).
    Raises:
        ProxytuneError: naming the spec file and the resources key that asks too much.
    """
    has_gpus = any(node.get("GPU", 0) for node in nodes)
    for stage in plan_:
        gpus = stage.gpus if stage.gpus is not None else (1.0 if has_gpus else 0.0)
        if any(node.get("CPU", 0) >= stage.cpus and node.get("GPU", 0) >= gpus for node in nodes):
            continue
        largest = max(nodes, key=lambda n: (n.get("GPU", 0), n.get("CPU", 0)), default={})
        key = f"{stage.spec_file}: resources.{stage.kind}" if stage.spec_file and stage.kind else stage.name
        raise ProxytuneError(f"{key}: {stage.name} asks {stage.cpus:g} CPUs and {gpus:g} GPUs; no node of the Ray "
                             f"cluster has that many (largest: {largest.get('CPU', 0):g} CPUs, {largest.get('GPU', 0):g} GPUs)")


def alive_nodes(ray) -> list[dict[str, float]]:
    return [dict(node.get("Resources", {})) for node in ray.nodes() if node.get("Alive")]


def forwarded_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The driver's variables every stage gets (the rest comes from the worker's own environment)."""
    env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED) and k not in NOT_FORWARDED}
    return {**env, **(extra or {})}


def _shell_command(cmd: str) -> list[str]:
    """The command line DVC runs a stage's cmd with: $SHELL -c CMD (bash and zsh without their rc files)."""
    shell = os.environ.get("SHELL") or "/bin/sh"
    options = {"bash": ["--noprofile", "--norc"], "zsh": ["--no-rcs"]}.get(os.path.basename(shell).lower(), [])
    return [shell, *options, "-c", cmd]


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def run_stage(root: str, stage: Stage, env: dict[str, str]) -> dict:
    """Body of a stage's Ray task, on a worker: remove the outputs, run the commands, log their output.

    Returns {"rc", "attempt", "host", "seconds"}; rc is the first non-zero exit status, else 0.
    Raises:
        StageKilled: a command died from a signal (Ray retries the task).
        ProxytuneError: the project is not at `root` on this node.
    """
    import socket

    from proxytune.project import dvc_env

    host, start = socket.gethostname(), time.monotonic()
    project = Path(root)
    if not (project / "dvc.yaml").is_file():
        raise ProxytuneError(f"{host}: no project at {root}: the Ray executor needs the project on a file system "
                             f"every node mounts at the same path")
    log = project / stage.log
    log.parent.mkdir(parents=True, exist_ok=True)
    attempt = 1 + (log.read_text(errors="replace").count("\n== attempt ") if log.exists() else 0)
    rc = 0
    with open(log, "a") as stream:
        stream.write(f"\n== attempt {attempt} of {stage.name} on {host}, pid {os.getpid()}, at {time.time():.3f} ==\n")
        stream.flush()
        for out in stage.outs:  # as `dvc repro` does before running a stage
            _remove(project / out)
        # As many CPU threads as the stage asked for CPUs (a worker Ray reuses keeps its first task's
        # OMP_NUM_THREADS). On CPU the thread count changes float rounding: a serial run gives the same
        # bytes with the same OMP_NUM_THREADS.
        threads = str(max(int(stage.cpus), 1))
        full_env = dvc_env({**env, "DVC_ROOT": root, "DVC_STAGE": stage.name, "OMP_NUM_THREADS": threads})
        for cmd in stage.commands:
            stream.write(f"> {cmd}\n")
            stream.flush()
            # The stage stays in this worker's process group: when Ray reaps a dead worker's group,
            # the stage goes with it and cannot race the retry.
            rc = subprocess.run(_shell_command(cmd), cwd=root, env=full_env, stdin=subprocess.DEVNULL,
                                stdout=stream, stderr=subprocess.STDOUT).returncode
            if rc != 0:
                break
        stream.write(f"== exit {rc} after {time.monotonic() - start:.1f} s, at {time.time():.3f} ==\n")
    if rc < 0:
        raise StageKilled(f"{stage.name}: the stage process was killed by signal {-rc} on {host}")
    return {"rc": rc, "attempt": attempt, "host": host, "seconds": time.monotonic() - start}


def last_error(log: Path) -> str:
    """The line of a stage's log that says why it failed: its last `error:` line, else its last line."""
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no log"
    errors = [line for line in lines if line.startswith("error:") or "Error:" in line]
    return (errors or lines or ["no output"])[-1][:300]


def _reason(ray, err: Exception) -> str:
    if isinstance(err, ray.exceptions.RayTaskError):
        cause = err.cause if getattr(err, "cause", None) is not None else err
        return (str(cause).strip().splitlines() or [type(cause).__name__])[-1][:300]
    if isinstance(err, ray.exceptions.WorkerCrashedError):
        return "its worker died on every try (retries exhausted)"
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:300]


Event = Callable[[str, Stage, str], None]  # (started | ran | current | failed | skipped | waiting, stage, detail)


def execute(root: Path, plan_: list[Stage], env: dict[str, str], on_event: Event,
            max_retries: int = MAX_RETRIES, poll_s: float = 1.0) -> Outcome:
    """Run the plan on the connected Ray cluster; commit each finished stage; return what happened.

    A stage is submitted as soon as every stage upstream of it is committed. A KeyboardInterrupt
    cancels the running tasks (their stage processes die with their workers) and propagates.
    """
    ray = require_ray()
    nodes = alive_nodes(ray)
    check_fits(plan_, nodes)
    for stage in plan_:
        (root / stage.log).unlink(missing_ok=True)
    run = _Scheduler(ray, root, env, on_event, max_retries, any(node.get("GPU", 0) for node in nodes),
                     waiting={stage.name: stage for stage in plan_})
    try:
        while run.waiting or run.running:
            run.submit_ready()
            if not run.running:
                if run.waiting:  # cannot happen with an acyclic plan; never spin
                    raise ProxytuneError(f"internal: stages {', '.join(run.waiting)} wait for stages not in the plan")
                break
            done, _ = ray.wait(list(run.running), num_returns=1, timeout=poll_s)
            if not done:
                on_event("waiting", next(iter(run.running.values())), "")
                continue
            done, _ = ray.wait(list(run.running), num_returns=len(run.running), timeout=0)  # all that ended meanwhile
            for ref in done:
                run.finish(ref)
    except KeyboardInterrupt:
        for ref in run.running:
            ray.cancel(ref, force=True)
        raise
    return run.outcome


@dataclass
class _Scheduler:
    """One execute's state: the stages still waiting, the tasks running, the stages finished."""

    ray: object
    root: Path
    env: dict[str, str]
    on_event: Event
    max_retries: int
    has_gpus: bool
    waiting: dict[str, Stage]
    running: dict = field(default_factory=dict)  # object ref -> Stage
    finished: set[str] = field(default_factory=set)
    outcome: Outcome = field(default_factory=Outcome)

    def __post_init__(self) -> None:
        self.task = self.ray.remote(run_stage)

    def submit_ready(self) -> None:
        """Submit every stage whose upstream is finished; one found up to date counts as finished at once."""
        progressed = True
        while progressed:  # a stage found up to date can make its own downstream ready
            progressed = False
            for stage in [s for s in self.waiting.values() if all(u in self.finished for u in s.upstream)]:
                del self.waiting[stage.name]
                if not stage.stale and not still_stale(self.root, stage.name):
                    self.finished.add(stage.name)
                    self.outcome.current.append(stage.name)
                    self.on_event("current", stage, "")
                    progressed = True
                    continue
                gpus = stage.gpus if stage.gpus is not None else (1.0 if self.has_gpus else 0.0)
                ref = self.task.options(num_cpus=stage.cpus, num_gpus=gpus, max_retries=self.max_retries,
                                   retry_exceptions=[StageKilled], name=stage.name).remote(str(self.root), stage, self.env)
                self.running[ref] = stage
                self.on_event("started", stage, "")

    def finish(self, ref) -> None:
        """Record one ended task: commit its stage, or fail it (and skip what is downstream)."""
        stage = self.running.pop(ref)
        try:
            result = self.ray.get(ref)
        except self.ray.exceptions.RayError as err:
            self.outcome.attempts[stage.name] = self.max_retries + 1
            self.fail(stage, _reason(self.ray, err))
            return
        self.outcome.attempts[stage.name] = result["attempt"]
        if result["rc"] != 0:
            self.fail(stage, f"exit {result['rc']}: {last_error(self.root / stage.log)} (log: {stage.log})")
            return
        try:
            commit(self.root, stage.name)  # one at a time, here in the driver
        except ProxytuneError as err:
            self.fail(stage, str(err))
            return
        self.finished.add(stage.name)
        self.outcome.ran.append(stage.name)
        tries = f", after {result['attempt']} tries" if result["attempt"] > 1 else ""
        self.on_event("ran", stage, f"{result['seconds']:.0f} s on {result['host']}{tries}")

    def fail(self, stage: Stage, why: str) -> None:
        self.outcome.failed[stage.name] = why
        self.on_event("failed", stage, why)
        blocked = {stage.name}
        for other in list(self.waiting.values()):  # plan order: upstream first, so one pass suffices
            if any(name in blocked for name in other.upstream):
                blocked.add(other.name)
                self.outcome.skipped[other.name] = stage.name
                del self.waiting[other.name]
                self.on_event("skipped", other, stage.name)
