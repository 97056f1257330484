"""A growing proxy count (student.proxy_count, issue 29 item 3): the option validates, the stop rule reads
synthetic scores as documented, and a tiny two-step growth runs end to end: it stops for a stated reason,
the subject's own student is the chosen step's (resumed, not trained again), and a run killed in the middle
resumes."""

import json

import numpy as np
import pytest
import yaml

from proxytune.errors import ProxytuneError
from proxytune.outputs import CountState, StepScore
from proxytune.spec import ExperimentSpec
from proxytune.stages.proxy_count import final_state, next_state
from test_team_scale import cli, mini_spec, new_project


# -- the option -------------------------------------------------------------------------------
def spec_with(**proxy_count) -> dict:
    spec = mini_spec()
    spec["student"]["proxy_count"] = proxy_count
    return spec


@pytest.mark.parametrize("change, message", [
    ({"grow": [64, 32]}, "strictly increasing"),
    ({"grow": [64]}, "at least 2"),
    ({"grow": [16, 32], "stop_when": "never"}, "plateau"),
    ({"grow": [16, 32], "prompts": 1}, "greater than or equal to 2"),
    ({"grow": [16, 32], "metric": "subject_acc"}, "toy subjects"),
    ({"grow": [16, 32], "count": 3}, "Extra inputs"),
])
def test_bad_proxy_count_is_refused_with_its_key(change, message):
    with pytest.raises(Exception) as err:
        ExperimentSpec.model_validate(spec_with(**change))
    assert "proxy_count" in str(err.value) and message in str(err.value)


@pytest.mark.parametrize("student, message", [
    ({"recipe": "direct-lora"}, "needs recipe: proxy"),
    ({"num_proxy_images": 8}, "remove num_proxy_images"),
    ({"variants": {"grow-16": {"steps": 2}}}, "variants.grow-16"),
])
def test_proxy_count_conflicts_name_the_fix(student, message):
    spec = spec_with(grow=[16, 32])
    spec["student"].update(student)
    with pytest.raises(Exception, match=message):
        ExperimentSpec.model_validate(spec)


def test_variants_train_a_fixed_count():
    spec = spec_with(grow=[16, 32])
    spec["student"]["variants"] = {"lr": {"learning_rate": 1e-3}}
    parsed = ExperimentSpec.model_validate(spec)
    assert parsed.student.proxy_count.metric is None  # resolved per subject: dino here, subject_acc for toy ones
    assert not hasattr(parsed.student.variant("lr"), "proxy_count")


def compiled(grow: list[int], **student) -> tuple[dict, dict]:
    from proxytune.compile import ResolvedSpec, compile_specs

    spec = spec_with(grow=grow)
    spec["student"].update(student)
    spec = ExperimentSpec.model_validate(spec)
    return compile_specs([ResolvedSpec(spec=spec, spec_path="specs/t.yaml", spec_digest="d", references={"dog": "refs/dog"})])


def test_compile_chains_the_steps_and_the_subjects_student_is_the_choice():
    dvc, files = compiled([16, 32], variants={"fixed": {"num_proxy_images": 16}})
    assert "grow" not in files["runs/t--fixed/dog/params.yaml"]  # a variant trains on its fixed count
    stages = dvc["stages"]
    assert list(stages["student"]["foreach"]) == ["t--fixed.dog"]  # the subject's own student is grow_select's
    steps = stages["grow_student"]["foreach"]
    assert steps["t--grow-16.dog"]["state"] == "runs/t/dog/codes"  # the first step reads no state
    assert steps["t--grow-32.dog"]["state"] == "runs/t--grow-16/dog/eval/proxy_count.json"
    assert stages["grow_select"]["foreach"]["t.dog"]["state"] == "runs/t--grow-32/dog/eval/proxy_count.json"
    assert stages["grow_evaluate"]["do"]["deps"][-1] == "${item.dir}/student"
    step = files["runs/t--grow-32/dog/params.yaml"]
    assert step["student"]["num_proxy_images"] == 32 and "proxy_count" not in step["student"]
    assert step["evaluation"]["num_prompts"] == 8 and step["evaluation"]["base_models"] is False
    assert step["grow"] == {"index": 1, "metric": "dino", "state": "runs/t--grow-16/dog/eval/proxy_count.json",
                            "stop_when": "paired"}
    assert files["runs/t/dog/params.yaml"]["grow"]["index"] is None
    # appending a step leaves the earlier steps' params as they were: DVC re-runs none of them
    longer, more = compiled([16, 32, 64])
    assert more["runs/t--grow-32/dog/params.yaml"] == step
    assert longer["stages"]["grow_student"]["foreach"]["t--grow-32.dog"] == steps["t--grow-32.dog"]


