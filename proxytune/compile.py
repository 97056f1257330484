"""Compile specs into DVC stages: a pure function from validated specs to the dvc.yaml dict and the
per-subject params files. All stage wiring (teacher → synthesis → codes → student → evaluate) lives here.

Each subject of each experiment is one foreach item keyed `EXPERIMENT.SUBJECT`, so stages are named
`teacher@dog-demo.dog`. Every stage reads one resolved params file and declares as DVC params only
the sections it reads: editing `student:` re-runs only the student and evaluation stages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from proxytune.layout import (COUNT_FILE, CURVES_FILE, GROW_GROUPS, JOINT, METRICS_FILE, OUT_DIRS, PER_PROMPT_FILE,
                              RUNS_DIR, STEPS, STYLE_STEPS, base_experiment, grow_experiment, item_key, joint_stage_name,
                              stage_name, subject_dir, variant_experiment)
from proxytune.layout import PROXY_METRICS_FILE  # synthesis' and curation's fidelity (issue 29)
from proxytune.spec import ExperimentSpec
from proxytune.spec.common import MAX_SEED


def plotted_metrics(images: str) -> tuple[str, ...]:
    """The subject metrics DVC plots for a subject whose `images` is this (a world's item gets its world's too)."""
    from proxytune import builtins, metrics

    return tuple(m.name for m in metrics.applicable("subject", builtins.world_item(images)[0]) if m.plotted)

# The params each stage reads (keys of the params file). Teacher pipeline fields appear in later
# stages because synthesis and evaluation load the base pipeline again.
_TEACHER_BASE = ["teacher.model", "teacher.revision", "teacher.resolution"]
_SCORING = ["evaluation.clip_model", "evaluation.dino_model"]  # synthesis and curation score with the evaluation's encoders
STAGE_PARAMS = {
    "teacher": ["seed", "subject", "teacher"],
    "synthesis": ["seed", "subject", "synthesis", *_TEACHER_BASE, *_SCORING],
    "codes": ["student.model"],  # proxies are re-encoded only for another student model
    "student": ["seed", "subject", "student"],
    "evaluate": ["seed", "subject", "evaluation", "synthesis", *_TEACHER_BASE, "student.model", "student.sampling"],
    # a style's stages (its teacher is the teacher stage above, on the style's references)
    "curation": ["seed", "subject", "style.prompts", "style.images_per_prompt", "style.raw", "style.fidelity", "synthesis",
                 *_TEACHER_BASE, *_SCORING],
    "style_student": ["seed", "student", "style_student", "style.raw.ratio"],
    "style_evaluate": ["seed", "subject", "style.content", "evaluation", "synthesis", *_TEACHER_BASE, "student.model",
                       "student.sampling", "style_student"],
}
HELD_OUT_SEED_OFFSET = 500_000  # a growing proxy count's held-out images never reuse the evaluation's seeds


@dataclass(frozen=True)
class ResolvedSpec:
    """A validated spec with the facts compile needs from the file system, looked up beforehand."""

    spec: ExperimentSpec
    spec_path: str  # as given, relative to the project root when inside it
    spec_digest: str  # sha256 of the spec file's bytes
    references: dict[str, str]  # subject or style name -> reference folder (relative when inside the project)
    styles: dict[str, dict] | None = None  # style name -> {"raw": raw-data folder or None, "prompts": [...]}
    memory: dict | None = None  # what apply's memory mode chose for the card it planned (fitcheck), if it planned


def params_for(resolved: ResolvedSpec, subject_name: str) -> dict:
    """The resolved params file of one subject: every default filled in, so DVC sees real values."""
    spec = resolved.spec
    subject = next(s for s in spec.subjects if s.name == subject_name)
    dump = spec.model_dump(mode="json", by_alias=True)
    dump["student"].pop("variants")  # each variant has its own params file: editing one re-runs only it
    params = {
        "experiment": spec.name,
        "seed": spec.seed,
        "subject": subject.model_dump(mode="json", by_alias=True, exclude={"images"}),
        "teacher": dump["teacher"],
        "synthesis": dump["synthesis"],
        "student": dump["student"],
        "evaluation": dump["evaluation"],
        "student_dir": f"{RUNS_DIR}/{spec.name}/{JOINT}/student" if spec.student.multi_subject else None,
        "upstream_dir": None,
        # Below: read by stages but not DVC params (moving a folder or a server must not retrain).
        "tracking": dump["tracking"],
        "source": {
            "spec_file": resolved.spec_path,
            "spec_digest": resolved.spec_digest,
            "references": resolved.references[subject_name],
            "images": subject.images,
        },
        **({"grow": _grow_section(spec, subject, None)} if spec.student.proxy_count else {}),
    }
    if resolved.memory is not None:  # not a DVC param: the chosen values themselves are in their sections
        params["memory"] = resolved.memory
    return params


def _grow_section(spec: ExperimentSpec, subject, index: int | None) -> dict:
    """A growth stage's `grow` section: step `index` (None: the chosen student) and the state file it reads."""
    counts = spec.student.proxy_count.grow
    metric = spec.student.proxy_count.metric or ("subject_acc" if subject.toy_subject is not None else "dino")
    before = len(counts) - 1 if index is None else index - 1  # the step whose state it reads
    state = (f"{subject_dir(grow_experiment(spec.name, counts[before]), subject.name)}/{OUT_DIRS['evaluate']}/{COUNT_FILE}"
             if before >= 0 else None)
    return {"index": index, "metric": metric, "state": state, "stop_when": spec.student.proxy_count.stop_when}


