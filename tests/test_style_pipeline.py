"""Styles (issue 15) by behaviour: the style tokens condition the tiny Lumina-mGPT (same prompt, two style
images, two outputs; gradients reach the resampler; an overfit model reproduces a style-conditioned
target), the leakage metric separates a copying model from a non-copying one, spec errors name the key,
and the tiny style pipeline runs end to end with its registry lineage."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from PIL import Image

from proxytune.backends import encoders, students
from proxytune.backends.stylear.style_student import StyleStudent

REPO = Path(__file__).resolve().parents[1]
REFERENCES = REPO / "specs" / "styles" / "stained-glass"


def striped(colours, horizontal: bool = True, size: int = 64) -> Image.Image:
    """A picture of bands in `colours`: a stand-in for a style (palette and texture)."""
    array = np.zeros((size, size, 3), dtype=np.uint8)
    band = size // 8
    for i in range(8):
        sl = (slice(i * band, (i + 1) * band), slice(None)) if horizontal else (slice(None), slice(i * band, (i + 1) * band))
        array[sl] = colours[i % len(colours)]
    return Image.fromarray(array)


STYLE_A = striped([(220, 20, 20), (250, 220, 40)])
STYLE_B = striped([(20, 40, 200), (250, 250, 250)], horizontal=False)


@pytest.fixture(scope="module")
def style_student():
    """A fresh tiny style student: tiny Lumina-mGPT + tiny CLIP + a small random resampler, 2 style tokens,
    a prompt turn only as long as the template and a short prompt need (less compute per test)."""
    from proxytune.backends.stylear import style_tokens as st

    bundle = students.load_student("tiny-lumina-mgpt")
    clip = encoders.load_clip("tiny-clip")
    style = StyleStudent.build(bundle, clip, num_tokens=2, depth=1, heads=2, dim_head=16, seed=0)
    style.prompt_len = len(bundle.tokenizer.encode(st.style_prompt("", 2), add_special_tokens=False)) + 2 + 16
    return style


def _add_lora(style):
    from peft import LoraConfig, get_peft_model

    bundle = style.student
    torch.manual_seed(0)
    bundle.model = get_peft_model(bundle.model, LoraConfig(r=8, lora_alpha=8, target_modules=bundle.lora_target_modules()))
    return [p for p in bundle.model.parameters() if p.requires_grad]


def test_same_prompt_two_style_images_two_outputs_and_the_same_image_the_same_output(style_student):
    features = style_student.image_features([STYLE_A, STYLE_B, STYLE_A])
    codes = style_student.generate(["a cat"] * 3, features, [3, 3, 3], cfg_scale=1.0, temperature=0, noise_strength=0.0)
    assert not torch.equal(codes[0], codes[1])  # only the style image differs
    assert torch.equal(codes[0], codes[2])
    # the unconditional branch has neither text nor style: CFG at scale 4 still differs by style
    guided = style_student.generate(["a cat"] * 2, features[:2], [3, 3], cfg_scale=4.0, top_k=20, noise_strength=0.0)
    assert not torch.equal(guided[0], guided[1])
    # style-enhanced tokens: the noise is seeded per image, so one seed gives one image
    again = style_student.generate(["a cat"] * 2, features[:1], [5, 5], cfg_scale=4.0, top_k=20, noise_strength=0.3)
    assert torch.equal(again[0], again[1])


def test_gradients_reach_the_resampler_and_not_the_frozen_clip(style_student):
    features = style_student.image_features([STYLE_A, STYLE_B])
    cond, positions = style_student.encode_prompts(["a cat", "a dog"])
    codes = torch.randint(0, style_student.student.codebook_size, (2, style_student.student.seq_len))
    style_student.resampler.zero_grad()
    tokens = style_student.style_tokens(features)
    terms = style_student.sequence_loss(cond, positions, tokens, codes, torch.zeros(2, dtype=torch.bool),
                                        torch.ones(style_student.student.seq_len))
    terms["ce"].backward()
    grads = {name: p.grad for name, p in style_student.resampler.named_parameters()}
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values()), [n for n, g in grads.items() if g is None]
    assert all(p.grad is None for p in style_student.clip.model.parameters())
    # a dropped row (CFG dropout) masks the prompt turn, style tokens included: no gradient reaches them from it
    style_student.resampler.zero_grad()
    tokens = style_student.style_tokens(features)
    tokens.retain_grad()
    style_student.sequence_loss(cond, positions, tokens, codes, torch.tensor([True, False]),
                                torch.ones(style_student.student.seq_len))["ce"].backward()
    assert tokens.grad[0].abs().max() == 0 and tokens.grad[1].abs().max() > 0


def test_an_overfit_model_reproduces_a_style_conditioned_target(style_student):
    """Two (style image, target) pairs under one prompt: only the style tokens tell the targets apart."""
    bundle = style_student.student
    lora = _add_lora(style_student)
    g = torch.Generator().manual_seed(1)
    targets = torch.randint(0, bundle.codebook_size, (2, bundle.seq_len), generator=g)
    features = style_student.image_features([STYLE_A, STYLE_B])
    cond, positions = style_student.encode_prompts(["a picture"] * 2)
    opt = torch.optim.AdamW(lora + list(style_student.resampler.parameters()), lr=2e-2, weight_decay=0.0)
    keep, weights = torch.zeros(2, dtype=torch.bool), torch.ones(bundle.seq_len)
    bundle.model.train()
    for _ in range(100):
        loss = style_student.sequence_loss(cond, positions, style_student.style_tokens(features), targets, keep, weights)["ce"]
        loss.backward()
        opt.step()
        opt.zero_grad()
    bundle.model.eval()
    greedy = style_student.generate(["a picture"] * 2, features, [0, 0], cfg_scale=1.0, temperature=0, noise_strength=0.0)
    match = (greedy == targets).float().mean(dim=1)
    assert match.min() > 0.9, match
    swapped = style_student.generate(["a picture"] * 2, features.flip(0), [0, 0], cfg_scale=1.0, temperature=0,
                                     noise_strength=0.0)
    assert torch.equal(swapped, greedy.flip(0))  # the style image, not the row, picks the target


def test_leakage_separates_a_copying_model_from_a_non_copying_one():
    """Toy world renders scored by the toy world's trained CLIP and DINO: a 'copying' model draws the
    reference's object whatever the prompt asks; a 'non-copying' one draws what the prompt asks."""
    from proxytune.backends.style_metrics import reference_embeds, style_scores
    from proxytune.toyworld.world import Attributes, caption, render, sample_layout

    rng = np.random.default_rng(0)
    reference = Attributes("cone", "red", "stripes", "white", "beach")

    def draw(attrs):
        return Image.fromarray(render(attrs, sample_layout(rng, attrs)))

    asked = [Attributes("ball", "blue", scene="snow"), Attributes("kite", "green", scene="night"),
             Attributes("box", "yellow", "dots", "black", "jungle"), Attributes("can", "purple", scene="street")]
    prompts = [caption(a) for a in asked for _ in range(2)]
    copying = [draw(reference) for _ in prompts]
    faithful = [draw(a) for a in asked for _ in range(2)]
    clip, dino = encoders.load_clip("toy-clip"), encoders.load_dino("toy-dino")
    refs = reference_embeds(clip, dino, [draw(reference) for _ in range(3)])
    copy_scores = style_scores(copying, prompts, refs, clip, dino, caption(reference))
    fair_scores = style_scores(faithful, prompts, refs, clip, dino, caption(reference))
    assert copy_scores["leakage"].mean() > fair_scores["leakage"].mean() + 0.05
    assert copy_scores["content_dino"].mean() > fair_scores["content_dino"].mean()
    assert (copy_scores["leakage"] > np.median(fair_scores["leakage"])).mean() >= 0.75  # image by image too
    assert fair_scores["clip_t"].mean() > copy_scores["clip_t"].mean()


