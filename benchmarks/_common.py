"""Helpers shared by the benchmark scripts in this folder (not part of the proxytune package).

Timing: every variant is set up in the same process, warmed up, then timed in interleaved
rounds (A B, B A, A B, ...) with `time.perf_counter`; the figure reported is the median over rounds.
On a shared machine other processes' load distorts timings badly (torch's default threads spin
against them), so each round first waits, within a bounded budget, until the others use under
0.3 cores, and the CPU the others used during each round (from /proc/stat minus our own CPU time)
is printed with the round; rounds where they used over 0.5 cores are counted as disturbed. The
kernel accounts CPU in 10 ms ticks, so the figure is rough for rounds much shorter than a second.

Memory: for each variant the script starts itself again in a fresh subprocess (`--probe NAME`)
that sets up only that variant and runs a couple of its steps, and reports from /proc/self/status:
  * peak RSS: the whole process's high-water mark (Python, torch, the models, setup and steps);
  * step peak: how far the high-water mark rose above the RSS right after setup while the steps
    ran (the mark is reset through /proc/self/clear_refs first). This is what one step of that
    variant costs on top of the loaded model; glibc may reuse freed pages, so it is a lower bound.
Both are RSS, so they count every allocation (torch tensors, Python objects, allocator slack),
not only tensors.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
PROBE_MARK = "BENCH-PROBE-RESULT "


# -----------------------------------------------------------------------------
# environment


def prepare_env() -> None:
    """Tiny-model cache, DreamBench copy, quiet libraries; call before importing proxytune."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TQDM_DISABLE", "1")
    if "PROXYTUNE_HOME" not in os.environ:
        home = tempfile.mkdtemp(prefix="proxytune-bench-home-")
        os.environ["PROXYTUNE_HOME"] = home  # probes inherit it, so the tiny models are built once
        atexit.register(shutil.rmtree, home, True)
    for path in (REPO / "tests", REPO):
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))
    from conftest import dreambench_dir  # the tests' rule: $PROXYTUNE_DREAMBENCH, else ../shared/dreambench

    os.environ["PROXYTUNE_DREAMBENCH"] = str(dreambench_dir())
    import warnings

    warnings.filterwarnings("ignore")
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    diffusers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()


def dreambench_subject(name: str = "dog") -> Path:
    folder = Path(os.environ["PROXYTUNE_DREAMBENCH"]) / name
    if not folder.is_dir():
        sys.exit(f"DreamBench copy not found at {folder.parent}: set PROXYTUNE_DREAMBENCH")
    return folder


def temp_project(prefix: str) -> Path:
    """An empty project folder (specs/ inside), removed at exit; the cwd moves into it like the tests'."""
    root = Path(tempfile.mkdtemp(prefix=f"proxytune-bench-{prefix}-"))
    (root / "specs").mkdir()
    atexit.register(shutil.rmtree, root, True)
    os.chdir(root)
    return root


def machine() -> str:
    import torch

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    device = "CUDA " + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    return (
        f"{device}, {cpus} cores available, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"{platform.system()} {platform.machine()}, Python {platform.python_version()}"
    )


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


# -----------------------------------------------------------------------------
# arguments


def parser(description: str, *, warmup: int, repeats: int, inner: int) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--warmup", type=int, default=warmup, help="untimed calls per variant before timing")
    p.add_argument("--repeats", type=int, default=repeats, help="timed rounds per variant (median reported)")
    p.add_argument("--inner", type=int, default=inner, help="calls per timed round")
    p.add_argument("--no-memory", action="store_true", help="skip the per-variant memory subprocesses")
    p.add_argument("--probe", help=argparse.SUPPRESS)  # internal: measure one variant's memory and exit
    p.add_argument("--probe-config", help=argparse.SUPPRESS)
    return p


# -----------------------------------------------------------------------------
# timing


# Other people's processes share the cores: before each timed round we wait (a bounded time) until
# they are quiet, and we record how much CPU they took during the round, so a disturbed figure shows.
QUIET_CORES = 0.3  # others' load below which a round may start
DISTURBED_CORES = 0.5  # others' load during a round above which the round is flagged
MAX_WAIT_ROUND_S = 15.0
MAX_WAIT_TOTAL_S = 60.0


def _busy_seconds() -> float | None:
    """CPU seconds all processes have spent busy (user, nice, system, irq, softirq, steal), all cores."""
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    busy = values[0] + values[1] + values[2] + values[5] + values[6] + values[7]
    return busy / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    return time.process_time()  # every thread of this process, not its children