def grow_params(resolved: ResolvedSpec, subject_name: str, index: int) -> dict:
    """Step `index` of a growing proxy count: the subject's params with the student on the first N proxies
    (no growth of its own, no variants) and the held-out evaluation: the first `proxy_count.prompts` of the
    evaluation's prompts on seeds the evaluation never uses, the student and tuned teacher only."""
    spec = resolved.spec
    count = spec.student.proxy_count
    params = params_for(resolved, subject_name)
    subject = next(s for s in spec.subjects if s.name == subject_name)
    params["experiment"] = grow_experiment(spec.name, count.grow[index])
    params["student"] = {**spec.student.model_dump(mode="json", by_alias=True, exclude={"variants", "proxy_count"}),
                         "num_proxy_images": count.grow[index]}
    params["evaluation"] = {**params["evaluation"], "num_prompts": count.prompts, "images_per_prompt": count.images_per_prompt,
                            "seed": (spec.evaluation.seed + HELD_OUT_SEED_OFFSET) % (MAX_SEED + 1), "base_models": False,
                            "variance_samples": 0, "gate": [], "grid_prompts": min(count.prompts, 4)}
    params["upstream_dir"] = subject_dir(spec.name, subject_name)
    params["tracking"]["experiment"] = spec.tracking.experiment or spec.name
    params["grow"] = _grow_section(spec, subject, index)
    return params


def style_params_for(resolved: ResolvedSpec, style_name: str) -> dict:
    """The resolved params file of one style. Its `subject` section is the style seen as a teacher
    subject (name, class noun, token: the teacher stage learns "a {class} in {token} style" on the
    references), `style` holds the style with its curation prompts resolved to a list."""
    spec = resolved.spec
    style = next(s for s in spec.styles if s.name == style_name)
    inputs = (resolved.styles or {})[style_name]
    dump = spec.model_dump(mode="json", by_alias=True)
    dump["student"].pop("variants")
    return {
        "experiment": spec.name,
        "seed": spec.seed,
        "subject": {"name": style.name, "class": style.class_noun, "token": style.token},
        "style": {**style.model_dump(mode="json", by_alias=True), "prompts": inputs["prompts"]},
        "style_student": dump["style_student"],
        "teacher": dump["teacher"],
        "synthesis": dump["synthesis"],
        "student": dump["student"],
        "evaluation": dump["evaluation"],
        "student_dir": None,
        "upstream_dir": None,
        "tracking": dump["tracking"],
        "source": {
            "spec_file": resolved.spec_path,
            "spec_digest": resolved.spec_digest,
            "references": resolved.references[style_name],
            # the subject section reads `images` as a subject's; a toy style's 'toyworld:NAME' is no toy subject
            "images": resolved.references[style_name] if style.toy_style else style.images,
            "raw": inputs["raw"],
        },
        **({"memory": resolved.memory} if resolved.memory is not None else {}),
    }


