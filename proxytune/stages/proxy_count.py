"""A growing proxy count (`student.proxy_count`): the stop rule and the state the steps hand on. Not a
stage (the student and evaluation stages import it).

Step i trains a student on the first N_i proxies (`grow_student`), scores it on a held-out measure of the
subject (`grow_evaluate`) and writes the growth so far, `proxy_count.json`, which step i + 1 reads. The
rule (`next_state`), with m_i the held-out mean and [lo_i, hi_i] its 95% interval over prompts:

  - plateau: m_i <= hi_{i-1} (the mean lies inside or below the previous step's interval): stop and
    choose N_{i-1}, the smaller count that scores as well;
  - ran out: step i needed at least as many proxies as the set holds (with curation: the kept ones):
    it trained on all of them; stop and choose it (it improved, or the plateau rule would have fired);
  - otherwise grow. After the last step (`final_state`) the largest count is chosen.

A step after the stop trains and scores nothing: it hands the state on (cheap). The subject's own
student (`grow_select`) trains on the chosen count with the chosen step's settings, so it resumes that
step's final checkpoint instead of training again.
"""

from __future__ import annotations

from pathlib import Path

from proxytune import layout
from proxytune.outputs import CodesRecord, CountState, StepScore, read_record


def available_proxies(codes_dir: Path) -> int:
    """How many proxies a student can train on: the codes stage encodes the manifest's (kept) proxies, in order.
    The one place that counts them."""
    return read_record(codes_dir, CodesRecord).num_images


def read_state(folder: Path) -> CountState:
    """The growth as a step's student or evaluation folder hands it on."""
    return CountState.read(folder / layout.COUNT_FILE, missing="run the previous step of the growing proxy count first")


def next_state(state: CountState, score: StepScore) -> CountState:
    """The growth after one more scored step (the rule in the module's docstring)."""
    steps = [*state.steps, score]
    update = {"steps": steps}
    if len(steps) >= 2 and score.mean <= steps[-2].ci95[1]:
        before = steps[-2]
        update |= {"chosen": before.used,
                   "stopped": f"plateau: {state.metric} of the {score.used}-proxy student, {score.mean:.4f}, is inside or "
                              f"below the {before.used}-proxy student's 95% interval [{before.ci95[0]:.4f}, "
                              f"{before.ci95[1]:.4f}]"}
    elif score.used >= state.available:
        update |= {"chosen": score.used,
                   "stopped": f"ran out: the {score.count}-proxy step trained on all {state.available} proxies of the set"}
    return state.model_copy(update=update)


def final_state(state: CountState) -> CountState:
    """The growth after its last step: stopped, or the largest count when every step improved."""
    if state.stopped is not None:
        return state
    if not state.steps:
        raise ValueError("no step was scored")
    last = state.steps[-1]
    return state.model_copy(update={
        "chosen": last.used,
        "stopped": f"last step: every step improved beyond the previous one's interval; {last.used} proxies "
                   f"(add larger steps to grow further)"})


def state_before(params) -> CountState:
    """The growth a step starts from: nothing yet (the first step), or what the previous step handed on."""
    grow = params.grow
    if grow.state is None:
        return CountState(metric=grow.metric, available=available_proxies(params.out("codes")))
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


def after_step(state: CountState, params, student_metrics: dict) -> CountState:
    """The growth once a step's held-out evaluation has scored its student (`student_metrics`: metric ->
    {"mean", "ci95"})."""
    from proxytune.errors import ProxytuneError

    score = student_metrics.get(state.metric)
    if score is None:
        raise ProxytuneError(f"{params.source.spec_file}: student.proxy_count.metric: the held-out evaluation has no "
                             f"{state.metric} (it measured {', '.join(student_metrics)})")
    count = params.student.num_proxy_images
    return next_state(state, StepScore(count=count, used=min(count, state.available), mean=score["mean"],
                                       ci95=list(score["ci95"])))