class OthersLoad:
    """Cores' worth of CPU used by other processes between enter and exit (None without /proc/stat)."""

    def __enter__(self):
        self.busy, self.own, self.start = _busy_seconds(), _own_seconds(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        busy, wall = _busy_seconds(), time.perf_counter() - self.start
        if busy is None or self.busy is None or wall <= 0:
            self.cores = None
        else:
            self.cores = max(0.0, (busy - self.busy) - (_own_seconds() - self.own)) / wall
        return False


class Samples:
    """Per-variant seconds per call, others' load during each round, and time spent waiting."""

    def __init__(self, names: list[str]):
        self.times: dict[str, list[float]] = {n: [] for n in names}
        self.others: dict[str, list[float | None]] = {n: [] for n in names}
        self.waited = 0.0

    def disturbed(self) -> int:
        return sum(1 for loads in self.others.values() for c in loads if c is not None and c > DISTURBED_CORES)

    def rounds(self) -> int:
        return sum(len(t) for t in self.times.values())

    def note(self) -> str:
        worst = max((c for loads in self.others.values() for c in loads if c is not None), default=None)
        text = f"other processes: {self.disturbed()} of {self.rounds()} timed rounds above {DISTURBED_CORES} cores"
        if worst is not None:
            text += f" (worst {worst:.2f} cores)"
        return text + f"; {self.waited:.0f} s spent waiting for quiet"


_wait_budget = [MAX_WAIT_TOTAL_S]


def wait_quiet() -> float:
    """Sleep until others use < QUIET_CORES (0.5 s windows), within the per-round and total budgets."""
    waited = 0.0
    while waited < min(MAX_WAIT_ROUND_S, _wait_budget[0]):
        with OthersLoad() as load:
            time.sleep(0.5)
        waited += 0.5
        if load.cores is None or load.cores < QUIET_CORES:
            break
    _wait_budget[0] = max(0.0, _wait_budget[0] - waited)
    return waited


def time_interleaved(
    fns: dict[str, Callable[[], object]], *, warmup: int, repeats: int, inner: int, log: bool = True
) -> Samples:
    """Seconds per call of each function: `repeats` rounds of `inner` calls, rounds interleaved."""
    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
    names = list(fns)
    samples = Samples(names)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            samples.waited += wait_quiet()
            with OthersLoad() as load:
                start = time.perf_counter()
                for _ in range(inner):
                    fns[name]()
                elapsed = time.perf_counter() - start
            samples.times[name].append(elapsed / inner)
            samples.others[name].append(load.cores)
        if log:
            say(f"  round {r + 1}/{repeats}: " + ", ".join(
                f"{n} {samples.times[n][-1]:.4f}s (others {_cores(samples.others[n][-1])})" for n in names))
    return samples


def timed(fn: Callable[[], object]) -> float:
    """Seconds one call takes (e.g. a first call that compiles)."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def compile_summary(what: str, t_compiled: float, t_peer: float, t_eager: float, compile_s: float,
                    target: float, unit: str = "calls") -> str:
    """The RESULT line of a compiled variant: its time ratio to the peer, and its one-off compile cost
    (`compile_s`: the first call less what a compiled call takes) with the number of `unit` (each timed as
    `t_compiled` and `t_eager`) after which it pays back against the eager variant."""
    ratio, saved = t_compiled / t_peer, t_eager - t_compiled
    payback = f"pays back after {compile_s / saved:,.0f} {unit}" if saved > 0 else "never pays back (no faster than eager)"
    return (f"  RESULT: {what} = {ratio:.3f}x (target <= {target:g}x): {verdict(ratio <= target)}; compiled/eager "
            f"{t_compiled / t_eager:.3f}x; one-off compile {compile_s:.1f} s, {payback}")


def _cores(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f} cores"


def median(values: list[float]) -> float:
    return statistics.median(values)


def spread(values: list[float]) -> str:
    return f"{min(values):.4f}-{max(values):.4f}"


# -----------------------------------------------------------------------------
# memory


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux >= 4.0: VmHWM := current RSS
        return True
    except OSError:
        return False


def probe_memory(setup: Callable[[], Callable[[], object]], steps: int) -> None:
    """Child side: set up one variant, run `steps` calls, print the RSS figures and exit."""
    step = setup()
    after_setup = _status_kib("VmRSS")
    # getrusage's peak also follows the resettable mark on a live process: read it before resetting
    lifetime = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    reset = _reset_peak()
    for _ in range(steps):
        step()
    hwm = _status_kib("VmHWM")
    peak = max(lifetime, hwm or 0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    result = {
        "peak_rss_mib": peak / 1024,
        "after_setup_rss_mib": after_setup / 1024 if after_setup else None,
        "step_peak_mib": (hwm - after_setup) / 1024 if reset and hwm and after_setup else None,
    }
    print(PROBE_MARK + json.dumps(result), flush=True)


def run_probes(script: str, names: list[str], config: dict | None = None, timeout: float = 180) -> dict[str, dict | None]:
    """Parent side: one fresh subprocess per variant; None where a probe failed."""
    results: dict[str, dict | None] = {}
    for name in names:
        cmd = [sys.executable, script, "--probe", name]
        if config is not None:
            cmd += ["--probe-config", json.dumps(config)]
        say(f"  memory probe: {name} (fresh process)")
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=os.environ.copy())
        except subprocess.TimeoutExpired:
            say(f"  memory probe {name}: timed out after {timeout:.0f}s")
            results[name] = None
            continue
        lines = [line for line in proc.stdout.splitlines() if line.startswith(PROBE_MARK)]
        if proc.returncode != 0 or not lines:
            tail = "\n".join(proc.stderr.strip().splitlines()[-8:])
            say(f"  memory probe {name} failed (exit {proc.returncode}):\n{tail}")
            results[name] = None
            continue
        results[name] = json.loads(lines[-1][len(PROBE_MARK) :])
    return results


def fmt_mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}"


# -----------------------------------------------------------------------------
# output


def say(text: str) -> None:
    print(text, flush=True)


def table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, ["-" * w for w in widths], *rows]:
        say(("  " + "  ".join(str(cell).ljust(w) for cell, w in zip(row, widths))).rstrip())


def memory_rows(memory: dict[str, dict | None], names: list[str]) -> list[list[str]]:
    rows = []
    for name in names:
        m = memory.get(name) or {}
        rows.append([name, fmt_mib(m.get("peak_rss_mib")), fmt_mib(m.get("after_setup_rss_mib")), fmt_mib(m.get("step_peak_mib"))])
    return rows


MEMORY_HEADER = ["variant", "peak RSS MiB", "RSS after setup MiB", "step peak above setup MiB"]


def verdict(met: bool) -> str:
    return "target met" if met else "target NOT met"