def variant_params(resolved: ResolvedSpec, subject_name: str, variant: str) -> dict:
    """A student variant's params: the subject's, with the merged student section, its own
    experiment name, and the main experiment's subject folder for teacher, proxies and codes."""
    spec = resolved.spec
    params = params_for(resolved, subject_name)
    params["experiment"] = variant_experiment(spec.name, variant)
    params["student"] = spec.student.variant(variant).model_dump(mode="json", by_alias=True)
    params["upstream_dir"] = subject_dir(spec.name, subject_name)
    params["tracking"]["experiment"] = spec.tracking.experiment or spec.name  # one MLflow experiment per spec
    params.pop("grow", None)  # a variant trains on a fixed count
    return params


def _template(step: str) -> dict:
    item_dir = "${item.dir}"
    out = f"{item_dir}/{OUT_DIRS[step]}"
    up = "${item.up}"  # where teacher, proxies and codes are: the item's own folder, or the main experiment's
    upstream = {
        "teacher": ["${item.refs}"],
        "synthesis": [f"{item_dir}/teacher"],
        "codes": [f"{item_dir}/proxy"],
        "student": [f"{up}/proxy", f"{up}/codes"],
        "evaluate": ["${item.refs}", f"{up}/teacher", "${item.student}"],
        "curation": [f"{item_dir}/teacher", "${item.raw}"],
        "style_student": [f"{item_dir}/curated"],
        "style_evaluate": ["${item.refs}", f"{item_dir}/teacher", f"{item_dir}/student"],
    }[step]
    stage = {
        "cmd": f"proxytune stage {step} --params {item_dir}/params.yaml",
        "deps": upstream,
        "params": [{f"{item_dir}/params.yaml": STAGE_PARAMS[step]}],
        "outs": [out],
    }
    if step in ("evaluate", "style_evaluate"):
        stage["metrics"] = [{f"{item_dir}/{METRICS_FILE}": {"cache": False}}]
    if step in ("synthesis", "curation"):
        stage["metrics"] = [{f"{item_dir}/{PROXY_METRICS_FILE}": {"cache": False}}]
    return stage


@dataclass
class _Items:
    """The foreach items and params files of the specs being compiled, before they meet dvc.yaml."""

    params_files: dict[str, dict] = field(default_factory=dict)
    own: dict[str, dict] = field(default_factory=dict)  # foreach items of every step: EXP.SUBJECT
    variants: dict[str, dict] = field(default_factory=dict)  # student and evaluate only: EXP--V.SUBJECT
    joint: set[str] = field(default_factory=set)  # items whose student is a multi-subject stage of its own
    grown: dict[str, dict[str, dict]] = field(default_factory=lambda: {group: {} for group in GROW_GROUPS})
    styles: dict[str, dict] = field(default_factory=dict)  # teacher and the style steps: EXP.STYLE


