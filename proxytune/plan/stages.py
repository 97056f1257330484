"""The plan of a whole spec: an estimate for every stage that holds a model on the accelerator, each
checked against the GPU, with the fewest option changes that fit where it does not."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from proxytune.plan import estimate, models, options
from proxytune.plan.gpus import Gpu

DREAMBENCH_PROMPTS = 25


@dataclass
class Plan:
    spec: str
    gpu: Gpu
    gpus: int
    subjects: int
    stages: list[estimate.StageEstimate] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    suggestions: dict[str, options.Suggestion] = field(default_factory=dict)  # stage -> the way under budget


def _prompts(evaluation) -> int:
    count = len(evaluation.prompts) if isinstance(evaluation.prompts, list) else DREAMBENCH_PROMPTS
    return min(count, evaluation.num_prompts or count)


def plan_spec(spec, source: str, root: Path, gpu: Gpu, gpus: int = 1) -> Plan:
    """Estimate every stage of `spec` (an ExperimentSpec read from `source`) on `gpus` x `gpu`.

    Sampling stages (synthesis, evaluation) split their images over the GPUs; training stages run
    their `processes` as the spec says, each process holding the whole model.
    """
    plan = Plan(source, gpu, gpus, max(1, len(spec.subjects)))
    student = models.describe_student(spec.student.model, root)
    kept = spec.synthesis.fidelity.keep or spec.synthesis.num_images  # what curation keeps of the generated
    proxies = min(spec.student.num_proxy_images or kept, kept)
    proxy = spec.student.recipe == "proxy"
    if proxy:
        teacher = models.describe_teacher(spec.teacher.model, root)
        res = spec.teacher.resolution
        plan.stages.append(estimate.teacher_training(spec.teacher, teacher, gpu))
        plan.stages.append(estimate.synthesis(spec.synthesis, teacher, res, gpu))
    images = proxies if proxy else spec.student.augment_copies
    plan.stages.append(estimate.codes(student, images, gpu))
    plan.stages.append(estimate.student_training(spec.student, student, gpu))
    eval_images = _eval_images(spec)
    if proxy:
        plan.stages.append(estimate.synthesis(spec.synthesis, teacher, res, gpu, images=eval_images,
                                              stage="evaluate (teacher)"))
    plan.stages.append(estimate.student_sampling(spec.student, student, gpu, eval_images, _student_batch(spec.evaluation)))
    plan.stages[-1].stage = "evaluate (student)"
    for stage in plan.stages:
        if stage.stage in ("synthesis", "evaluate (teacher)", "evaluate (student)"):
            stage.seconds /= gpus
        stage.check(gpu)
    _suggest(plan, spec, teacher if proxy else None, student)
    if spec.styles:
        plan.notes.append("style experiments (styles:) are not planned yet")
    if spec.student.recipe == "direct-full" and spec.student.processes > 1 and spec.student.sharding == "none":
        plan.notes.append("direct-full with several processes: DDP keeps a whole copy per GPU "
                          "(student.sharding: fsdp splits it over them)")
    if spec.student.processes > gpus:
        plan.notes.append(f"student.processes is {spec.student.processes}: the student stage needs that many GPUs "
                          f"(plan --gpus {spec.student.processes})")
    return plan


def _suggest(plan: Plan, spec, teacher, student) -> None:
    gpu = plan.gpu
    for stage in plan.stages:
        if stage.fits:
            continue
        found = None
        if stage.stage == "teacher":
            switches = dict(options.TEACHER_SWITCHES)
            if spec.teacher.processes > 1:  # a quantised base trains in one process (spec.teacher's check)
                switches.pop("quantize")
            found = options.suggest("teacher", spec.teacher, lambda s: estimate.teacher_training(s, teacher, gpu),
                                    switches, gpu)
        elif stage.stage == "student":
            found = options.suggest("student", spec.student, lambda s: estimate.student_training(s, student, gpu),
                                    _student_switches(spec.student, plan.gpus), gpu)
        elif stage.stage in ("synthesis", "evaluate (teacher)"):
            switches = dict(options.SYNTHESIS_SWITCHES)
            if estimate.generation_dtype(spec.synthesis) != "float32":  # "auto" is bf16 on a GPU already
                switches.pop("dtype")
            images = None if stage.stage == "synthesis" else _eval_images(spec)
            found = options.suggest("synthesis", spec.synthesis, lambda s: estimate.synthesis(
                s, teacher, spec.teacher.resolution, gpu, images=images, stage=stage.stage), switches, gpu)
        elif stage.stage == "evaluate (student)":
            found = _smaller_sampling_batch(spec, student, gpu)
        if found is not None:
            plan.suggestions[stage.stage] = found
            stage.suggestion = f"{found.text} -> {found.estimate.peak / estimate.GIB:.1f} GiB"
        elif stage.stage in ("teacher", "synthesis", "evaluate (teacher)", "student"):
            stage.suggestion = (f"none of the spec's options fits (the weights alone: "
                                f"{stage.weights / estimate.GIB:.1f} GiB); {_beyond(stage.stage)}")
        else:
            stage.suggestion = "the spec has no option that changes this stage's memory"


def _student_switches(student, gpus: int) -> dict:
    """The student's memory switches; with several GPUs also sharding over all of them (which needs as
    many processes, and is not offered with 8-bit AdamW or fp16, the spec's check)."""
    switches = dict(options.STUDENT_SWITCHES)
    if gpus > 1 and not student.use_8bit_adam and student.mixed_precision != "fp16":
        switches["sharding"] = {"sharding": "fsdp", "processes": gpus}
    return switches


def _student_batch(evaluation) -> int:
    """Images the student samples at once (sampling.StudentSampler)."""
    return min(evaluation.student_batch_size or evaluation.images_per_prompt, evaluation.images_per_prompt)


def _smaller_sampling_batch(spec, student, gpu: Gpu) -> options.Suggestion | None:
    """The largest `evaluation.student_batch_size` under which the student's evaluation fits."""
    batch = _student_batch(spec.evaluation)
    while batch > 1:
        batch //= 2
        candidate = estimate.student_sampling(spec.student, student, gpu, _eval_images(spec), batch)
        if candidate.check(gpu):
            return options.Suggestion("evaluation", {"student_batch_size": batch},
                                      f"evaluation.student_batch_size: {batch}", candidate)
    return None


def _eval_images(spec) -> int:
    return _prompts(spec.evaluation) * spec.evaluation.images_per_prompt


def _beyond(stage: str) -> str:
    """What proxytune does not offer yet that would (docs/memory.md)."""
    if stage == "teacher":  # the nf4 base is among the options weighed already
        return "sharding the teacher (FSDP) would be needed; proxytune shards only the student"
    if stage == "student":
        return "more GPUs to shard over (student.sharding: fsdp, student.processes: N; plan --gpus N) would be needed"
    return "group offloading (part of the denoiser at a time on the GPU) would be needed; proxytune has none yet"