def test_a_step_after_the_stop_trains_and_scores_nothing_and_hands_the_state_on(tmp_path, monkeypatch):
    from proxytune.stages import evaluate, student

    _, files = compiled([16, 32])
    params = tmp_path / "runs/t--grow-32/dog/params.yaml"
    params.parent.mkdir(parents=True)
    params.write_text(yaml.safe_dump(files["runs/t--grow-32/dog/params.yaml"]))
    stopped = grown(8, (16, 0.5, 0.4, 0.6), (32, 0.55, 0.5, 0.6))  # e.g. a third step of an earlier growth
    (tmp_path / "runs/t--grow-16/dog/eval").mkdir(parents=True)
    stopped.write(tmp_path / "runs/t--grow-16/dog/eval/proxy_count.json")
    monkeypatch.chdir(tmp_path)
    student.run(params)  # no model is loaded: the state goes on as it was
    evaluate.run(params)
    for folder in ("student", "eval"):
        out = params.parent / folder
        assert sorted(p.name for p in out.iterdir()) == ["proxy_count.json"]
        assert CountState.read(out / "proxy_count.json") == stopped


# -- the stop rule ------------------------------------------------------------------------------
def grown(available: int, *scores: tuple[int, float, float, float]) -> CountState:
    """The state after scoring steps (count, mean, low, high) one by one."""
    state = CountState(metric="subject_acc", available=available)
    for count, mean, low, high in scores:
        state = next_state(state, StepScore(count=count, used=min(count, available), mean=mean, ci95=[low, high]))
    return state


def test_growth_continues_while_each_mean_clears_the_previous_interval():
    state = grown(1000, (128, 0.10, 0.05, 0.15), (256, 0.20, 0.14, 0.26))
    assert state.stopped is None and state.chosen is None
    final = final_state(state)
    assert final.chosen == 256 and final.stopped.startswith("last step")


@pytest.mark.parametrize("mean", [0.26, 0.20, 0.05])  # at the upper end, inside, below
def test_a_mean_inside_or_below_the_previous_interval_stops_at_the_smaller_count(mean):
    state = grown(1000, (128, 0.10, 0.05, 0.15), (256, 0.20, 0.14, 0.26), (512, mean, mean - 0.05, mean + 0.05))
    assert state.chosen == 256 and state.stopped.startswith("plateau")
    assert "[0.1400, 0.2600]" in state.stopped
    assert final_state(state) == state  # a stopped growth stays as it is


def test_running_out_of_proxies_stops_on_the_whole_set():
    state = grown(300, (128, 0.10, 0.05, 0.15), (256, 0.20, 0.14, 0.26), (512, 0.35, 0.3, 0.4))
    assert state.chosen == 300 and state.stopped.startswith("ran out") and state.steps[-1].used == 300
    # ...unless the whole set does not improve: then the plateau rule picks the smaller count
    state = grown(300, (128, 0.10, 0.05, 0.15), (256, 0.20, 0.14, 0.26), (512, 0.21, 0.15, 0.27))
    assert state.chosen == 256 and state.stopped.startswith("plateau")


def test_a_metric_the_evaluation_lacks_is_a_clear_error():
    from types import SimpleNamespace

    from proxytune.stages.proxy_count import after_step

    params = SimpleNamespace(source=SimpleNamespace(spec_file="specs/x.yaml"), student=SimpleNamespace(num_proxy_images=4))
    with pytest.raises(ProxytuneError, match="specs/x.yaml: student.proxy_count.metric: .* no subject_acc"):
        after_step(CountState(metric="subject_acc", available=8), params, {"dino": {"mean": 0.1, "ci95": [0, 0.2]}},
                   {"dino": [0.1]}, ["a box"])


# -- the paired rule, on synthetic per-image scores ---------------------------------------------------
PROMPTS = [f"prompt {p}" for p in range(8)]
K = 4  # images per prompt
# The held-out prompts differ a lot (the plain prompt is easy, some scenes hard): per prompt, how many of
# its 4 images the oracle reads as the subject at the first step.
EASY_TO_HARD = [4, 4, 3, 3, 1, 1, 0, 0]


def binary(hits_per_prompt: list[int]) -> list[float]:
    """Prompt-major 0/1 scores: the first `hits` images of each prompt read as the subject."""
    return [float(k < hits) for hits in hits_per_prompt for k in range(K)]


