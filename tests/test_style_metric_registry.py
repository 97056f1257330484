"""Adding a style metric is one registration (issue 28): style_evaluate scores what the registry holds and the
report labels it, without a list of its own."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

RED, BLUE = Image.new("RGB", (32, 32), (255, 0, 0)), Image.new("RGB", (32, 32), (0, 0, 255))


def redness(inputs) -> np.ndarray:
    """The fake metric: each image's mean red channel in [0, 1]."""
    return np.asarray([np.asarray(image)[..., 0].mean() / 255 for group in inputs.images for image in group])


@pytest.fixture
def fake_metric(monkeypatch):
    from proxytune import metrics

    metrics.metrics("style")  # fill the table first, then register into a copy that leaves with the test
    monkeypatch.setattr(metrics, "_METRICS", dict(metrics._METRICS))
    metrics.register(metrics.Metric("redness", "redness (fake)", "style", "mean red channel of the image", redness,
                                    plotted=False, gateable=False, provider="test"))


def test_a_registered_style_metric_is_scored_summarised_tabled_and_labelled(fake_metric):
    from proxytune.outputs import EncoderInfo, EvaluationMetrics, Sampling, StyleEncoders, StyleRecords
    from proxytune.backends import encoders
    from proxytune.backends.style_metrics import reference_embeds
    from proxytune.report.markdown import _style
    from proxytune.report.page import render_html
    from proxytune.report.results import Report, StyleResult, style_labels
    from proxytune.stages import style_evaluate

    chosen = style_evaluate.scored_metrics(world=None)
    names = [m.name for m in chosen]
    assert names == ["style_clip", "style_gram", "clip_t", "leakage", "content_dino", "redness"]  # no world: no toy judges
    toy, other = SimpleNamespace(name="toyworld"), SimpleNamespace(name="elsewhere")
    assert [m.name for m in style_evaluate.scored_metrics(toy)] == [*names[:-1], "style_acc", "prompt_acc", "content_leak",
                                                                     "redness"]
    assert [m.name for m in style_evaluate.scored_metrics(other)] == names  # a world's judges only for its own styles

    clip, dino = encoders.load_clip("tiny-clip"), encoders.load_dino("tiny-dino")
    generated = {"teacher": [[RED, BLUE], [BLUE, BLUE]], "student": [[RED, RED], [BLUE, RED]]}
    scores = style_evaluate.score(generated, ["a cat", "a dog"], chosen, encoders={"clip": clip, "dino": dino},
                                  references=reference_embeds(clip, dino, [RED]), content=None, world=None, item=None)
    assert scores["student"]["redness"].tolist() == [1.0, 1.0, 0.0, 1.0]
    assert "leakage" not in scores["student"] and scores["student"]["style_clip"].shape == (4,)  # no caption: left out

    class Params:  # the evaluation fields summarise reads
        class evaluation:
            images_per_prompt, bootstrap_resamples, seed = 2, 50, 0

    metrics, breakdown = style_evaluate.summarise(scores, ["a cat", "a dog"], Params)
    assert metrics["student"]["redness"]["mean"] == 0.75 and metrics["teacher"]["redness"]["mean"] == 0.25
    assert [row["redness"] for row in breakdown["student"]] == [1.0, 0.5]
    table = style_evaluate.table(metrics, False, 2, 2)
    assert table.splitlines()[0].endswith("| content (DINO) | redness (fake) |")
    assert "redness (fake): mean red channel of the image." in table

    assert style_labels()["redness"] == "redness (fake)"
    described = StyleEncoders(clip=EncoderInfo(model="tiny-clip", random_init=True),
                              dino=EncoderInfo(model="tiny-dino", random_init=True), style_encoder="tiny-clip",
                              metrics={"redness": "mean red channel"}, random_init=True, content=None,
                              noise_strength=0.5, sampling=Sampling(cfg_scale=1.0, top_k=None, temperature=1.0))
    style = StyleResult(name="ink", folder=None, reference_files=[],
                        metrics=EvaluationMetrics(models=metrics, prompts=2, kind="style"), prompts=["a cat", "a dog"],
                        encoders=described, records=StyleRecords(None, None, None, None), images={})
    assert style.columns == ["style_clip", "style_gram", "clip_t", "content_dino", "redness"]
    assert _style(style)[3] == "| model | style CLIP | style Gram | CLIP-T | content (DINO) | redness (fake) |"
    page = render_html(Report(experiment="e", mlflow_experiment="e", tracking_uri=None, spec_path="s.yaml",
                              spec_text="", spec_digest="d", subjects=[], styles=[style]))
    assert '<th scope="col">redness (fake)</th>' in page and "<li>redness (fake): mean red channel</li>" in page
