"""Issue 29: every proxy (and every stylised pair) scored against its references, curation by the score, the
share gate, and the report's histogram and most / least faithful grids.

One small synthesis run on a toy subject (untrained tiny-sd teacher, 8 proxies, keep 4) is made once for the
module; the tests read what it wrote and re-run the stage on its pool."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_params, tiny_spec
from proxytune import layout
from proxytune.backends import encoders
from proxytune.backends.teachers import diffusion
from proxytune.errors import ProxytuneError
from proxytune.files import sha256_file
from proxytune.images import list_images, open_rgb
from proxytune.outputs import ProxyManifest, write_record
from proxytune.stages import proxy_scores, synthesis

SUBJECT = {"name": "stripy-box", "class": "box", "images": "toyworld:stripy-box"}
FIDELITY = {"keep": 4, "threshold": 0.5}


def _params(project, **fidelity):
    spec = tiny_spec(subjects=[SUBJECT], synthesis={"num_images": 8, "batch_size": 4, "num_inference_steps": 2,
                                                    "fidelity": {**FIDELITY, **fidelity}},
                     evaluation={"clip_model": "toy-clip", "dino_model": "toy-dino"})
    return make_params(project, spec)


@pytest.fixture(scope="module")
def scored(tmp_path_factory, photos):
    """A toy-subject project whose synthesis stage has run once (8 generated, the 4 best kept)."""
    project = tmp_path_factory.mktemp("scored")
    (project / "specs").mkdir()
    cwd, uri = os.getcwd(), os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.chdir(project)
    try:
        params = _params(project)
        pipe = diffusion.load_pipeline("tiny-sd")
        diffusion.add_lora(pipe.unet, rank=4, alpha=4, target_modules=["to_q", "to_v"])
        adapter = diffusion.save_lora(pipe, params.out("teacher") / "adapter")
        write_record(params.out("teacher"), {"stage": "teacher", "run_id": "0" * 32, "model": "t.stripy-box.teacher",
                                             "version": "1", "adapter_digest": sha256_file(adapter)})
        synthesis.run(params.path)
        yield project, params
    finally:
        os.chdir(cwd)
        if uri is not None:
            os.environ["MLFLOW_TRACKING_URI"] = uri


def _pool(params):
    (pool,) = [p for p in params.work("synthesis").iterdir() if p.is_dir()]
    return [pool / f"{i:05d}.png" for i in range(8)]


def test_every_proxy_scored_and_the_most_faithful_kept_first(scored):
    project, params = scored
    manifest = json.loads((params.out("proxy") / layout.MANIFEST_FILE).read_text())
    kept, dropped = manifest["images"], manifest["dropped_images"]
    assert len(kept) == 4 and len(dropped) == 4 and manifest["generated"] == 8
    assert all(e["kept"] for e in kept) and not any(e["kept"] for e in dropped)
    assert all(set(e) >= {"file", "dino", "clip_i", "oracle", "kept"} and e["oracle"] in (0.0, 1.0) for e in kept + dropped)

    # the scores are DreamBench's per-image DINO / CLIP-I against the references, computed here anew
    references = [open_rgb(p) for p in list_images(params.references_dir)]
    images = [open_rgb(p) for p in _pool(params)]
    expected = {}
    for metric, encoder in (("dino", encoders.load_dino("toy-dino")), ("clip_i", encoders.load_clip("toy-clip"))):
        expected[metric] = (encoder.image_embeds(images) @ encoder.image_embeds(references).T).mean(dim=1).numpy()
    recorded = {e["seed"]: e for e in kept + dropped}
    for metric in ("dino", "clip_i"):
        np.testing.assert_allclose([recorded[i][metric] for i in range(8)], expected[metric], atol=1e-5)
    best_first = sorted(range(8), key=lambda i: (-expected["dino"][i], i))[:4]
    assert [e["seed"] for e in kept] == best_first  # what the codes stage encodes, in this order
    assert ProxyManifest.read(params.out("proxy") / layout.MANIFEST_FILE).images[0].seed == best_first[0]
    assert sorted(os.listdir(params.out("proxy") / "images")) == [f"{i:05d}.png" for i in sorted(best_first)]

    fidelity = manifest["fidelity"]
    share = float((expected["dino"] > 0.5).mean())
    assert fidelity["generated"]["share_above"] == pytest.approx(share)
    assert fidelity["kept"]["share_above"] == pytest.approx(float((expected["dino"][best_first] > 0.5).mean()))
    assert fidelity["judged"] == [recorded[i]["oracle"] for i in range(8)]  # the oracle, generation order
    assert fidelity["generated"]["judge_share"] == pytest.approx(np.mean(fidelity["judged"]))
    assert [entry["source"] for entry in fidelity["most"]][:4] == [f"images/{i:05d}.png" for i in best_first]
    assert all((params.out("proxy") / entry["file"]).is_file() for entry in fidelity["most"] + fidelity["least"])
    metrics = json.loads((params.subject_dir / layout.PROXY_METRICS_FILE).read_text())
    assert metrics["images"] == 4 and metrics["kept_scores"] == fidelity["kept"]


def test_a_rerun_rescores_the_pool_without_generating_and_is_deterministic(scored, monkeypatch):
    project, params = scored
    before = (params.out("proxy") / layout.MANIFEST_FILE).read_bytes()

    def no_teacher(*args, **kwargs):
        raise AssertionError("the pool is complete: nothing to generate")

    monkeypatch.setattr(diffusion, "load_pipeline_with_lora", no_teacher)
    synthesis.run(params.path)
    assert (params.out("proxy") / layout.MANIFEST_FILE).read_bytes() == before  # same spec + seed, same manifest

    params = _params(project, keep=3)  # other curation: the same pool, the first 3 of the same ranking
    synthesis.run(params.path)
    manifest = json.loads((params.out("proxy") / layout.MANIFEST_FILE).read_text())
    assert [e["seed"] for e in manifest["images"]] == [e["seed"] for e in json.loads(before)["images"][:3]]


def test_the_diversity_term_spreads_the_pick_over_near_duplicates():
    # 0 and 1 are near-duplicates with the best scores; 2 is different and a little less faithful
    embeds = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.999, 0.04], [0.6, 0.8], [0.0, 1.0]]), dim=-1)
    scores = np.array([0.80, 0.79, 0.70, 0.20])
    assert proxy_scores.pick(scores, embeds, 2) == [0, 1]
    assert proxy_scores.pick(scores, embeds, 2, diversity=0.3) == [0, 2]
    assert proxy_scores.pick(scores, embeds, 2, diversity=0.3) == proxy_scores.pick(scores, embeds, 2, diversity=0.3)
    assert proxy_scores.pick(np.array([0.5, 0.5, 0.5]), embeds[:3], 3) == [0, 1, 2]  # ties: the lower index


def test_the_share_gate_fails_the_stage_in_one_line(scored):
    project, params = scored
    params = _params(project, keep=None, threshold=0.99, min_share=0.5)
    with pytest.raises(ProxytuneError) as err:
        synthesis.run(params.path)
    message = str(err.value)
    assert "\n" not in message and "synthesis.fidelity.min_share" in message and "below the required 50%" in message
    assert message.startswith("specs/t.yaml") or "t.yaml" in message.split(":")[0]


def test_the_report_shows_the_histogram_and_the_most_and_least_faithful(scored, photos):
    from test_report import fake_stage_outputs

    from proxytune import report

    project, params = scored
    _params(project)  # the spec as the fixture ran it
    synthesis.run(params.path)
    pictures = sorted((photos / "dog").iterdir())
    manifest = (params.out("proxy") / layout.MANIFEST_FILE).read_bytes()
    fake_stage_outputs(params.subject_dir, "stripy-box", pictures, models=["teacher", "student"], random_init=False,
                       variance=False, gate=False)  # an evaluation written by hand (it leaves proxy/ images alone)
    files = report.write_report(project / "specs" / "t.yaml", project)
    page, summary = files.html.read_text(), files.md.read_text()
    start = page.index("<h3>Proxy fidelity</h3>")
    fidelity = page[start : page.index("<h3>Promotion gate</h3>", start)]
    assert "8 proxies generated, 4 kept" in fidelity and "the oracle reads the whole subject in" in fidelity
    assert 'alt="histogram: dino of every generated image, stripy-box"' in fidelity
    assert fidelity.count('alt="most faithful') == 8 and fidelity.count('alt="least faithful') == 8
    assert fidelity.count("not kept") >= 4  # the least faithful were not kept
    assert "8 proxies generated, 4 kept" in summary
    assert (params.out("proxy") / layout.MANIFEST_FILE).read_bytes() == manifest


def test_the_toy_judges_seam_reads_subjects_and_styles():
    from proxytune import builtins
    from proxytune.toyworld import styles
    from proxytune.toyworld.subjects import SUBJECTS, reference_images

    toy_judges = builtins.world("toyworld")  # the stages' one seam to the toy world's judges
    own = [Image.fromarray(a) for a in reference_images(SUBJECTS["stripy-box"])]
    other = [Image.fromarray(a) for a in reference_images(SUBJECTS["dotty-ball"])]
    prompts = ["a sks box"] * len(own)
    assert toy_judges.shows_subject(own, prompts, "sks", "stripy-box").tolist() == [1.0] * len(own)
    assert toy_judges.shows_subject(other, prompts, "sks", "stripy-box").tolist() == [0.0] * len(other)
    styled = [Image.fromarray(a) for a in styles.reference_images("outline")]
    assert toy_judges.shows_style(styled, "outline").tolist() == [1.0] * len(styled)
    plain = [Image.fromarray(a) for a in styles.styled_world(8, 3, None)[0]]  # the same detector, 0/1 as floats
    assert toy_judges.shows_style(plain, "outline").tolist() == styles.detects(plain, "outline").astype(float).tolist()
    assert toy_judges.shows_style(plain, "outline").mean() <= 0.25
