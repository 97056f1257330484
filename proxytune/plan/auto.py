"""The spec's `memory:` mode: which options to change so that each stage fits a card, from its plan.

    checkpointing  gradient_checkpointing on for a training stage that does not fit, where the spec
                   leaves the field unset (it recomputes activations: the same numbers, more time)
    auto           every change plan's search suggests (`options.suggest`: the fewest that fit, then the
                   fastest); a smaller batch_size raises gradient_accumulation_steps to keep the images a step
    manual         nothing

`proxytune plan` and `apply` both call `adapt`, so both show and run the same settings for a card.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from proxytune.plan.gpus import Gpu
from proxytune.plan.stages import Plan, plan_spec

TRAINING = ("teacher", "student")  # the sections (and plan stages) that train and can checkpoint


@dataclass
class Adapted:
    """A spec after its memory mode, its plan on the card, and what the mode changed ("student.batch_size": 1)."""

    spec: object
    plan: Plan
    changes: dict[str, object] = field(default_factory=dict)

    def record(self) -> dict:
        """What the params files keep of the choice (not a DVC param: it only says why the values are what they are)."""
        return {"mode": self.spec.memory, "gpu": self.plan.gpu.name, "gpu_memory_gib": round(self.plan.gpu.memory_gib, 2),
                "changes": dict(self.changes)}

    def line(self) -> str:
        """One line for people: what the mode did on this card."""
        gpu = self.plan.gpu
        where = f"a {gpu.name} card" if gpu.name.endswith(" GiB") else f"the {gpu.name} ({gpu.memory_gib:.1f} GiB)"
        if not self.changes:
            return f"memory: {self.spec.memory}: nothing to change on {where}"
        shown = ", ".join(f"{key}: {str(value).lower() if isinstance(value, bool) else value}"
                          for key, value in self.changes.items())
        return f"memory: {self.spec.memory} on {where}: {shown}"


def _merge(into: dict, changes: dict) -> None:
    """Two stages of one section (synthesis and the teacher's evaluation images) may ask for different batches:
    the smaller one fits both."""
    for key, value in changes.items():
        into[key] = min(into[key], value) if key == "batch_size" and key in into else value


def _wanted(spec, plan: Plan) -> dict[str, dict]:
    """section -> field -> value, as the spec's memory mode asks on this plan."""
    over = {stage.stage for stage in plan.stages if not stage.fits}
    wanted: dict[str, dict] = {}
    if spec.memory == "checkpointing":
        for section in TRAINING:
            settings = getattr(spec, section)
            if section in over and not settings.gradient_checkpointing and "gradient_checkpointing" not in settings.model_fields_set:
                wanted[section] = {"gradient_checkpointing": True}
    elif spec.memory == "auto":
        for found in plan.suggestions.values():
            _merge(wanted.setdefault(found.section, {}), found.changes)
    for section, changes in wanted.items():
        old = getattr(spec, section)
        if section in TRAINING and changes.get("batch_size", old.batch_size) < old.batch_size:
            # the optimiser sees as many images a step as before (exactly when the batch divides)
            changes["gradient_accumulation_steps"] = old.gradient_accumulation_steps * max(1, old.batch_size // changes["batch_size"])
    return wanted


def adapt(spec, source: str, root, gpu: Gpu, gpus: int = 1) -> Adapted:
    """Plan `spec` (an ExperimentSpec) on `gpus` x `gpu` and apply its memory mode.

    Returns:
        The spec with the mode's changes, the plan of that spec (so its `fits` and `to fit` lines are of what
        will run), and the changes by "section.field".
    """
    plan = plan_spec(spec, source, root, gpu, gpus)
    wanted = _wanted(spec, plan) if spec.memory != "manual" else {}
    if not wanted:
        return Adapted(spec, plan)
    update = {section: getattr(spec, section).model_copy(update=changes) for section, changes in wanted.items()}
    adapted = spec.model_copy(update=update)
    flat = {f"{section}.{key}": value for section, changes in wanted.items() for key, value in changes.items()}
    return Adapted(adapted, plan_spec(adapted, source, root, gpu, gpus), flat)
