"""The fixed cost of a stage's tracked (MLflow) run: where it goes, and whether importing mlflow in a
background thread while the model loads would hide it.

Each measurement is a fresh process (imports are the cost, and a process imports once), with torch,
transformers and diffusers already imported as in a stage, on an embedded sqlite store that already
exists (as after `apply` created its parent run).

  phases:    imports mlflow, then its sqlite stores, then times each step `StageRun.__enter__` takes
             (client and store, experiment, git commit, version tags, start_run) and `__exit__`.
  start:     a stage's start: `seed_everything`, load the tiny LlamaGen student, then open and close
             the tracked run; the figure is the time from before the load to the open run.
             baseline: as the stages do it (mlflow imported when the run opens);
             preload:  a thread started before the load imports mlflow and its sqlite stores (an
                       experiment, not in proxytune: on 2 busy cores it did not pay, see the README).
             Baseline and preload alternate.

    python benchmarks/stage_run_start.py             # ~1-2 minutes on 2 cores
    python benchmarks/stage_run_start.py --repeats 7
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import _common as C

SCRIPT = os.path.abspath(__file__)
MARK = "STAGE-RUN-START "


def child(kind: str, root: str) -> None:
    """Runs in a fresh process: prints MARK + JSON {phase: seconds}."""
    C.prepare_env()
    import diffusers  # noqa: F401  (a stage has these imported before its run starts)
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from pathlib import Path

    from proxytune.tracking import runs, store

    root_path = Path(root)
    uri = store.resolve_uri(None, root_path)
    times: dict[str, float] = {}
    clock = [time.perf_counter()]

    def lap(name: str) -> None:
        now = time.perf_counter()
        times[name] = now - clock[0]
        clock[0] = now

    if kind == "phases":
        import mlflow  # noqa: F401

        lap("import mlflow")
        import mlflow.store.model_registry.sqlalchemy_store  # noqa: F401
        import mlflow.store.tracking.sqlalchemy_store  # noqa: F401

        lap("import sqlite stores")
        store.connect(uri)
        lap("client + store on the existing db")
        experiment = store.experiment_id("bench", uri, root_path)
        lap("experiment id")
        store.git_commit(root_path)
        lap("git commit")
        store.version_tags()
        lap("version tags (package metadata)")
        store.owner_tags()
        mlflow.start_run(experiment_id=experiment, run_name="bench", tags={"a": "b"})
        lap("start_run")
        mlflow.end_run()
        lap("end_run")
        print(MARK + json.dumps(times))
        return
    from proxytune.backends import students
    from proxytune.stages import runtime

    runtime.seed_everything(0)
    if kind == "preload":
        import threading

        def imports() -> None:
            import mlflow  # noqa: F401
            import mlflow.store.model_registry.sqlalchemy_store  # noqa: F401
            import mlflow.store.tracking.sqlalchemy_store  # noqa: F401

        thread = threading.Thread(target=imports, daemon=True)
        thread.start()
    students.load_student("tiny-llamagen")
    if kind == "preload":
        thread.join()
    lap("seed + model load")
    run = runs.StageRun(experiment="bench", subject="dog", stage="student", uri=uri, root=root_path, tags={})
    run.__enter__()
    lap("open the run")
    run.__exit__(None, None, None)
    times["load to open run"] = times["seed + model load"] + times["open the run"]
    print(MARK + json.dumps(times))


def measure(kind: str, root: str) -> dict[str, float]:
    out = subprocess.run([sys.executable, SCRIPT, "--child", kind, root], capture_output=True, text=True, timeout=300)
    line = [l for l in out.stdout.splitlines() if l.startswith(MARK)]
    if not line:
        sys.exit(f"child {kind} failed:\n{out.stderr[-3000:]}")
    return json.loads(line[0][len(MARK):])


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3])
        return
    p = C.parser(__doc__.splitlines()[0], warmup=1, repeats=5, inner=1)
    args = p.parse_args()
    C.prepare_env()
    C.say(f"stage_run_start: {C.now()}; {C.machine()}")
    root = str(C.temp_project("stage-run"))
    measure("phases", root)  # creates the store (schema and migrations: once per project) and warms the caches
    measure("baseline", root)  # builds the tiny model into $PROXYTUNE_HOME
    phases: dict[str, list[float]] = {}
    start: dict[str, list[float]] = {"baseline": [], "preload": []}
    for r in range(args.repeats):
        for kind in (("baseline", "preload") if r % 2 == 0 else ("preload", "baseline")):
            C.wait_quiet()
            start[kind].append(measure(kind, root)["load to open run"])
        for name, seconds in measure("phases", root).items():
            phases.setdefault(name, []).append(seconds)
    C.say("\n== where a stage's tracked run spends its start (fresh process each, medians of "
          f"{args.repeats}; torch, transformers, diffusers already imported)")
    C.table(["phase", "median s", "min-max s"], [[k, f"{C.median(v):.3f}", C.spread(v)] for k, v in phases.items()])
    total = sum(C.median(v) for v in phases.values())
    C.say(f"  sum of medians: {total:.2f} s")
    base, pre = C.median(start["baseline"]), C.median(start["preload"])
    C.say("\n== from seed_everything to an open run (tiny-llamagen load in between), interleaved")
    C.table(["variant", "median s", "min-max s"],
            [["baseline (mlflow imported when the run opens)", f"{base:.2f}", C.spread(start["baseline"])],
             ["preload (imported while the model loads)", f"{pre:.2f}", C.spread(start["preload"])]])
    C.say(f"  RESULT: preload / baseline = {pre / base:.2f}x (preload changes a stage start by {pre - base:+.2f} s)")


if __name__ == "__main__":
    main()