# -- spec --------------------------------------------------------------------------------------------
def _style_spec(**style) -> dict:
    return {"name": "s", "student": {"model": "tiny-lumina-mgpt"},
            "styles": [{"name": "glass", "images": "refs", "prompts": ["a cat", "a dog"], "raw": {"toyworld": 4}, **style}]}


BAD = [
    (_style_spec(prompts=[]), "styles[0].prompts:"),
    (_style_spec(prompts="a cat"), "styles[0].prompts: must be a list of prompts, {file: PATH} or {generate: N}"),
    (_style_spec(prompts={"generate": 0}), "styles[0].prompts.generate: must be a positive integer"),
    (_style_spec(prompts={"generate": 5000}), "styles[0].prompts.generate: at most"),
    (_style_spec(prompts={"file": "missing.txt"}), "styles[0].prompts.file: cannot read"),
    (_style_spec(prompts=["a {token} cat"]), "styles[0].prompts: prompt 0"),
    (_style_spec(raw={}), "styles[0].raw: raw data: set folder"),
    (_style_spec(raw={"toyworld": 4, "folder": "x"}), "styles[0].raw: set one of folder and toyworld"),
    (_style_spec(raw={"folder": "nowhere"}), "styles[0].raw.folder: no such folder"),
    (_style_spec(raw={"folder": "refs"}), "styles[0].raw.folder: "),  # images without captions
    (_style_spec(images="nowhere"), "styles[0].images: no such folder"),
    (_style_spec(name="Bad Name"), "styles[0].name: must be"),
    (_style_spec(colour="red"), "styles[0].colour: unknown key"),
    ({**_style_spec(), "student": {"model": "tiny-janus"}}, "student.model: a style student needs the Lumina-mGPT or LlamaGen"),
    ({**_style_spec(), "style_student": {"noise_strength": -1}}, "style_student.noise_strength:"),
    ({**_style_spec(), "subjects": [{"name": "glass", "class": "dog", "images": "refs"}]}, "styles[0].name: 'glass' is already"),
]