def compile_specs(resolved: list[ResolvedSpec], existing: dict | None = None) -> tuple[dict, dict[str, dict]]:
    """Build the dvc.yaml content and the params files for `resolved`, keeping other experiments.

    Args:
        resolved: specs to (re)compile; their experiments' items are replaced as a whole.
        existing: the current dvc.yaml content, if any.
    Returns:
        (dvc.yaml dict, {params file path: params dict}).
    """
    compiled = {spec.spec.name for spec in resolved}
    items = _collect_items(resolved)
    stages = dict((existing or {}).get("stages", {}))
    _merge_step_items(stages, items, compiled)
    _merge_grow_items(stages, items.grown, compiled)
    _merge_joint_students(stages, resolved, compiled, items.params_files)
    ordered = {step: stages[step] for step in (*STEPS, *GROW_GROUPS, *STYLE_STEPS) if step in stages}
    ordered.update({k: v for k, v in stages.items() if k not in ordered})  # user's own stages stay
    compiled_dvc = {"stages": ordered}
    plots = [p for p in (existing or {}).get("plots", []) if not _plot_of(p, compiled)]
    plots += _plots(resolved, items.own, items.variants) + _style_plots(items.styles)
    if plots:
        compiled_dvc["plots"] = plots
    return compiled_dvc, items.params_files


def _collect_items(resolved: list[ResolvedSpec]) -> _Items:
    """Every subject's, variant's, growth step's and style's foreach item, with its params file."""
    items = _Items()
    for spec in resolved:
        for subject in spec.spec.subjects:
            _subject_items(spec, subject, items)
        for style in spec.spec.styles:
            directory = subject_dir(spec.spec.name, style.name)
            refs = spec.references[style.name]
            # the curation stage reads a raw-data folder when there is one; otherwise its references stand in
            # (a dependency the teacher has anyway), so that every item has the same template
            raw = (spec.styles or {})[style.name]["raw"] or refs
            items.styles[item_key(spec.spec.name, style.name)] = {"dir": directory, "refs": refs, "raw": raw,
                                                                  "student": f"{directory}/student", "up": directory}
            items.params_files[f"{directory}/params.yaml"] = style_params_for(spec, style.name)
    return items


def _subject_items(spec: ResolvedSpec, subject, items: _Items) -> None:
    """One subject's own item, its growth items and its variants' items (which share all up to the codes)."""
    directory = subject_dir(spec.spec.name, subject.name)
    params = params_for(spec, subject.name)
    key = item_key(spec.spec.name, subject.name)
    items.own[key] = {"dir": directory, "refs": spec.references[subject.name],
                      "student": params["student_dir"] or f"{directory}/student", "up": directory}
    items.params_files[f"{directory}/params.yaml"] = params
    if spec.spec.student.multi_subject:
        items.joint.add(key)
    if spec.spec.student.proxy_count:
        items.joint.add(key)  # its student is the growth's choice (grow_select), not a `student` item
        _grow_items(spec, subject, items.own[key], items.grown, items.params_files)
    for variant in spec.spec.student.variants:
        name = variant_experiment(spec.spec.name, variant)
        folder = subject_dir(name, subject.name)
        items.variants[item_key(name, subject.name)] = {
            "dir": folder, "refs": spec.references[subject.name], "student": f"{folder}/student", "up": directory}
        items.params_files[f"{folder}/params.yaml"] = variant_params(spec, subject.name, variant)


def _merge_step_items(stages: dict, items: _Items, compiled: set[str]) -> None:
    """Replace the compiled experiments' items of every step's foreach stage; other experiments' stay."""
    for step in (*STEPS, *STYLE_STEPS):
        merged = dict(stages.get(step, {}).get("foreach", {}))
        # Drop this run's experiments first so removed subjects disappear from dvc.yaml.
        merged = {key: value for key, value in merged.items() if base_experiment(key.split(".", 1)[0]) not in compiled}
        for value in merged.values():  # items written by an older proxytune lack these fields
            value.setdefault("student", f"{value['dir']}/student")
            value.setdefault("up", value["dir"])
        if step in STEPS:
            merged.update({key: dict(value) for key, value in items.own.items()
                           if not (step == "student" and key in items.joint)})
        if step in ("student", "evaluate"):
            merged.update({key: dict(value) for key, value in items.variants.items()})
        if step in ("teacher", *STYLE_STEPS):
            merged.update({key: dict(value) for key, value in items.styles.items()})
        if merged:
            stages[step] = {"foreach": dict(sorted(merged.items())), "do": _template(step)}
        else:
            stages.pop(step, None)


