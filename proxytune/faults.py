"""Deterministic crash points for reliability tests: a no-op unless PROXYTUNE_CRASH_AT is set.

`PROXYTUNE_CRASH_AT=STAGE:POINT[:N]` (several separated by commas) makes the process die hard
(`os._exit`, like SIGKILL: no `finally`, no MLflow end_run, no cleanup) when it reaches that
point. Points in use:

    teacher:step:N       after teacher step N (and its checkpoint, if N is a checkpoint step)
    synthesis:batch:N    after the N-th batch of proxy images of this process is written
    student:step:N       after student step N
    evaluate:generated   after every image of the evaluation is generated, before scoring
    STAGE:registered     after STAGE (teacher, student or style_student) registered its adapter version,
                         before its output folder is renamed into place

Without N a point matches every time it is reached.

With `PROXYTUNE_CRASH_GROUP=1` the point kills its whole process group with SIGKILL instead (the
apply, `dvc repro` and the stage, as a terminal's kill or an out-of-memory kill of the job would):
start the apply in a session of its own (`setsid`, `start_new_session=True`) so nothing else dies.
"""

from __future__ import annotations

import os
import sys

ENV = "PROXYTUNE_CRASH_AT"
GROUP_ENV = "PROXYTUNE_CRASH_GROUP"
EXIT_CODE = 137  # what a shell reports for a process killed by SIGKILL


def _matches(item: str, stage: str, point: str, n: int | None) -> bool:
    parts = item.strip().split(":")
    if len(parts) not in (2, 3) or parts[0] != stage or parts[1] != point:
        return False
    return len(parts) == 2 or (n is not None and parts[2] == str(n))


def kill_point(stage: str, point: str, n: int | None = None) -> None:
    """Die now if PROXYTUNE_CRASH_AT names this point; otherwise do nothing."""
    wanted = os.environ.get(ENV)
    if not wanted or not any(_matches(item, stage, point, n) for item in wanted.split(",")):
        return
    where = f"{stage}:{point}" + (f":{n}" if n is not None else "")
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os.write(2, f"proxytune: simulated crash at {where} ({ENV})\n".encode())
    if os.environ.get(GROUP_ENV) == "1":
        import signal

        os.killpg(os.getpgrp(), signal.SIGKILL)
    os._exit(EXIT_CODE)