@pytest.mark.parametrize("data,expected", BAD, ids=[e for _, e in BAD])
def test_bad_style_spec_one_line_naming_the_key_exit_2(tmp_path, monkeypatch, data, expected):
    from proxytune.cli import main

    monkeypatch.chdir(tmp_path)
    shutil.copytree(REFERENCES, tmp_path / "refs")
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(main, ["validate", str(path)])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert lines[0].startswith(f"error: {path}: ") and expected in lines[0], lines[0]


def test_prompt_file_generated_prompts_and_a_captioned_raw_folder_resolve(tmp_path, monkeypatch):
    from proxytune.project import resolve_spec

    monkeypatch.chdir(tmp_path)
    shutil.copytree(REFERENCES, tmp_path / "refs")
    (tmp_path / "raw").mkdir()
    STYLE_A.save(tmp_path / "raw" / "a.png")
    STYLE_B.save(tmp_path / "raw" / "b.png")
    (tmp_path / "raw" / "metadata.jsonl").write_text('{"file_name": "b.png", "text": "blue bands"}\n'
                                                      '{"file_name": "a.png", "text": "red bands"}\n')
    (tmp_path / "prompts.txt").write_text("# curation prompts\na cat\n\na dog\n")
    spec = _style_spec(prompts={"file": "prompts.txt"}, raw={"folder": "raw"})
    spec["styles"].append({"name": "other", "images": "refs", "prompts": {"generate": 5, "seed": 1}, "raw": {"ratio": 0}})
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    resolved = resolve_spec(tmp_path / "spec.yaml", tmp_path)
    assert resolved.styles["glass"] == {"raw": "raw", "prompts": ["a cat", "a dog"]}
    assert len(resolved.styles["other"]["prompts"]) == 5 and resolved.styles["other"]["raw"] is None
    from proxytune.spec.style import captioned_images

    assert [(p.name, c) for p, c in captioned_images(tmp_path / "raw")] == [("a.png", "red bands"), ("b.png", "blue bands")]