def _merge_grow_items(stages: dict, grown: dict[str, dict[str, dict]], compiled: set[str]) -> None:
    """The same for the growing proxy counts' stage groups."""
    for group, template in _GROW_TEMPLATES.items():
        merged = {key: value for key, value in stages.get(group, {}).get("foreach", {}).items()
                  if base_experiment(key.split(".", 1)[0]) not in compiled}
        merged.update(grown[group])
        if merged:
            stages[group] = {"foreach": dict(sorted(merged.items())), "do": template}
        else:
            stages.pop(group, None)


def _merge_joint_students(stages: dict, resolved: list[ResolvedSpec], compiled: set[str],
                          params_files: dict[str, dict]) -> None:
    """One multi-subject student stage per spec that asks for it; the compiled experiments' old ones go."""
    for name in [n for n in stages if n.startswith("student-joint.") and n.split(".", 1)[1] in compiled]:
        del stages[name]  # recompiled below when the spec still asks for it
    for spec in resolved:
        if spec.spec.student.multi_subject:
            name, path, stage = _joint_student(spec)
            stages[name] = stage
            params_files[path] = _joint_params(spec)


def _grow_template(group: str) -> dict:
    """A growth stage: a step's student (its deps chain it to the previous step's state), a step's held-out
    evaluation, or the chosen student (after the last step)."""
    item_dir, up = "${item.dir}", "${item.up}"
    step = GROW_GROUPS[group]
    deps = ([f"{up}/proxy", f"{up}/codes", "${item.state}"] if step == "student"
            else ["${item.refs}", f"{up}/teacher", f"{item_dir}/student"])
    return {"cmd": f"proxytune stage {step} --params {item_dir}/params.yaml", "deps": deps,
            "params": [{f"{item_dir}/params.yaml": [*STAGE_PARAMS[step], "grow"]}], "outs": [f"{item_dir}/{OUT_DIRS[step]}"]}


_GROW_TEMPLATES = {group: _grow_template(group) for group in GROW_GROUPS}


def _grow_items(resolved: ResolvedSpec, subject, main: dict, grown: dict[str, dict], params_files: dict[str, dict]) -> None:
    """Add one subject's growth to `grown` (group -> items) and its steps' params files."""
    spec = resolved.spec
    for index, count in enumerate(spec.student.proxy_count.grow):
        name = grow_experiment(spec.name, count)
        folder = subject_dir(name, subject.name)
        params = grow_params(resolved, subject.name, index)
        params_files[f"{folder}/params.yaml"] = params
        item = {"dir": folder, "refs": main["refs"], "up": main["dir"],
                "state": params["grow"]["state"] or f"{main['dir']}/codes"}  # the first step reads no state
        grown["grow_student"][item_key(name, subject.name)] = item
        grown["grow_evaluate"][item_key(name, subject.name)] = {k: v for k, v in item.items() if k != "state"}
    chosen = params_for(resolved, subject.name)["grow"]["state"]
    grown["grow_select"][item_key(spec.name, subject.name)] = {"dir": main["dir"], "up": main["dir"], "state": chosen}


def _plot_of(plot, experiments: set[str]) -> bool:
    """Whether a top-level plot definition reads a file of one of `experiments` (then it is recompiled)."""
    if not isinstance(plot, dict):
        return False
    paths = []
    for name, props in plot.items():
        y = (props or {}).get("y") if isinstance(props, dict) else None
        paths += list(y) if isinstance(y, dict) else [name]
    parts = [str(path).split("/") for path in paths]
    return any(len(p) > 2 and p[0] == RUNS_DIR and base_experiment(p[1]) in experiments for p in parts)


