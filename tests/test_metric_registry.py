"""Adding a subject metric is one registration (proxytune.metrics): a fake metric registered here alone is
scored by the evaluate stage's score step, summarised, gateable in a spec, plotted by compile and labelled in
the report and the stage's table."""

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import make_params, tiny_spec
from proxytune import metrics
from proxytune.errors import SpecError
from proxytune.images import list_images, open_rgb
from proxytune.spec import parse_spec
from proxytune.stages import evaluate

NOTE = "Brightness: mean pixel value over 255."


def brightness(inputs: metrics.ScoringInputs) -> np.ndarray:
    return np.asarray([np.asarray(image, dtype=np.float64).mean() / 255 for image in inputs.flat])


@pytest.fixture
def fake(monkeypatch):
    """A subject metric registered for this test only (the registry is restored afterwards)."""
    metrics.metrics("subject")  # the built-in and plugin metrics first, as in any process
    metric = metrics.Metric(name="brightness", label="brightness (fake)", scope="subject", description="mean pixel value",
                            score=brightness, provider="tests", note=NOTE)
    judge = metrics.Metric(name="judged", label="judged", scope="subject", description="a world's judge",
                           score=brightness, needs=("world",), provider="no-such-world",
                           applies_to="no-such-world subjects")
    monkeypatch.setitem(metrics._METRICS, ("subject", "brightness"), metric)
    monkeypatch.setitem(metrics._METRICS, ("subject", "judged"), judge)
    return metric


def solid(value: int) -> Image.Image:
    return Image.new("RGB", (32, 32), (value, value, value))


def test_a_registered_metric_is_scored_summarised_gated_plotted_and_labelled(project, fake):
    gate = [{"metric": "brightness", "vs": "teacher"}, {"metric": "brightness", "vs": 0.9}]
    params = make_params(project, tiny_spec(evaluation={"num_prompts": 2, "images_per_prompt": 2, "clip_model": "tiny-clip",
                                                        "dino_model": "tiny-dino", "bootstrap_resamples": 50, "gate": gate}))
    # compile plots it per prompt, like CLIP-I and DINO; a world's metric only for that world's subjects
    plots = yaml.safe_load((project / "dvc.yaml").read_text())["plots"]
    titles = [title for plot in plots for title in plot]
    assert "brightness per prompt t.dog" in titles and "dino per prompt t.dog" in titles
    assert not any(title.startswith("judged") for title in titles)

    # the score step runs it on every model's images, beside the built-in metrics
    files = list_images(params.references_dir)
    prompts = evaluate.eval_prompts(params)
    samples = evaluate.Samples(prompts, "a sks dog", files, [open_rgb(f) for f in files[:2]],
                               generated={"teacher": [[solid(51), solid(51)], [solid(51), solid(102)]],
                                          "student": [[solid(204), solid(204)], [solid(153), solid(204)]]},
                               random_models=[True, True], model_paths=[str(project), str(project)])
    scores = evaluate.score(params, samples)
    assert list(scores.per_image["student"]) == ["clip_i", "clip_t", "dino", "brightness"]  # registration order
    assert scores.per_image["teacher"]["brightness"] == pytest.approx([0.2, 0.2, 0.2, 0.4])

    # summarised (mean, prompt-bootstrap interval, per prompt) and gated
    summary = evaluate.summarise(params, samples, scores, student_version="1")
    assert summary.metrics["student"]["brightness"]["mean"] == pytest.approx(0.75)
    assert [row["brightness"] for row in summary.breakdown["teacher"]] == pytest.approx([0.2, 0.3])
    assert summary.gate.passed is False  # 0.75 >= the teacher's 0.25, but not >= 0.9
    assert [line.split()[-1] for line in summary.gate.details] == ["pass", "FAIL"]
    assert "student.brightness >= teacher.brightness" in summary.gate.rule

    # labelled: the stage's table and the report's columns
    table = evaluate.table(summary.metrics, True, len(prompts), 2)
    assert "| model | CLIP-I | CLIP-T | DINO | brightness (fake) |" in table and NOTE in table
    from proxytune.report.results import subject_columns

    assert subject_columns({"brightness"})[-1] == ("brightness", "brightness (fake)")
    assert ("brightness", "brightness (fake)") not in subject_columns(set())  # not measured: not shown


def test_gate_rules_accept_the_registry_metrics_and_name_them_otherwise(project, fake):
    path = project / "specs" / "gate.yaml"
    spec = tiny_spec(evaluation={"gate": [{"metric": "brightness"}]})
    assert parse_spec(spec, str(path)).evaluation.gate[0].metric == "brightness"
    spec["evaluation"]["gate"] = [{"metric": "brightnes"}]
    with pytest.raises(SpecError) as err:
        parse_spec(spec, str(path))
    assert str(err.value).startswith(f"{path}: evaluation.gate[0].metric: ")
    assert "unknown metric 'brightnes'" in str(err.value) and "clip_i, clip_t, dino" in str(err.value)
    assert "brightness" in str(err.value).split("use one of")[1]
    # a world's metric for a subject of no world: refused, naming the subject
    spec["evaluation"]["gate"] = [{"metric": "judged"}]
    with pytest.raises(SpecError, match=r"evaluation.gate\[0\].metric: judged is measured only for .*; dog is not one"):
        parse_spec(spec, str(path))


def test_world_prompts_come_from_the_installed_world(project, monkeypatch):
    from proxytune import builtins
    from proxytune.errors import ProxytuneError
    from proxytune.toyworld.subjects import toy_prompts

    spec = {"name": "toy", "subjects": [{"name": "stripy-box", "images": "toyworld:stripy-box"}],
            "teacher": {"model": "toy-sd"}, "student": {"model": "toy-llamagen"},
            "evaluation": {"prompts": "toyworld", "num_prompts": 3}}
    params = make_params(project, spec)
    assert evaluate.eval_prompts(params) == toy_prompts(params.subject.token, "box")[:3]
    assert evaluate.wants_base_models(params)  # a world's subject: base models on by default
    monkeypatch.delitem(builtins._WORLDS, "toyworld")  # the plugin uninstalled
    with pytest.raises(ProxytuneError, match=r"toy.yaml: evaluation.prompts: no world 'toyworld' is installed"):
        evaluate.eval_prompts(params)
    assert not evaluate.wants_base_models(params)
