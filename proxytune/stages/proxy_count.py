"""A growing proxy count (`student.proxy_count`): the stop rule and the state the steps hand on. Not a
stage (the student and evaluation stages import it).

Step i trains a student on the first N_i proxies (`grow_student`), scores it on a held-out measure of the
subject (`grow_evaluate`) and writes the growth so far, `proxy_count.json`, which step i + 1 reads. Every
step is scored on the same held-out images (the same prompts and seeds), so step i is compared with step
i - 1 image by image. The rule (`next_state`, `proxy_count.stop_when`):

  - paired: d_i, the mean over held-out images of (step i's score - step i-1's), and its 95% interval
    resampling prompts (each with all its images, the same draws for both steps). Its lower end <= 0 (no
    clear gain): stop and choose N_{i-1}, the smaller count;
  - plateau: with m_i the held-out mean and [lo_i, hi_i] its own 95% interval, m_i <= hi_{i-1} (the mean
    lies inside or below the previous step's interval): stop and choose N_{i-1}. Unpaired: the prompts'
    spread sits in both intervals, so it can miss a gain that every prompt shares;
  - ran out: step i needed at least as many proxies as the set holds (with curation: the kept ones):
    it trained on all of them; stop and choose it (it improved, or the rule above would have fired);
  - otherwise grow. After the last step (`final_state`) the largest count is chosen.

Both rules record d_i and its interval per step.

A step after the stop trains and scores nothing: it hands the state on (cheap). The subject's own
student (`grow_select`) trains on the chosen count with the chosen step's settings, so it resumes that
step's final checkpoint instead of training again.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from proxytune import layout, stats
from proxytune.outputs import CodesRecord, CountState, StepScore, read_record


def available_proxies(codes_dir: Path) -> int:
    """How many proxies a student can train on: the codes stage encodes the manifest's (kept) proxies, in order.
    The one place that counts them."""
    return read_record(codes_dir, CodesRecord).num_images


def read_state(folder: Path) -> CountState:
    """The growth as a step's student or evaluation folder hands it on."""
    return CountState.read(folder / layout.COUNT_FILE, missing="run the previous step of the growing proxy count first")


def paired_difference(before: StepScore, after: StepScore, resamples: int, seed: int) -> tuple[float, list[float]]:
    """Mean and 95% interval of `after` - `before` on the same held-out images: per image the difference of
    the two steps' scores, resampling prompts (each with all its images), so both steps are resampled alike.
    Same images means same prompts, seed and images per prompt (image k of prompt p: seed + 1000 p + k).

    Raises:
        ValueError: the steps were not scored on the same prompts and seeds, or a step has no per-image scores.
    """
    if before.scores is None or after.scores is None:
        raise ValueError(f"the {before.count}- or {after.count}-proxy step has no per-image scores (written before "
                         "the paired rule existed)")
    if (before.prompts, before.seed, before.images_per_prompt) != (after.prompts, after.seed, after.images_per_prompt):
        raise ValueError(f"the {before.count}- and {after.count}-proxy steps were scored on different held-out "
                         "prompts or seeds")
    nan = float("nan")
    difference = (np.array([nan if v is None else v for v in after.scores], dtype=np.float64)
                  - np.array([nan if v is None else v for v in before.scores], dtype=np.float64))
    if np.isnan(difference).all():
        raise ValueError(f"no held-out image has a score at both the {before.count}- and {after.count}-proxy steps")
    clusters = stats.prompt_clusters(difference.size, after.images_per_prompt)
    low, high = stats.cluster_bootstrap_ci(difference, clusters, resamples, seed)
    return float(np.nanmean(difference)), [low, high]


def next_state(state: CountState, score: StepScore, resamples: int = 1000, seed: int = 0) -> CountState:
    """The growth after one more scored step (the rule in the module's docstring). `resamples` and `seed`: the
    bootstrap of the paired difference (the held-out evaluation's)."""
    before = state.steps[-1] if state.steps else None
    if before is not None and before.scores is not None and score.scores is not None:
        difference, interval = paired_difference(before, score, resamples, seed)
        score = score.model_copy(update={"difference": difference, "difference_ci95": interval})
    elif before is not None and state.stop_when == "paired":
        paired_difference(before, score, resamples, seed)  # raises: says what is missing
    update = {"steps": [*state.steps, score]}
    stop = None if before is None else _stop_reason(state, before, score)
    if stop is not None:
        update |= {"chosen": before.used, "stopped": stop}
    elif score.used >= state.available:
        update |= {"chosen": score.used,
                   "stopped": f"ran out: the {score.count}-proxy step trained on all {state.available} proxies of the set"}
    return state.model_copy(update=update)