def _plots(resolved: list[ResolvedSpec], own: dict[str, dict], variants: dict[str, dict]) -> list[dict]:
    """Top-level DVC plots: the teacher's and each student's training curves and the per-prompt metrics of
    every evaluation, so `dvc plots show` / `dvc plots diff` draw them. The files are inside the stages'
    output folders (written by the stages, see CURVES_FILE and PER_PROMPT_FILE)."""
    plotted = {item_key(variant_experiment(s.spec.name, v) if v else s.spec.name, subject.name): plotted_metrics(subject.images)
               for s in resolved for subject in s.spec.subjects for v in ("", *s.spec.student.variants)}
    curves, per_prompt = {}, []
    for key, item in sorted({**own, **variants}.items()):
        if key in own:
            curves[f"{item['dir']}/teacher/{CURVES_FILE}"] = f"teacher loss {key}"
        student = f"{item['student']}/{CURVES_FILE}"
        curves.setdefault(student, f"student loss {key}" if item["student"].startswith(item["dir"]) else
                          f"student loss {item['student'].split('/')[1]} (all subjects)")
        path = f"{item['dir']}/{OUT_DIRS['evaluate']}/{PER_PROMPT_FILE}"
        for metric in plotted.get(key) or plotted_metrics(""):
            per_prompt.append({f"{metric} per prompt {key}": {
                "x": "prompt", "y": {path: [f"teacher_{metric}", f"student_{metric}"]}, "template": "scatter",
                "x_label": "prompt (index into eval/prompts.json)", "y_label": metric}})
    loss = [{path: {"x": "step", "y": "loss", "template": "linear", "title": title}} for path, title in curves.items()]
    return loss + per_prompt


def _style_plots(styles: dict[str, dict]) -> list[dict]:
    """A style's teacher and student training curves (DVC plots)."""
    return [{f"{item['dir']}/{folder}/{CURVES_FILE}": {"x": "step", "y": "loss", "template": "linear",
                                                       "title": f"{role} loss {key}"}}
            for key, item in sorted(styles.items()) for folder, role in (("teacher", "teacher"), ("student", "style student"))]


def _joint_params(resolved: ResolvedSpec) -> dict:
    """A multi-subject student's params: the first subject's file, the student section, every member."""
    spec = resolved.spec
    params = params_for(resolved, spec.subjects[0].name)
    params["student_dir"] = None
    params["members"] = [subject_dir(spec.name, s.name) for s in spec.subjects]
    return params


def _joint_student(resolved: ResolvedSpec) -> tuple[str, str, dict]:
    spec = resolved.spec
    directory = f"{RUNS_DIR}/{spec.name}/{JOINT}"
    members = [subject_dir(spec.name, s.name) for s in spec.subjects]
    stage = {
        "cmd": f"proxytune stage student --params {directory}/params.yaml",
        "deps": [f"{m}/{OUT_DIRS[step]}" for m in members for step in ("synthesis", "codes")],
        "params": [{f"{directory}/params.yaml": ["seed", "student", "members"]}],
        "outs": [f"{directory}/student"],
    }
    return joint_stage_name(spec.name), f"{directory}/params.yaml", stage


def targets(resolved: list[ResolvedSpec], subjects: set[str] | None = None) -> list[str]:
    """The `evaluate@...` stage names to repro (DVC pulls in their upstream stages)."""
    names = []
    for spec in resolved:
        experiments = [spec.spec.name, *(variant_experiment(spec.spec.name, v) for v in spec.spec.student.variants)]
        for experiment in experiments:
            for subject in spec.spec.subjects:
                if subjects is None or subject.name in subjects:
                    names.append(stage_name("evaluate", experiment, subject.name))
        for style in spec.spec.styles:
            if subjects is None or style.name in subjects:
                names.append(stage_name("style_evaluate", spec.spec.name, style.name))
    return names


def relative_to_root(path: Path, root: Path) -> str:
    """A path as DVC should see it: relative when inside the project, absolute otherwise."""
    import os

    path = Path(os.path.abspath(path))  # not resolve(): a symlinked data folder keeps its project path
    try:
        return path.relative_to(Path(os.path.abspath(root))).as_posix()
    except ValueError:
        return path.as_posix()
