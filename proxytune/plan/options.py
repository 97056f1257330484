"""Which of the spec's existing options would bring a stage under the GPU's memory.

Fewest changes first; among those, one that keeps the model's numerics (no quantised base) if any fits,
then the fastest plan, then one that keeps the batch. Batch sizes are halved down to 1 (the report says to
raise gradient_accumulation_steps so the optimiser sees the same batch). A quantised base is int8 unless no
setting with int8 fits; only then is the search repeated with nf4 in its place.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from proxytune.plan import estimate
from proxytune.plan.gpus import Gpu

# spec fields that save memory and the value that does, per training stage; a tuple: one value per search,
# tried in order while none fits (int8 first, nf4 only where int8 is not enough; fp8 saves what int8 saves
# with coarser rounding, so it is never proposed)
TEACHER_SWITCHES = {"mixed_precision": "bf16", "gradient_checkpointing": True, "use_8bit_adam": True,
                    "quantize": ("int8", "nf4")}
STUDENT_SWITCHES = {"mixed_precision": "bf16", "gradient_checkpointing": True, "use_8bit_adam": True}
SYNTHESIS_SWITCHES = {"dtype": "bfloat16", "cpu_offload": True, "vae_tiling": True, "quantize": ("int8", "nf4")}
LOSSIER = {"none": 0, "int8": 1, "fp8": 2, "nf4": 3}  # a quantised base: how far from the unquantised
# changes that alter what the model computes, not only how: proposed only when nothing else as small fits
NUMERICS = {("teacher", "quantize"), ("synthesis", "quantize")}
# switches the spec refuses together (student.sharding: fsdp with use_8bit_adam)
EXCLUSIVE = [{"sharding", "use_8bit_adam"}]


@dataclass(frozen=True)
class Suggestion:
    """A setting under which a stage fits: what to change, said for people, and its estimate."""

    section: str  # the spec section the changes belong to ("teacher", "student", "synthesis")
    changes: dict  # spec field within `section` -> its new value (batch_size included)
    text: str  # the changes as the report prints them
    estimate: estimate.StageEstimate  # the stage under those changes


def _batches(batch: int) -> list[int]:
    out = [batch]
    while out[-1] > 1:
        out.append(out[-1] // 2)
    return out


def _describe(section: str, changes: dict, old_batch: int) -> str:
    parts = [f"{section}.{key}: {str(value).lower() if isinstance(value, bool) else value}"
             for key, value in changes.items() if key != "batch_size"]
    if "batch_size" in changes:
        keep = (f" (gradient_accumulation_steps x{old_batch // changes['batch_size']} keeps the batch)"
                if section != "synthesis" else "")
        parts.append(f"{section}.batch_size: {changes['batch_size']}{keep}")
    return ", ".join(parts)


def suggest(section: str, spec, estimator, switches: dict, gpu: Gpu) -> Suggestion | None:
    """The fewest changes to `spec` (a TeacherSpec, StudentSpec or SynthesisSpec) under which
    `estimator(spec)` fits `gpu`, with that estimate; None if none does.

    Args:
        section: the spec key, for the message ("teacher").
        estimator: spec -> StageEstimate.
        switches: field -> the value that saves memory, -> {field: value, ...} for fields that change
            together (sharding with its processes), or -> a tuple of values: the first search uses each
            tuple's first value, and while none fits the next search its next.
    """
    rounds = max((len(value) for value in switches.values() if isinstance(value, tuple)), default=1)
    for n in range(rounds):
        chosen = {key: value[min(n, len(value) - 1)] if isinstance(value, tuple) else value
                  for key, value in switches.items()}
        found = _fewest_changes(section, spec, estimator, chosen, gpu)
        if found is not None:
            return found
    return None


def _saves(spec, key: str, value) -> bool:
    """Whether setting `key` to `value` (or to `value[key]`, for fields that change together) is a change
    worth trying: another value, and for a quantised base a lossier one than the spec's (its int8 may
    become nf4, never the reverse)."""
    current, value = getattr(spec, key), value[key] if isinstance(value, dict) else value
    if key == "quantize":
        return LOSSIER[value] > LOSSIER[current]
    return current != value


def _fewest_changes(section: str, spec, estimator, switches: dict, gpu: Gpu) -> Suggestion | None:
    """`suggest` with one value (or one group of fields) a switch."""
    free = {key: value for key, value in switches.items() if hasattr(spec, key) and _saves(spec, key, value)}
    candidates = []
    for size in range(len(free) + 1):
        for keys in itertools.combinations(free, size):
            if any(pair <= set(keys) for pair in EXCLUSIVE):
                continue
            for batch in _batches(spec.batch_size):
                changes = {}
                for key in keys:
                    changes.update(free[key] if isinstance(free[key], dict) else {key: free[key]})
                if batch != spec.batch_size:
                    changes["batch_size"] = batch
                if changes:
                    candidates.append((size + (batch != spec.batch_size), changes))
    candidates.sort(key=lambda item: item[0])  # stable: smaller batches later within the same count of changes
    for _, group in itertools.groupby(candidates, key=lambda item: item[0]):
        found = []
        for _, changes in group:
            candidate = estimator(spec.model_copy(update=changes))
            if candidate.check(gpu):
                numerics = any((section, key) in NUMERICS for key in changes)
                found.append((numerics, candidate.seconds, "batch_size" in changes,
                              Suggestion(section, changes, _describe(section, changes, spec.batch_size), candidate)))
        if found:  # the fastest; at equal time, a smaller batch last (it uses the GPU less well than the model says)
            return min(found, key=lambda item: item[:3])[3]
    return None
