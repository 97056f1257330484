"""The card `apply` will run its stages on: found through torch in a short child process, matched to the
GPU table by name for its throughput.

Imports nothing heavy: `apply` on a machine without a GPU driver answers from two file checks and never
imports torch. The probe runs in a child process so that the long-lived `apply` process never initialises
CUDA (its context would hold GPU memory while the stages run).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from proxytune.plan.gpus import GPUS, Gpu, custom_gpu

GIB = 2**30
# A GPU driver leaves these behind (NVIDIA's and ROCm's); without any of them torch.cuda finds no device.
DRIVER_FILES = ("/proc/driver/nvidia/version", "/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd")
_PROBE = ("import json, torch\n"
          "cards = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())] "
          "if torch.cuda.is_available() else []\n"
          "print(json.dumps([[c.name, c.total_memory] for c in cards]))")


@dataclass(frozen=True)
class Card:
    """A visible CUDA device as torch reports it."""

    name: str
    total_bytes: int


def detect() -> list[Card]:
    """The CUDA devices the stages will see (torch.cuda, honouring CUDA_VISIBLE_DEVICES); [] on CPU.

    Raises:
        RuntimeError: a driver is there but torch could not be asked (the message says why).
    """
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return []
    if not any(Path(path).exists() for path in DRIVER_FILES):
        return []
    try:
        result = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=180)
    except (OSError, subprocess.SubprocessError) as err:
        raise RuntimeError(str(err)) from None
    if result.returncode != 0:
        raise RuntimeError((result.stderr.strip().splitlines() or [f"exit {result.returncode}"])[-1])
    return [Card(name, int(total)) for name, total in json.loads(result.stdout.strip().splitlines()[-1])]


def _tokens(name: str) -> set[str]:
    """'NVIDIA GeForce RTX 4090' -> its words and each pair of neighbours joined (RTX4090), upper case."""
    words = [w for w in re.split(r"[^A-Z0-9]+", name.upper()) if w]
    return set(words) | {a + b for a, b in zip(words, words[1:])}


def as_gpu(card: Card) -> tuple[Gpu, bool]:
    """The plan's Gpu for a card: its name and memory, the throughput of the table's GPU of that name (of
    the nearest memory where the table has two sizes, A100 40/80 GB); (gpu, True) when the name was known,
    else an A100's throughput and False."""
    memory = card.total_bytes / GIB
    words = _tokens(card.name)
    known = [gpu for gpu in GPUS.values() if gpu.name.split("-")[0].upper() in words]
    like = min(known, key=lambda gpu: abs(gpu.memory_gib - memory)) if known else custom_gpu(memory)
    return Gpu(card.name, memory, like.bf16_tflops, like.fp32_tflops, like.bandwidth_gbs), bool(known)