# -- the pipeline --------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["tiny-lumina-mgpt", "tiny-llamagen"])
def test_tiny_style_pipeline_end_to_end_with_registry_lineage(tmp_path, monkeypatch, model):
    """compile -> teacher -> curation -> style student -> style evaluation, each stage's run() in this
    process (DVC's orchestration is tested for subjects); then the registry's lineage and the report."""
    from proxytune.tracking import audit, lineage, registry, store
    from proxytune.project import resolve_spec, write_compiled
    from proxytune.stages import curation, style_evaluate, style_student, teacher
    from proxytune.stages.params import load_params

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    shutil.copytree(REFERENCES, tmp_path / "refs")
    spec = {
        "name": "sty", "seed": 0,
        "styles": [{"name": "glass", "images": "refs", "content": "a white lighthouse on a rock",
                    "prompts": ["a red boat", "a green tree"], "raw": {"toyworld": 6, "ratio": 3.0},
                    "images_per_prompt": 2, "fidelity": {"keep": 1}}],  # issue 29: the better of two per prompt
        "teacher": {"model": "tiny-sd", "resolution": 64, "steps": 2, "batch_size": 1, "checkpoint_every": 1},
        "synthesis": {"num_inference_steps": 2, "batch_size": 2},
        "student": {"model": model, "steps": 3, "batch_size": 2, "learning_rate": 1e-3,
                    "checkpoint_every": 2, "lora": {"rank": 4, "alpha": 4}, "sampling": {"top_k": 20}},
        "style_student": {"clip_model": "tiny-clip", "num_style_tokens": 2,
                          "resampler": {"depth": 1, "heads": 2, "dim_head": 8}},
        "evaluation": {"prompts": ["a cat"], "images_per_prompt": 1, "clip_model": "tiny-clip",
                       "dino_model": "tiny-dino", "bootstrap_resamples": 20},
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    write_compiled([resolve_spec(tmp_path / "spec.yaml", tmp_path)], tmp_path)
    dvc = yaml.safe_load((tmp_path / "dvc.yaml").read_text())
    assert {"teacher", "curation", "style_student", "style_evaluate"} <= set(dvc["stages"])
    params_path = tmp_path / "runs" / "sty" / "glass" / "params.yaml"
    assert load_params(params_path).instance_prompt == "a picture in sks style"
    for stage in (teacher, curation, style_student, style_evaluate):
        stage.run(params_path)

    folder = tmp_path / "runs" / "sty" / "glass"
    manifest = json.loads((folder / "curated" / "manifest.json").read_text())
    assert [e["prompt"] for e in manifest["images"]] == ["a red boat", "a green tree"]  # identifier not in the caption
    assert [e["teacher_prompt"] for e in manifest["images"]] == ["a red boat, in sks style", "a green tree, in sks style"]
    assert manifest["raw"]["num_images"] == 6
    from proxytune.files import sha256_file

    assert all(sha256_file(folder / "curated" / e["file"]) == e["sha256"] for e in manifest["images"] + manifest["raw"]["images"])
    # issue 29: every stylised image scored against the style references, the better of each prompt's two kept
    dropped = manifest["dropped_images"]
    assert all(e["kept"] for e in manifest["images"]) and len(dropped) == 2 and not any(e["kept"] for e in dropped)
    for kept, other in zip(manifest["images"], dropped):
        assert kept["prompt"] == other["prompt"] and kept["style_clip"] >= other["style_clip"]  # the default ranking
    assert manifest["fidelity"]["generated"]["count"] == 4 and manifest["fidelity"]["kept"]["count"] == 2
    # sampling fields the spec leaves unset take StyleAR's values (cfg 4.0, temperature 1), not Lumina-mGPT's;
    # a LlamaGen style student takes LlamaGen's (cfg 7.5)
    sampling = {"cfg_scale": 4.0 if model == "tiny-lumina-mgpt" else 7.5, "top_k": 20, "temperature": 1.0}
    assert json.loads((folder / "student" / "record.json").read_text())["sampling"] == sampling
    assert json.loads((folder / "eval" / "encoders.json").read_text())["sampling"] == sampling
    metrics = json.loads((folder / "metrics.json").read_text())
    assert {"style_clip", "style_gram", "clip_t", "leakage", "content_dino"} <= set(metrics["student"])
    assert (folder / "eval" / "grid.png").exists()
    from test_outputs import check_stage_outputs

    check_stage_outputs(folder, tmp_path / "copies")  # every file parses with its readers' model, same bytes back

    uri = store.resolve_uri(None, tmp_path)
    chain = lineage.lineage(uri, "sty.glass.student@1")
    assert chain["references"]["digest"] and chain["teacher"]["version"] == "sty.glass.teacher@1"
    assert chain["proxy"]["digest"] == manifest["digest"] and chain["proxy"]["num_images"] == "2"
    assert chain["evaluations"] and "student.style_gram" in chain["evaluations"][0]["metrics"]
    # the style stages' runs are tagged as theirs, not as a subject's student and evaluation
    assert chain["evaluations"][0]["kind"] == "style"
    evaluation = lineage.evaluation_run(uri, "sty.glass.student@1")
    assert evaluation.data.tags["proxytune.stage"] == "style_evaluate"
    student_run = store.connect(uri).get_run(chain["student"]["run_id"])
    assert student_run.data.tags["proxytune.stage"] == "style_student"
    compared = lineage.compare(uri, "sty.glass.student@1", evaluation.info.run_id)
    assert compared["kind"] == "style" and compared["intervals"]["student.style_gram"] == (0.0, 0.0)
    assert chain["proxy"]["set"] == "curated"
    assert not audit.audit(uri)["problems"]
    # an edit of style_student: only the style student and its evaluation are stale against the spec
    from proxytune.tracking import provenance

    spec["style_student"]["noise_strength"] = 0.5
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    changed = {kind: provenance._spec_changed(chain[kind], tmp_path, {}) for kind in ("teacher", "proxy", "student")}
    changed["evaluation"] = provenance._spec_changed(chain["evaluations"][0], tmp_path, {})
    edited = ["spec spec.yaml edited since: style_student (not compiled yet)"]
    assert changed == {"teacher": [], "proxy": [], "student": edited, "evaluation": edited}, changed
    pulled, _ = registry.pull(uri, "sty.glass.student@1", tmp_path / "pulled")
    # the pulled folder is a style student as it was trained: same images
    bundle = students.load_student(model)
    again = StyleStudent.load(pulled, bundle, encoders.load_clip("tiny-clip"))
    reference = Image.open(tmp_path / "refs" / "ref0.png").convert("RGB")
    codes = again.generate(["a cat"], again.image_features([reference]), [0], cfg_scale=2.0, top_k=20)
    assert codes.shape == (1, bundle.seq_len)

    from proxytune import report

    written = report.write_report(tmp_path / "spec.yaml", tmp_path)
    html = written.html.read_text()
    assert "Style glass" in html and "curated (teacher)" in html
    assert "4 stylised images generated, 2 kept" in html and 'alt="histogram: style_clip' in html


# -- registry: style evaluations are not subject evaluations ------------------------------------------
def _registered_student(tmp_path: Path, uri: str, subject: str, stage: str) -> str:
    """A student version registered by a `stage` run (a one-file adapter); returns NAME@VERSION."""
    from proxytune.tracking import runs

    folder = tmp_path / f"{subject}-adapter"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(subject.encode())
    with runs.StageRun("e", subject, stage, uri, tmp_path, {"spec_digest": "d"}) as run:
        version = run.register(folder, "student", {"adapter_digest": "x"})
    return f"e.{subject}.student@{version}"


def _evaluation(tmp_path: Path, uri: str, student: str, stage: str, metrics: dict[str, list[float]], **tags) -> str:
    """An evaluation run as the stages log it: MODEL.METRIC means, eval/per_prompt.json and eval/prompts.json."""
    from proxytune.tracking import runs

    subject = student.split(".")[1]
    files = tmp_path / f"eval-{subject}-{stage}"
    (files / "eval").mkdir(parents=True)
    prompts = ["a cat", "a boat"]
    per_prompt = {"student": [{"prompt": p, **{m: v[i] for m, v in metrics.items()}} for i, p in enumerate(prompts)]}
    (files / "eval" / "per_prompt.json").write_text(json.dumps(per_prompt))
    (files / "eval" / "prompts.json").write_text(json.dumps(prompts))
    with runs.StageRun("e", subject, stage, uri, tmp_path, {"student_version": student, **tags}) as run:
        run.log_metrics({f"student.{m}": float(np.mean(v)) for m, v in metrics.items()})
        run.log_artifacts(files)
    return run.run_id


def test_compare_tells_style_evaluations_from_subject_evaluations(tmp_path, monkeypatch):
    """compare of two style students gives their style metrics with intervals; a style student against a
    subject student, or a run that is no evaluation, is one line naming the proxytune.stage tag, exit 2."""
    from proxytune.tracking import lineage, registry, store
    from proxytune.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = store.resolve_uri(None, tmp_path)
    glass = _registered_student(tmp_path, uri, "glass", "style_student")
    ink = _registered_student(tmp_path, uri, "ink", "style_student")
    dog = _registered_student(tmp_path, uri, "dog", "student")
    _evaluation(tmp_path, uri, glass, "style_evaluate", {"style_gram": [0.5, 0.7], "leakage": [0.2, 0.2]}, style="glass")
    # a style evaluation logged before style evaluations had their own stage tag: stage 'evaluate' + a style tag
    _evaluation(tmp_path, uri, ink, "evaluate", {"style_gram": [0.6, 0.9], "leakage": [0.1, 0.3]}, style="ink")
    dog_run = _evaluation(tmp_path, uri, dog, "evaluate", {"dino": [0.4, 0.6], "clip_i": [0.5, 0.5]})

    def compare(a, b):
        result = CliRunner().invoke(main, ["compare", a, b, "--uri", uri])
        return result.exit_code, [line for line in result.output.splitlines() if line.strip()]

    code, lines = compare(glass, ink)
    assert code == 0, lines
    gram = next(line for line in lines if line.startswith("student.style_gram"))
    assert "+0.1500" in gram and gram.endswith("[+0.1000, +0.2000]")  # paired by prompt: +0.1 and +0.2
    assert not any("dino" in line for line in lines) and "style evaluations" in lines[-2]
    assert lineage.compare(uri, glass, ink)["kind"] == "style"
    assert lineage.compare(uri, dog, dog_run)["kind"] == "subject"

    for a, b in ((glass, dog), (dog_run, ink)):
        code, lines = compare(a, b)
        assert code == 2 and len(lines) == 1, lines
        assert lines[0].startswith(f"error: {a} is a ") and "tag proxytune.stage" in lines[0], lines[0]
        assert "style_evaluate vs evaluate" in lines[0] or "evaluate vs style_evaluate" in lines[0]
    student_run = registry.show(uri, glass)["run_id"]
    code, lines = compare(student_run, ink)
    assert code == 2 and lines == [f"error: run {student_run}: not an evaluation run (tag proxytune.stage is "
                                   "'style_student', expected one of evaluate, style_evaluate)"]
    # lineage lists the style evaluation as one
    assert [e["kind"] for e in lineage.lineage(uri, glass)["evaluations"]] == ["style"]


# -- the LlamaGen side: style tokens in the caption slots ----------------------------------------------
@pytest.fixture(scope="module")
def llamagen_style():
    """A fresh tiny LlamaGen style student: tiny-llamagen (32 caption slots of 32-wide T5 features) + tiny CLIP
    + a small random resampler, 2 style tokens."""
    bundle = students.load_student("tiny-llamagen")
    return StyleStudent.build(bundle, encoders.load_clip("tiny-clip"), num_tokens=2, depth=1, heads=2, dim_head=16, seed=0)


def test_llamagen_style_tokens_take_the_caption_slots_before_the_caption(llamagen_style):
    style = llamagen_style
    C = style.student.config.cond_len
    feats, positions = style.encode_prompts(["a cat", "a very long caption about many things " * 10])
    tokens = (feats != 0).any(dim=-1)
    n = int(tokens[0].sum())
    # a short caption: the plain student's features (left-padded), the two slots right before it are the style's
    torch.testing.assert_close(feats[0], style.student.encode_prompts(["a cat"])[0], rtol=1e-5, atol=1e-5)
    assert positions[0].tolist() == [C - n - 2, C - n - 1] and not tokens[0, : C - n].any()
    # a long caption keeps C - 2 tokens, the style slots first
    assert int(tokens[1].sum()) == C - 2 and positions[1].tolist() == [0, 1]
    # written in, the style tokens count as caption tokens for the attention mask
    from proxytune.backends.stylear import style_tokens as st

    text = st.replace_placeholders(feats, positions, style.style_tokens(style.image_features([STYLE_A, STYLE_B])))
    assert int((text[0] != 0).any(dim=-1).sum()) == n + 2


def test_llamagen_same_prompt_two_style_images_two_outputs_and_the_null_caption_ignores_them(llamagen_style):
    style = llamagen_style
    features = style.image_features([STYLE_A, STYLE_B, STYLE_A])
    codes = style.generate(["a cat"] * 3, features, [3, 3, 3], cfg_scale=1.0, temperature=0, noise_strength=0.0)
    assert not torch.equal(codes[0], codes[1]) and torch.equal(codes[0], codes[2])
    guided = style.generate(["a cat"] * 2, features[:2], [3, 3], cfg_scale=4.0, top_k=20, noise_strength=0.0)
    assert not torch.equal(guided[0], guided[1])
    # the unconditional branch (LlamaGen's null caption in every slot) is the same whatever the style
    from proxytune.backends.stylear import style_tokens as st

    feats, positions = style.encode_prompts(["a cat"] * 2)
    text = st.replace_placeholders(feats, positions, style.style_tokens(features[:2]))
    targets = torch.zeros(2, style.student.seq_len, dtype=torch.long)
    with torch.no_grad():
        cond = style.student.model(text, targets, drop_cond=torch.tensor([False, False]))
        null = style.student.model(text, targets, drop_cond=torch.tensor([True, True]))
    assert (cond[0] - cond[1]).abs().max() > 1e-3
    torch.testing.assert_close(null[0], null[1])


def test_llamagen_gradients_reach_the_resampler_through_the_caption_projection(llamagen_style):
    style = llamagen_style
    features = style.image_features([STYLE_A, STYLE_B])
    cond, positions = style.encode_prompts(["a cat", "a dog"])
    codes = torch.randint(0, style.student.codebook_size, (2, style.student.seq_len))
    style.resampler.zero_grad()
    tokens = style.style_tokens(features)
    tokens.retain_grad()
    terms = style.sequence_loss(cond, positions, tokens, codes, torch.tensor([True, False]),
                                torch.ones(style.student.seq_len))
    assert float(terms["z_loss"]) == 0.0
    terms["ce"].backward()
    grads = {name: p.grad for name, p in style.resampler.named_parameters()}
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values()), [n for n, g in grads.items() if g is None]
    assert all(p.grad is None for p in style.clip.model.parameters())
    assert tokens.grad[0].abs().max() == 0 and tokens.grad[1].abs().max() > 0  # row 0 dropped: the null caption