def _stop_reason(state: CountState, before: StepScore, score: StepScore) -> str | None:
    """Why the growth stops at `score` and chooses `before`'s count; None: `score` improved on it."""
    if state.stop_when == "paired":
        low, high = score.difference_ci95
        if low > 0:
            return None
        images = f"{len(score.prompts)} prompts x {score.images_per_prompt} seeds"
        return (f"paired: {state.metric} of the {score.used}-proxy student minus the {before.used}-proxy student's, "
                f"image by image on the same {images}, is {score.difference:+.4f} [95% over prompts {low:+.4f}, "
                f"{high:+.4f}]: no clear gain (the interval's lower end is <= 0)")
    if score.mean > before.ci95[1]:
        return None
    return (f"plateau: {state.metric} of the {score.used}-proxy student, {score.mean:.4f}, is inside or "
            f"below the {before.used}-proxy student's 95% interval [{before.ci95[0]:.4f}, {before.ci95[1]:.4f}]")


def final_state(state: CountState) -> CountState:
    """The growth after its last step: stopped, or the largest count when every step improved."""
    if state.stopped is not None:
        return state
    if not state.steps:
        raise ValueError("no step was scored")
    last = state.steps[-1]
    return state.model_copy(update={
        "chosen": last.used,
        "stopped": f"last step: every step improved on the previous one ({state.stop_when}); {last.used} proxies "
                   f"(add larger steps to grow further)"})


def state_before(params) -> CountState:
    """The growth a step starts from: nothing yet (the first step), or what the previous step handed on."""
    grow = params.grow
    if grow.state is None:
        return CountState(metric=grow.metric, available=available_proxies(params.out("codes")), stop_when=grow.stop_when)
    return read_state(Path(grow.state).parent)


def chosen_step(params) -> tuple[CountState, Path]:
    """(the growth after its last step, the folder of the step whose count was chosen) for the subject's own student."""
    state = final_state(read_state(Path(params.grow.state).parent))
    count = next(step.count for step in state.steps if step.used == state.chosen)
    return state, Path(layout.subject_dir(layout.grow_experiment(params.experiment, count), params.subject.name))


def hand_on(state: CountState, out_dir: Path) -> None:
    """A step after the stop: its output folder holds the growth as it was, nothing trained or scored."""
    from proxytune.files import staged_dir

    with staged_dir(out_dir) as tmp:
        state.write(tmp / layout.COUNT_FILE)


def after_step(state: CountState, params, student_metrics: dict, per_image: dict, prompts: list[str]) -> CountState:
    """The growth once a step's held-out evaluation has scored its student.

    Args:
        student_metrics: metric -> {"mean", "ci95"}.
        per_image: metric -> (N,) per-image scores, prompt-major (NaN: the metric does not apply).
        prompts: the held-out prompts, in order.
    Raises:
        ProxytuneError: the held-out evaluation lacks the metric, or a step cannot be paired with the previous one.
    """
    from proxytune.errors import ProxytuneError

    score = student_metrics.get(state.metric)
    if score is None:
        raise ProxytuneError(f"{params.source.spec_file}: student.proxy_count.metric: the held-out evaluation has no "
                             f"{state.metric} (it measured {', '.join(student_metrics)})")
    count, evaluation = params.student.num_proxy_images, params.evaluation
    values = [None if np.isnan(v) else float(v) for v in np.asarray(per_image[state.metric], dtype=np.float64)]
    step = StepScore(count=count, used=min(count, state.available), mean=score["mean"], ci95=list(score["ci95"]),
                     prompts=list(prompts), seed=evaluation.seed, images_per_prompt=evaluation.images_per_prompt,
                     scores=values)
    try:
        return next_state(state, step, evaluation.bootstrap_resamples, evaluation.seed)
    except ValueError as err:
        raise ProxytuneError(f"{params.source.spec_file}: student.proxy_count: {err}; re-run every grow_evaluate "
                             f"stage of the growth, first step to last (`dvc repro --force --single-item "
                             f"grow_evaluate@EXP--grow-N.SUBJECT`), or use stop_when: plateau") from err
