"""`apply`'s fit check: before any stage runs on a GPU, plan every stage for that card (the same estimate
as `proxytune plan`), apply each spec's `memory:` mode, and refuse a stage that is to run and cannot fit.

The card is the smallest CUDA device torch finds (each data-parallel process holds a whole model), or
the one `apply --gpu NAME` / `--memory GiB` names (a Ray cluster's, or a test's). On a machine without
a GPU and without those options nothing is planned and nothing is imported: CPU `apply` stays as fast.
Only stages DVC will run are refused: one already in dvc.lock (run earlier, on a larger card) is not.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from proxytune import layout
from proxytune.errors import ProxytuneError, first_line

OVERRIDE = "--no-fit-check"


@dataclass(frozen=True)
class Request:
    """What the user asked of the check on the command line."""

    gpu: str | None = None  # --gpu: plan for this card of plan's table instead of the one found
    memory: float | None = None  # --memory: a card of this many GiB (throughput of --gpu, else an A100's)
    enforce: bool = True  # False with --no-fit-check: warn and run anyway

    @property
    def named(self) -> bool:
        return self.gpu is not None or self.memory is not None


@dataclass
class Row:
    """One planned row of a DVC stage (evaluation has two: the teacher's images, then the student's)."""

    spec_path: str
    what: str  # plan's row name: "student", "evaluate (teacher)"
    estimate: object  # plan.estimate.StageEstimate
    suggestion: str | None
    mode: str = "manual"  # the spec's memory mode


@dataclass
class Check:
    """Every planned DVC stage of the specs on one card."""

    gpu: object  # plan.gpus.Gpu
    rows: dict[str, list[Row]] = field(default_factory=dict)  # DVC stage name -> its rows

    def planned(self, subjects: set[str]) -> list[str]:
        """Every planned stage (of `subjects` only, when given; a joint student serves them all)."""
        def wanted(name: str) -> bool:
            parsed = layout.parse_stage_name(name)
            return not subjects or parsed is None or parsed[2] in (*subjects, layout.JOINT)

        return [name for name in self.rows if wanted(name)]

    def over(self, stages: list[str]) -> list[tuple[str, Row]]:
        """The stages among `stages` that do not fit, each with its largest row, in pipeline order."""
        def order(name: str) -> tuple[int, str]:
            parsed = layout.parse_stage_name(name)
            step = parsed[0] if parsed else ""
            return (layout.STEPS.index(step) if step in layout.STEPS else len(layout.STEPS), name)

        found = []
        for name in sorted(stages, key=order):
            misfits = [row for row in self.rows.get(name, []) if not row.estimate.fits]
            if misfits:
                found.append((name, max(misfits, key=lambda row: row.estimate.peak)))
        return found

    def usable_gib(self) -> float:
        from proxytune.plan.gpus import RESERVED_GIB

        return self.gpu.memory_gib - RESERVED_GIB

    def message(self, stage: str, row: Row, others: int) -> str:
        """One line: the stage, its peak, the card's usable memory, plan's way under budget."""
        from proxytune.plan.gpus import RESERVED_GIB

        part = f" ({row.what})" if row.what.startswith("evaluate (") else ""
        fix = f"to fit: {row.suggestion}" if row.suggestion else "plan names no option that fits"
        if row.suggestion and row.suggestion[0].isalpha() and " -> " in row.suggestion and row.mode != "auto":
            fix += " (or memory: auto)"
        more = (f"; {others} more stage{'s' * (others != 1)} to run {'do' if others != 1 else 'does'} not fit either"
                if others else "")
        return (f"{row.spec_path}: {stage}{part} needs about {size(row.estimate.peak)} of GPU memory at its peak, more "
                f"than the {size(self.usable_gib() * 2**30)} usable on {card_name(self.gpu)} ({self.gpu.memory_gib:.2f} GiB "
                f"less {RESERVED_GIB} for the CUDA context); {fix}{more} (`proxytune plan {row.spec_path} --memory {self.gpu.memory_gib:g}` "
                f"shows every stage; {OVERRIDE} runs anyway)")

    def enforce(self, stages: list[str], request: Request, echo) -> None:
        """Refuse (or, with --no-fit-check, warn about) the first of `stages` that does not fit.

        Raises:
            ProxytuneError: a stage to run does not fit and the check is on.
        """
        over = self.over(stages)
        if not over:
            if stages and any(name in self.rows for name in stages):
                echo(f"fit check: every planned stage to run fits {card_name(self.gpu)} ({size(self.usable_gib() * 2**30)} "
                     "usable)")
            return
        stage, row = over[0]
        line = self.message(stage, row, len(over) - 1)
        if request.enforce:
            raise ProxytuneError(line)
        echo(f"warning: {line}; running anyway ({OVERRIDE})")


def size(nbytes: float) -> str:
    """Bytes for people: GiB with one decimal, MiB below one GiB (the tiny models' stages)."""
    return f"{nbytes / 2**30:.1f} GiB" if abs(nbytes) >= 2**30 else f"{nbytes / 2**20:.0f} MiB"


def card_name(gpu) -> str:
    """'the NVIDIA H200', or 'a 23.5 GiB card' for one named only by --memory."""
    return f"a {gpu.name} card" if gpu.name.endswith(" GiB") else f"the {gpu.name}"


def find_card(request: Request, executor: str, echo):
    """(plan's Gpu, how many) for the card the stages will run on, or None when nothing is to be checked.

    Raises:
        ProxytuneError: --gpu names a GPU plan does not know.
    """
    from proxytune.plan.gpus import custom_gpu, find_gpu

    if request.named:
        gpu = find_gpu(request.gpu) if request.gpu else None
        return (custom_gpu(request.memory, gpu) if request.memory is not None else gpu), 1
    if executor != "local":
        return None  # Ray runs the stages on its nodes: name their card with --gpu or --memory
    from proxytune.plan import card

    try:
        cards = card.detect()
    except RuntimeError as err:
        echo(f"warning: fit check skipped: could not ask torch about the GPU ({err})")
        return None
    if not cards:
        return None
    gpu, known = card.as_gpu(min(cards, key=lambda c: c.total_bytes))
    if not known:
        echo(f"note: {gpu.name} is not in plan's GPU table: its memory is checked, its times are an A100's")
    return gpu, len(cards)


def _rows(path: str, spec, plan, students: dict[str, object]) -> dict[str, list[Row]]:
    """DVC stage name -> plan rows for one spec (`students`: experiment name -> the plan of its student)."""
    by_row = {stage.stage: stage for stage in plan.stages}

    def rows(source, *names) -> list[Row]:
        return [Row(path, name, source[name], source[name].suggestion, spec.memory) for name in names if name in source]

    out: dict[str, list[Row]] = {}
    for subject in spec.subjects:
        for step in ("teacher", "synthesis", "codes"):
            out[layout.stage_name(step, spec.name, subject.name)] = rows(by_row, step)
        for experiment, student_plan in students.items():
            own = {stage.stage: stage for stage in student_plan.stages}
            student = (layout.joint_stage_name(spec.name) if spec.student.multi_subject
                       else layout.stage_name("student", experiment, subject.name))
            out[student] = rows(own, "student")
            out[layout.stage_name("evaluate", experiment, subject.name)] = rows(own, "evaluate (teacher)", "evaluate (student)")
    for style in spec.styles:  # a style's teacher is the teacher section on its references; its other stages are not planned
        out[layout.stage_name("teacher", spec.name, style.name)] = rows(by_row, "teacher")
    return out


def prepare(paths: tuple[str, ...], resolved: list, root: Path, gpu, gpus: int, echo) -> tuple[list, Check]:
    """Apply each spec's memory mode for `gpu` and plan what will run.

    Returns:
        The resolved specs with the mode's changes (and a `memory` record for their params files), and the
        check of every planned DVC stage.
    A spec plan cannot estimate (a model it cannot size) is left as it is, unchecked, with a warning line.
    """
    from proxytune.plan import auto
    from proxytune.plan.stages import plan_spec

    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # casting a meta model warns about modules kept in fp32
    check = Check(gpu)
    out = []
    for path, item in zip(paths, resolved):
        try:
            adapted = auto.adapt(item.spec, path, root, gpu, gpus)
            spec = adapted.spec
            students = {spec.name: adapted.plan}
            for variant in spec.student.variants:  # a variant's own student and evaluation; the rest is shared
                students[layout.variant_experiment(spec.name, variant)] = plan_spec(
                    spec.model_copy(update={"student": spec.student.variant(variant)}), path, root, gpu, gpus)
        except Exception as err:  # a model plan cannot size, or a bug in the estimate, must not stop a run
            why = str(err) if isinstance(err, ProxytuneError) else first_line(err)
            echo(f"warning: {path}: fit check skipped (memory: {item.spec.memory} not applied): plan failed: {why}")
            out.append(item)
            continue
        if adapted.changes or spec.memory == "auto":
            echo(adapted.line())
        check.rows.update(_rows(path, spec, adapted.plan, students))
        out.append(dataclasses.replace(item, spec=spec, memory=adapted.record()))
    return out, check