def test_llamagen_style_student_saved_and_loaded_samples_the_same(tmp_path):
    from peft import LoraConfig, get_peft_model

    bundle = students.load_student("tiny-llamagen")
    style = StyleStudent.build(bundle, encoders.load_clip("tiny-clip"), num_tokens=3, depth=1, heads=2, dim_head=8, seed=4)
    torch.manual_seed(0)
    bundle.model = get_peft_model(bundle.model, LoraConfig(r=4, lora_alpha=4, target_modules=bundle.lora_target_modules()))
    with torch.no_grad():  # a LoRA that does something (peft starts B at zero)
        for name, p in bundle.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    features = style.image_features([STYLE_A, STYLE_B])
    sampling = {"cfg_scale": 4.0, "top_k": 50, "temperature": 1.0}
    before = style.generate(["a cat", "a boat"], features, [1, 2], noise_strength=0.3, **sampling)
    style.save(tmp_path / "model", base_model="tiny-llamagen", clip_model="tiny-clip", noise_strength=0.3, sampling=sampling)
    meta = json.loads((tmp_path / "model" / "proxytune_style.json").read_text())
    assert meta["backend"] == "llamagen" and meta["prompt_len"] == bundle.config.cond_len - 3
    again = StyleStudent.load(tmp_path / "model", students.load_student("tiny-llamagen"), encoders.load_clip("tiny-clip"))
    after = again.generate(["a cat", "a boat"], again.image_features([STYLE_A, STYLE_B]), [1, 2], noise_strength=0.3, **sampling)
    assert torch.equal(before, after)
    from proxytune.errors import ProxytuneError

    with pytest.raises(ProxytuneError, match=r"proxytune_style.json: backend: a llamagen style student, loaded on a lumina-mgpt"):
        StyleStudent.load(tmp_path / "model", students.load_student("tiny-lumina-mgpt"), encoders.load_clip("tiny-clip"))