def scored(count: int, scores: list[float], available: int = 1000, seed: int = 500_000) -> StepScore:
    """A step's score as the held-out evaluation records it (its own interval over prompts included)."""
    from proxytune import stats

    values = np.asarray(scores)
    low, high = stats.cluster_bootstrap_ci(values, stats.prompt_clusters(values.size, K), 1000, 0)
    return StepScore(count=count, used=min(count, available), mean=float(values.mean()), ci95=[low, high],
                     prompts=PROMPTS, seed=seed, images_per_prompt=K, scores=list(scores))


def grown_on(rule: str, *steps: StepScore, available: int = 1000) -> CountState:
    state = CountState(metric="subject_acc", available=available, stop_when=rule)
    for step in steps:
        state = next_state(state, step)
    return state


# A real gain: the second step reads the subject in one more image of six prompts (the same seeds, so the
# images that were right stay right): +0.19 on average.
GAIN = [scored(16, binary(EASY_TO_HARD)), scored(32, binary([4, 4, 4, 4, 2, 2, 1, 1]))]


def test_paired_rule_sees_a_gain_that_the_plateau_rule_misses():
    before, after = GAIN
    assert before.ci95[0] <= after.mean <= before.ci95[1]  # inside the first step's wide interval: plateau stops
    plateau = grown_on("plateau", *GAIN)
    assert plateau.stopped.startswith("plateau") and plateau.chosen == 16
    paired = grown_on("paired", *GAIN)
    assert paired.stopped is None and paired.chosen is None  # the gain is clear: it grows
    step = paired.steps[-1]
    assert step.difference == pytest.approx(6 / 32) and step.difference_ci95[0] > 0
    assert plateau.steps[-1].difference == step.difference  # both rules record the paired difference
    assert final_state(paired).chosen == 32


def test_paired_rule_stops_without_a_gain_and_records_why():
    # as many images lost as gained, in other prompts: the same mean, no clear gain
    same = scored(32, binary([4, 3, 3, 4, 1, 0, 1, 0]))
    state = grown_on("paired", GAIN[0], same)
    assert state.chosen == 16 and state.steps[-1].difference == pytest.approx(0.0)
    low, high = state.steps[-1].difference_ci95
    assert low <= 0 <= high
    assert state.stopped == (f"paired: subject_acc of the 32-proxy student minus the 16-proxy student's, image by "
                             f"image on the same 8 prompts x 4 seeds, is +0.0000 [95% over prompts {low:+.4f}, "
                             f"{high:+.4f}]: no clear gain (the interval's lower end is <= 0)")
    # proxy_count.json keeps the rule, every step's scores, the difference with its interval, and the reason
    read = CountState.model_validate_json(state.model_dump_json())
    assert read == state and read.stop_when == "paired" and read.steps[-1].difference_ci95 == [low, high]


def test_paired_rule_stops_when_the_set_runs_out_after_a_clear_gain():
    steps = [scored(16, GAIN[0].scores, available=24), scored(32, GAIN[1].scores, available=24)]
    state = grown_on("paired", *steps, available=24)
    assert state.chosen == 24 and state.steps[-1].used == 24
    assert state.stopped == "ran out: the 32-proxy step trained on all 24 proxies of the set"


def test_steps_scored_on_other_held_out_images_are_not_compared():
    other_seeds = scored(32, binary([4, 4, 4, 4, 2, 2, 1, 1]), seed=7)
    with pytest.raises(ValueError, match="16- and 32-proxy steps were scored on different held-out prompts or seeds"):
        grown_on("paired", GAIN[0], other_seeds)
    unpaired = GAIN[0].model_copy(update={"scores": None})  # a state written before the paired rule
    with pytest.raises(ValueError, match="no per-image scores"):
        grown_on("paired", unpaired, GAIN[1])


def test_a_step_records_its_held_out_images_and_a_mismatch_names_the_spec():
    from types import SimpleNamespace

    from proxytune.stages.proxy_count import after_step

    def params(seed):
        return SimpleNamespace(source=SimpleNamespace(spec_file="specs/x.yaml"), student=SimpleNamespace(num_proxy_images=32),
                               evaluation=SimpleNamespace(seed=seed, images_per_prompt=K, bootstrap_resamples=200))

    values = np.asarray(GAIN[1].scores)
    values[0] = np.nan  # an image the metric does not apply to
    state = CountState(metric="subject_acc", available=1000, stop_when="paired", steps=[GAIN[0]])
    after = after_step(state, params(500_000), {"subject_acc": {"mean": 0.6, "ci95": [0.4, 0.8]}},
                       {"subject_acc": values}, PROMPTS)
    step = after.steps[-1]
    assert step.scores[0] is None and step.scores[1:] == GAIN[1].scores[1:] and step.prompts == PROMPTS
    assert step.difference == pytest.approx(6 / 31)  # the image without a score is left out of the pair
    with pytest.raises(ProxytuneError, match="specs/x.yaml: student.proxy_count: .* different held-out"):
        after_step(state, params(7), {"subject_acc": {"mean": 0.6, "ci95": [0.4, 0.8]}}, {"subject_acc": values}, PROMPTS)


