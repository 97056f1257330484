"""Run one stage (what DVC's `proxytune stage STEP --params FILE` does): in this process, or again
under `accelerate launch` when its spec section asks for several data-parallel processes."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

from proxytune import layout
from proxytune.errors import ProxytuneError, disk_full_message

# The stages that can run data-parallel: their spec section has `processes`, and their module's
# `processes(params_path)` reads it. Every other stage runs as one process.
DATA_PARALLEL = ("teacher", "synthesis", "student")
assert set(DATA_PARALLEL) <= set(layout.STEPS)
LAUNCHED_ENV = layout.LAUNCHED_ENV  # set for the processes accelerate starts: they run the stage itself


def process_count(step: str, params_path: str) -> int:
    """How many processes stage `step` runs with, as its params file says."""
    if step not in DATA_PARALLEL:
        return 1
    return importlib.import_module(f"proxytune.stages.{step}").processes(params_path)


def run_stage(step: str, params_path: str, echo_err: Callable[[str], None]) -> int:
    """Run stage `step` with its params file; return the exit code (0 when it ran here and finished).

    Raises:
        ProxytuneError: the stage's own errors, and a full disk (named by the subject's folder when the
            error names no file).
    """
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # keep stage logs to progress and results
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

    module = importlib.import_module(f"proxytune.stages.{step}")
    processes = process_count(step, params_path)
    if processes > 1 and LAUNCHED_ENV not in os.environ:
        return _launch(step, params_path, processes, echo_err)
    try:
        module.run(params_path)
    except Exception as err:  # a full disk: name the subject's folder when the error names no file
        message = disk_full_message(err, fallback=str(Path(params_path).parent))
        if message is None:
            raise
        raise ProxytuneError(message) from None
    return 0


def _launch(step: str, params_path: str, processes: int, echo_err: Callable[[str], None]) -> int:
    """Re-run this stage under `accelerate launch` with `processes` data-parallel processes.

    The stage module says how many (from its spec section); CPU processes use the gloo backend.
    """
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    # --multi_gpu means "torchrun, one process per rank"; without GPUs the stage asks accelerate for
    # CPU processes (PartialState(cpu=True): gloo). `--cpu` would start a single process.
    command += ["--multi_gpu"]
    command += ["-m", "proxytune.cli", "stage", step, "--params", params_path]
    echo_err(f"{step}: launching {processes} processes with accelerate")
    return subprocess.call(command, env={**os.environ, LAUNCHED_ENV: "1"})
