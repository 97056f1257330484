"""A plan as a table for people or a JSON document for scripts (the same numbers)."""

from __future__ import annotations

from proxytune.plan.estimate import GIB
from proxytune.plan.gpus import EFFICIENCY, RESERVED_GIB
from proxytune.plan.stages import Plan


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def lines(plan: Plan) -> list[str]:
    """The table: one row per stage (GiB), then each stage's setting, notes and the way under budget."""
    budget = plan.gpu.memory_gib - RESERVED_GIB
    out = [f"plan of {plan.spec} on {plan.gpus} x {plan.gpu.name} ({plan.gpu.memory_gib:g} GiB, "
           f"{budget:.1f} usable); per subject ({plan.subjects} in the spec)",
           f"{'stage':<19} {'weights':>8} {'grads':>7} {'optim':>7} {'activ':>7} {'peak':>7}  {'time':>8}  fits"]
    for s in plan.stages:
        out.append(f"{s.stage:<19} {s.weights / GIB:>8.2f} {s.gradients / GIB:>7.2f} {s.optimizer / GIB:>7.2f} "
                   f"{s.activations / GIB:>7.2f} {s.peak / GIB:>7.2f}  {_duration(s.seconds):>8}  "
                   f"{'yes' if s.fits else 'NO'}")
    for s in plan.stages:
        out.append(f"  {s.stage}: {s.what}")
        out.extend(f"    {note}" for note in s.notes)
        if not s.fits and s.suggestion:
            out.append(f"    to fit: {s.suggestion}")
    out.extend(plan.notes)
    if any(s.setup > s.weights + s.gradients + s.optimizer + s.activations for s in plan.stages):
        out.append("(a peak above its columns' sum is the stage's start, before its text encoders leave the GPU)")
    out.append(f"(GiB; time at {EFFICIENCY:.0%} of the GPU's peak FLOPs, bf16 where the stage computes in it; "
               f"{RESERVED_GIB} GiB kept for the CUDA context and fragmentation)")
    return out


def as_json(plan: Plan) -> dict:
    """The same numbers for scripts: bytes, seconds and `fits` per stage."""
    return {
        "spec": plan.spec, "gpu": plan.gpu.name, "gpu_memory_gib": plan.gpu.memory_gib, "gpus": plan.gpus,
        "usable_gib": plan.gpu.memory_gib - RESERVED_GIB, "efficiency": EFFICIENCY, "subjects": plan.subjects,
        "fits": all(s.fits for s in plan.stages),
        "stages": [{"stage": s.stage, "setting": s.what, "weights_bytes": s.weights, "gradients_bytes": s.gradients,
                    "optimizer_bytes": s.optimizer, "activations_bytes": s.activations, "setup_bytes": s.setup,
                    "peak_bytes": s.peak,
                    "peak_gib": round(s.peak / GIB, 3), "flops": s.flops, "seconds": s.seconds, "fits": s.fits,
                    "to_fit": s.suggestion, "notes": s.notes} for s in plan.stages],
        "notes": plan.notes,
    }