def test_every_step_is_scored_on_the_same_held_out_prompts_and_seeds():
    _, files = compiled([16, 32, 64])
    held_out = [files[f"runs/t--grow-{n}/dog/params.yaml"]["evaluation"] for n in (16, 32, 64)]
    assert held_out[0] == held_out[1] == held_out[2]
    assert held_out[0]["seed"] == 500_000 and held_out[0]["num_prompts"] == 8
    assert files["runs/t--grow-16/dog/params.yaml"]["grow"]["stop_when"] == "paired"  # the default


# -- end to end on the tiny models ---------------------------------------------------------------
GROW = [2, 4]


def read(project, path):
    return json.loads((project / path).read_text())


@pytest.fixture(scope="module")
def project(tmp_path_factory, photos):
    spec = spec_with(grow=GROW, prompts=2, images_per_prompt=1)
    spec["synthesis"]["num_images"] = 2  # the first step takes the whole set: the growth stops there, the second is skipped
    root = new_project(tmp_path_factory.mktemp("proxy-count"), {"t": spec})
    # killed in the first held-out evaluation (after its images are generated): apply fails, the step's student is kept
    crashed = cli(root, photos, "apply", "specs/t.yaml", check=False, PROXYTUNE_CRASH_AT="evaluate:generated")
    resumed = cli(root, photos, "apply", "specs/t.yaml")
    return root, crashed, resumed


def test_killed_growth_resumes_and_keeps_the_finished_step(project):
    root, crashed, resumed = project
    assert crashed.returncode != 0
    ran = next(line for line in resumed.stdout.splitlines() if line.startswith("stages to run: "))
    assert "grow_student@t--grow-2.dog" not in ran and "grow_evaluate@t--grow-2.dog" in ran and "evaluate@t.dog" in ran
    # the subject's own student resumed the chosen step's final checkpoint: nothing trained twice
    assert "student: resuming from step 4 (runs/t--grow-2/dog/" in resumed.stdout + resumed.stderr


def test_growth_stops_for_a_stated_reason_and_the_chosen_student_is_evaluated(project, photos):
    root, _, _ = project
    state = CountState.read(root / "runs/t/dog/student/proxy_count.json")
    assert state.metric == "dino" and state.available == 2 and state.chosen == 2 and len(state.steps) == 1
    assert state.stopped == "ran out: the 2-proxy step trained on all 2 proxies of the set"
    assert state.stop_when == "paired" and len(state.steps[0].scores) == 2  # 2 held-out prompts x 1 seed, per image
    # a step's held-out evaluation samples and scores its student alone: the rule reads nothing else
    assert sorted(p.name for p in (root / "runs/t--grow-2/dog/eval/images").iterdir()) == ["student"]
    for folder in ("student", "eval"):  # the step after the stop: the state handed on, nothing trained or scored
        assert sorted(p.name for p in (root / "runs/t--grow-4/dog" / folder).iterdir()) == ["proxy_count.json"]
    chosen = read(root, "runs/t--grow-2/dog/student/record.json")
    own = read(root, "runs/t/dog/student/record.json")
    assert own["adapter_digest"] == chosen["adapter_digest"]  # the chosen step's weights
    assert own["model"] == "t.dog.student"
    assert read(root, "runs/t/dog/eval/record.json")["student_version"] == f"t.dog.student@{own['version']}"
    params = yaml.safe_load((root / "runs/t--grow-2/dog/params.yaml").read_text())
    assert params["evaluation"]["seed"] == 500_000 and params["student"]["num_proxy_images"] == 2
    assert "up to date: no stage to run" in cli(root, photos, "apply", "specs/t.yaml", "--dry-run").stdout


def test_a_crafted_grow_state_outside_the_growth_is_refused_before_any_work(tmp_path, monkeypatch):
    from proxytune.errors import SpecError
    from proxytune.stages import student

    _, files = compiled([16, 32])
    params = tmp_path / "runs/t--grow-32/dog/params.yaml"
    params.parent.mkdir(parents=True)
    crafted = files["runs/t--grow-32/dog/params.yaml"]
    crafted["grow"]["state"] = "runs/other/dog/eval/proxy_count.json"
    params.write_text(yaml.safe_dump(crafted))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SpecError, match="grow.state: .* is not a step of experiment 't'"):
        student.run(params)
    assert sorted(p.name for p in params.parent.iterdir()) == ["params.yaml"]
