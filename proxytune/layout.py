"""Where things live in a proxytune project: stage names, their output folders and file names.

The one place that names them; compile writes them into dvc.yaml, stages write under them, and the
report, provenance, executors and CLI read them back. Import-light on purpose (the CLI's `--help`
imports it): no torch, no pydantic.

    runs/EXPERIMENT/SUBJECT/           one subject (or style) of one experiment
        params.yaml                    its resolved params (every default filled in)
        teacher/ proxy/ codes/ student/ eval/      the output folders of the steps below
        metrics.json                   the evaluation's flat DVC metrics

A stage is `STEP@EXPERIMENT.SUBJECT` (a DVC foreach item), except the one student of a
multi-subject ("joint") experiment: `student-joint.EXPERIMENT`, writing runs/EXPERIMENT/_joint/.
A student variant V of experiment E runs as experiment `E--V`.
"""

from __future__ import annotations

RUNS_DIR = "runs"
VARIANT_SEP = "--"  # a student variant V of experiment E runs as experiment "E--V"
JOINT = "_joint"  # folder of a multi-subject student (a subject name cannot start with "_")
JOINT_PREFIX = "student-joint."

STEPS = ("teacher", "synthesis", "codes", "student", "evaluate")  # a subject's stages, in order
STYLE_STEPS = ("curation", "style_student", "style_evaluate")  # a style: teacher -> these (spec/style.py)

# A growing proxy count (student.proxy_count): step N of experiment E runs as experiment "E--grow-N" with a
# student and a held-out evaluation in dvc.yaml groups of their own (their deps chain the steps), and the
# subject's own student is chosen by the grow_select group. Group -> the stage module it runs.
GROW_GROUPS = {"grow_student": "student", "grow_evaluate": "evaluate", "grow_select": "student"}
GROW_VARIANT = "grow-"  # + the step's proxy count
COUNT_FILE = "proxy_count.json"  # student/ and eval/ of a step, student/ of the chosen student: the growth so far

# Step -> its output folder inside the subject's folder. The folders are named for what they hold
# (the proxy set, the evaluation), the steps for what they do.
OUT_DIRS = {"teacher": "teacher", "synthesis": "proxy", "codes": "codes", "student": "student", "evaluate": "eval",
            "curation": "curated", "style_student": "student", "style_evaluate": "eval"}

# Files a stage writes and another stage, the report or the registry reads (their models: outputs.py).
RECORD_FILE = "record.json"  # every output folder: what the stage made (run id, version, digests)
MANIFEST_FILE = "manifest.json"  # proxy/ and curated/: one entry per image
METRICS_FILE = "metrics.json"  # eval/ (full, with intervals) and the subject folder (flat, for DVC)
PROXY_METRICS_FILE = "proxy_metrics.json"  # the subject (style) folder: synthesis' (curation's) fidelity, for DVC
GATE_FILE = "gate.json"  # eval/: the promotion gate's verdict
PROMPTS_FILE = "prompts.json"  # eval/: the evaluation prompts, in order
PROMPT_SCORES_FILE = "per_prompt.json"  # eval/: model -> per prompt, each metric's mean over its images
VARIANCE_FILE = "variance.json"  # eval/: the feature-distribution analysis
ENCODERS_FILE = "encoders.json"  # eval/: the encoders (and oracle) behind the scores
CURVES_FILE = "loss.csv"  # teacher/ and student/: step, loss and the other training curves
PER_PROMPT_FILE = "per_prompt.csv"  # eval/: prompt, MODEL_METRIC columns
CODES_FILE = "codes.safetensors"  # codes/: the proxies as the student's image tokens
PARAMS_FILE = "params.yaml"  # the subject folder: resolved params

LAUNCHED_ENV = "PROXYTUNE_LAUNCHED"  # set for the processes `accelerate launch` starts for a stage (launch.py)


def subject_dir(experiment: str, subject: str) -> str:
    return f"{RUNS_DIR}/{experiment}/{subject}"


def out_dir(experiment: str, subject: str, step: str) -> str:
    """A step's output folder, relative to the project root."""
    return f"{subject_dir(experiment, subject)}/{OUT_DIRS[step]}"


def variant_experiment(experiment: str, variant: str) -> str:
    """The experiment a student variant runs as (its folder, stage names and registered models)."""
    return f"{experiment}{VARIANT_SEP}{variant}"


def grow_experiment(experiment: str, count: int) -> str:
    """The experiment a step of a growing proxy count runs as: E--grow-N."""
    return variant_experiment(experiment, f"{GROW_VARIANT}{count}")


def grow_group(stage: str, index: int | None) -> str:
    """The dvc.yaml group of a growth stage: a step's (index) student or evaluation, or the selection (None)."""
    if index is None:
        return "grow_select"
    return f"grow_{stage}"


def base_experiment(experiment: str) -> str:
    """The spec's experiment of a (possibly variant) experiment name."""
    return experiment.split(VARIANT_SEP, 1)[0]


def item_key(experiment: str, subject: str) -> str:
    return f"{experiment}.{subject}"


def stage_name(step: str, experiment: str, subject: str) -> str:
    return f"{step}@{item_key(experiment, subject)}"


def joint_stage_name(experiment: str) -> str:
    """The one student stage of a multi-subject experiment (a plain stage: its deps vary in number)."""
    return f"{JOINT_PREFIX}{experiment}"


def parse_stage_name(name: str) -> tuple[str, str, str] | None:
    """(step, experiment, subject) of a stage proxytune compiled; None for any other stage name.

    'teacher@exp.dog' -> ('teacher', 'exp', 'dog'); 'student-joint.exp' -> ('student', 'exp', '_joint').
    """
    if name.startswith(JOINT_PREFIX):
        return "student", name[len(JOINT_PREFIX):], JOINT
    step, at, item = name.partition("@")
    experiment, dot, subject = item.partition(".")
    if not (at and dot and step in (*STEPS, *STYLE_STEPS, *GROW_GROUPS) and experiment and subject):
        return None
    return step, experiment, subject
