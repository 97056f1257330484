"""Typed stage outputs (proxytune/outputs.py): every model round-trips through write/read, a malformed file
is a one-line error naming the file and the field, and what the stages write parses with the model its
readers use (on real stage output: `check_stage_outputs`, called by the end-to-end and style pipeline tests)."""

import json
from pathlib import Path

import pytest

from proxytune import layout, outputs
from proxytune.errors import ProxytuneError
from proxytune.files import write_json_atomic

SAMPLING = {"cfg_scale": 7.5, "top_k": None, "temperature": 1.0}
MEANS = {"teacher": {"clip_i": 0.5, "dino": 0.25}, "student": {"clip_i": 0.375, "dino": 0.125}}
SUMMARY = {"mean": 0.5, "ci95": [0.25, 0.75]}

EXAMPLES = {
    "teacher record": outputs.TeacherRecord(
        stage="teacher", run_id="a" * 32, model="e.dog.teacher", version="1", base_model="tiny-sd",
        base_model_digest="b" * 64, revision=None, adapter_digest="c" * 64, references_digest="d" * 64, family="sd",
        final_loss=0.125),
    "synthesis record": outputs.SynthesisRecord(
        stage="synthesis", run_id="a" * 32, digest="d" * 64, prompts_digest="p" * 64, num_images=6, dropped=0,
        teacher_version="e.dog.teacher@1"),
    "codes record": outputs.CodesRecord(
        stage="codes", run_id="a" * 32, model="tiny-llamagen", backend="llamagen", proxy_digest="d" * 64, num_images=6,
        seq_len=16, sha256="s" * 64),
    "student record": outputs.StudentRecord(
        stage="student", run_id="a" * 32, model="e.dog.student", version="2", base_model="tiny-llamagen",
        backend="llamagen", recipe="direct-lora", weights="adapter/adapter_model.safetensors", adapter_digest="c" * 64,
        proxy_digest=None, teacher_version=None, final_loss=1.5, sampling=SAMPLING),
    "curation record": outputs.CurationRecord(
        stage="curation", run_id="a" * 32, digest="d" * 64, prompts_digest="p" * 64, num_images=2, raw_digest=None,
        raw_images=0, raw_source="none", teacher_version="e.glass.teacher@1", teacher_run_id="t" * 32),
    "style student record": outputs.StyleStudentRecord(
        stage="style_student", run_id="a" * 32, model="e.glass.student", version="1", base_model="tiny-lumina-mgpt",
        backend="lumina-mgpt", recipe="stylear", weights="model", adapter_digest="c" * 64, proxy_digest="d" * 64,
        raw_digest="r" * 64, teacher_version="e.glass.teacher@1", final_loss=2.0, sampling=SAMPLING,
        noise_strength=0.5, clip_model="tiny-clip"),
    "evaluate record": outputs.EvaluateRecord(
        stage="evaluate", run_id="a" * 32, teacher_version="e.dog.teacher@1", student_version="e.dog.student@2",
        random_init="True", toy_world="False", clip_model="tiny-clip", dino_model="tiny-dino", metrics=MEANS, gate=None,
        student_sampling=SAMPLING, encoder_paths={"clip": "/models/clip", "dino": "/models/dino"}),
    "style evaluate record": outputs.StyleEvaluateRecord(
        stage="style_evaluate", run_id="a" * 32, teacher_version="e.glass.teacher@1",
        student_version="e.glass.student@1", random_init="False", clip_model="tiny-clip", dino_model="tiny-dino",
        style="glass", dvc_stage="style_evaluate@e.glass", metrics=MEANS),
    "proxy manifest": outputs.ProxyManifest(
        prompt_template="a {token} {class}", templates=[], teacher_version="e.dog.teacher@1", num_images=1, generated=2,
        dropped=1, filter={"enabled": True, "metric": "dino", "model": "tiny-dino", "min_similarity": None,
                           "drop_fraction": 0.5},
        digest="d" * 64, prompts_digest="p" * 64,
        images=[{"file": "images/00000.png", "prompt": "a sks dog", "seed": 0, "sha256": "s" * 64, "similarity": 0.5}],
        dropped_images=[{"file": "images/00001.png", "seed": 1, "sha256": "t" * 64, "similarity": 0.25}]),
    "curated manifest": outputs.CuratedManifest(
        kind="style", style="glass", token="sks", teacher_prompt_template="{prompt}, in {token} style",
        teacher_version="e.glass.teacher@1", num_images=1, digest="d" * 64, prompts_digest="p" * 64,
        images=[{"file": "images/00000.png", "prompt": "a red boat", "teacher_prompt": "a red boat, in sks style",
                 "seed": 0, "sha256": "s" * 64}],
        raw={"source": "raw/", "ratio": 3.0, "num_images": 1, "digest": "r" * 64,
             "images": [{"file": "raw/00000.png", "prompt": "a cat", "sha256": "q" * 64, "source": "cat.png"}]}),
    "evaluation metrics": outputs.EvaluationMetrics(
        models={"teacher": {"clip_i": SUMMARY}, "student": {"clip_i": SUMMARY}}, random_init=True, toy_world=False,
        prompts=2, images_per_prompt=2, bootstrap={"resamples": 100, "seed": 0, "unit": "prompt"}),
    "style evaluation metrics": outputs.EvaluationMetrics(
        models={"student": {"style_clip": SUMMARY}}, random_init=False, prompts=1, images_per_prompt=1,
        bootstrap={"resamples": 20, "seed": 0, "unit": "prompt"}, kind="style"),
    "prompts": outputs.Prompts(["a sks dog", "a sks dog in the snow"]),
    "per prompt": outputs.PerPrompt({"student": [{"prompt": "a sks dog", "clip_i": 0.5, "prompt_acc": None}]}),
    "variance": outputs.Variance(
        feature="DINO CLS", samples=2, prompt="a sks dog", centroid="mean feature",
        models={"student": {"total_variance": 2.0, "distances": [0.5, 1.5]}}),
    "gate": outputs.Gate(rule="dino >= teacher", passed=False, details=["dino >= teacher: 0.1 < 0.2 FAIL"],
                         difference_ci95=[[-0.25, 0.0]], student_version="e.dog.student@2"),
    "subject encoders": outputs.SubjectEncoders(
        clip={"model": "tiny-clip", "random_init": True, "architecture": "CLIPModel", "embedding": "projected",
              "preprocessing": {"resize": {"shortest_edge": 32}}, "text_preprocessing": {"max_length": 77}},
        dino={"model": "tiny-dino", "random_init": True}, random_init=True, toy_world=False,
        oracle={"model": "toy-oracle", "digest": None, "subject": "stripy-box", "look": "a yellow box",
                "subject_acc": "1 when ...", "prompt_acc": "fraction ...", "subject_prompt_acc": "1 when ..."}),
    "style encoders": outputs.StyleEncoders(
        clip={"model": "tiny-clip", "path": "/models/clip", "random_init": False},
        dino={"model": "tiny-dino", "path": "/models/dino", "random_init": False}, style_encoder="tiny-clip",
        metrics={"style_clip": "cosine of CLIP image embeddings"}, random_init=False, content=None, noise_strength=0.5,
        sampling=SAMPLING,
        toy_style={"style": "pastel", "detector": "2nd percentile", "content": "a toy", "oracle": "/o", "oracle_digest": None}),
    "flat metrics": outputs.FlatMetrics(**MEANS, random_init=True, toy_world=False, gate_passed=True),
}


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_every_model_round_trips_through_write_and_read(name, tmp_path):
    example = EXAMPLES[name]
    path = tmp_path / "out.json"
    example.write(path)
    again = type(example).read(path)
    assert again == example
    assert json.loads(path.read_text()) == example.model_dump(mode="json", exclude_unset=True)
    again.write(tmp_path / "again.json")
    assert (tmp_path / "again.json").read_bytes() == path.read_bytes()


def test_write_gives_the_bytes_the_plain_dict_gave(tmp_path):
    """The stages wrote dicts with write_json_atomic; the models write the same bytes (fields never set
    stay out, None set on purpose stays in, ints stay ints, intervals stay lists)."""
    record = {"stage": "student", "run_id": "r", "model": "e.s.student", "version": "1", "base_model": "tiny-llamagen",
              "proxy_digest": None, "sampling": {"cfg_scale": 4.0, "top_k": 20, "temperature": 1.0}, "final_loss": 0.5}
    summary = {"models": {"teacher": {"dino": {"mean": 0.5, "ci95": [0.25, 0.75]}}}, "random_init": False,
               "toy_world": True, "prompts": 2, "images_per_prompt": 1,
               "bootstrap": {"resamples": 10, "seed": 0, "unit": "prompt"}}
    for model, data in ((outputs.StudentRecord, record), (outputs.EvaluationMetrics, summary)):
        write_json_atomic(tmp_path / "dict.json", data)
        model(**data).write(tmp_path / "model.json")
        assert (tmp_path / "model.json").read_bytes() == (tmp_path / "dict.json").read_bytes()


def test_writers_may_not_invent_keys_and_readers_skip_unknown_ones(tmp_path):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="adapter_digst"):
        outputs.TeacherRecord(stage="teacher", model="m", version="1", adapter_digst="x")
    path = tmp_path / layout.RECORD_FILE
    path.write_text(json.dumps({"stage": "teacher", "model": "m", "version": "1", "from_a_newer_version": 1}))
    assert outputs.read_record(tmp_path, outputs.TeacherRecord).registered == "m@1"


@pytest.mark.parametrize("content, field", [
    ({"stage": "teacher", "version": "1"}, "model"),  # missing field
    ({"stage": "teacher", "model": "m", "version": 1}, "version"),  # wrong type
    ({"stage": "student", "model": "m", "version": "1"}, "stage"),  # another stage's record
])
def test_a_malformed_record_is_one_line_naming_the_file_and_the_field(tmp_path, content, field):
    path = tmp_path / layout.RECORD_FILE
    path.write_text(json.dumps(content))
    with pytest.raises(ProxytuneError) as caught:
        outputs.read_record(tmp_path, outputs.TeacherRecord)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{path}: unexpected content ({field}")
    assert "re-run `proxytune apply`" in message


def test_nested_fields_are_named_by_their_path(tmp_path):
    path = tmp_path / layout.METRICS_FILE
    path.write_text(json.dumps({"models": {"student": {"dino": {"mean": "high", "ci95": [0, 1]}}}}))
    with pytest.raises(ProxytuneError, match=r"metrics.json: unexpected content \(models.student.dino.mean: "):
        outputs.EvaluationMetrics.read(path)
    path.write_text(json.dumps({"models": {}}))
    with pytest.raises(ProxytuneError, match=r"unexpected content \(models: "):
        outputs.EvaluationMetrics.read(path)


def test_not_json_and_missing_files(tmp_path):
    (tmp_path / layout.RECORD_FILE).write_text("{not json")
    with pytest.raises(ProxytuneError, match=r"record.json: not valid JSON \(.*\); re-run `proxytune apply`$"):
        outputs.read_record(tmp_path, outputs.SynthesisRecord)
    with pytest.raises(ProxytuneError, match=r"nowhere/record.json: missing upstream record \(run the upstream stage first\)"):
        outputs.read_record(tmp_path / "nowhere", outputs.TeacherRecord)
    assert outputs.Gate.read_optional(tmp_path / layout.GATE_FILE) is None
    (tmp_path / "bytes.json").write_bytes(b"\xff\xfe")
    with pytest.raises(ProxytuneError, match="bytes.json: not valid JSON"):
        outputs.Prompts.read(tmp_path / "bytes.json")


def test_hand_made_records_of_the_tests_still_read(tmp_path):
    """Fixtures write partial records; the models ask only for what every writer writes."""
    outputs.write_record(tmp_path, {"weights": "full/model.safetensors"})
    assert outputs.read_record(tmp_path, outputs.StudentRecord).weights == "full/model.safetensors"
    outputs.write_record(tmp_path, {"stage": "student", "model": "m", "version": "1"})
    assert outputs.read_record(tmp_path, outputs.StudentRecord).weights == outputs.ADAPTER_WEIGHTS
    outputs.write_record(tmp_path, {"digest": "d", "prompts_digest": "p", "num_images": 1, "teacher_version": "t@1",
                                    "run_id": "r"})
    assert outputs.read_record(tmp_path, outputs.SynthesisRecord).stage == "synthesis"


def test_codes_metadata_goes_through_safetensors(tmp_path):
    import torch

    from proxytune.files import safetensors_bytes

    meta = outputs.CodesMetadata(model="tiny-llamagen", backend="llamagen", proxy_digest="d" * 64, prompts=["a", "b"])
    path = tmp_path / layout.CODES_FILE
    path.write_bytes(safetensors_bytes({"codes": torch.zeros(1, 2)}, meta.to_safetensors()))
    assert outputs.CodesMetadata.read_safetensors(path) == meta
    path.write_bytes(safetensors_bytes({"codes": torch.zeros(1, 2)}, {"model": "x"}))
    with pytest.raises(ProxytuneError, match="codes.safetensors: unexpected metadata"):
        outputs.CodesMetadata.read_safetensors(path)


def test_load_evaluation_reads_a_subject_and_a_style_folder(tmp_path):
    subject, style = tmp_path / "dog", tmp_path / "glass"
    for folder, names in ((subject, ("evaluation metrics", "subject encoders", "evaluate record", "gate", "variance")),
                          (style, ("style evaluation metrics", "style encoders", "style evaluate record"))):
        files = {"evaluation metrics": layout.METRICS_FILE, "style evaluation metrics": layout.METRICS_FILE,
                 "subject encoders": layout.ENCODERS_FILE, "style encoders": layout.ENCODERS_FILE,
                 "evaluate record": layout.RECORD_FILE, "style evaluate record": layout.RECORD_FILE,
                 "gate": layout.GATE_FILE, "variance": layout.VARIANCE_FILE}
        for name in names:
            EXAMPLES[name].write(folder / files[name])
        EXAMPLES["prompts"].write(folder / layout.PROMPTS_FILE)
        EXAMPLES["per prompt"].write(folder / layout.PROMPT_SCORES_FILE)
    dog = outputs.load_evaluation(subject)
    assert not dog.is_style and isinstance(dog.encoders, outputs.SubjectEncoders)
    assert dog.gate == EXAMPLES["gate"] and dog.variance == EXAMPLES["variance"]
    assert dog.prompts == EXAMPLES["prompts"].root and dog.per_prompt["student"][0].scores == {"clip_i": 0.5, "prompt_acc": None}
    assert dog.record.student_version == "e.dog.student@2" and dog.metrics.means == {"teacher": {"clip_i": 0.5},
                                                                                      "student": {"clip_i": 0.5}}
    glass = outputs.load_evaluation(style)
    assert glass.is_style and isinstance(glass.encoders, outputs.StyleEncoders)
    assert glass.gate is None and glass.variance is None and isinstance(glass.record, outputs.StyleEvaluateRecord)
    (subject / layout.PROMPTS_FILE).unlink()
    with pytest.raises(ProxytuneError, match=r"prompts.json: missing from the evaluation output; re-run `proxytune apply`"):
        outputs.load_evaluation(subject)


# -- on real stage output --------------------------------------------------------------------------------
def check_stage_outputs(folder: Path, scratch: Path) -> None:
    """Every JSON file the stages wrote under one subject's or style's folder parses with the model its readers
    use, and writing it back (into `scratch`) with that model gives the same bytes (the models write what the
    stages wrote)."""
    style = (folder / layout.OUT_DIRS["curation"]).is_dir()
    steps = ("teacher", "curation", "style_student", "style_evaluate") if style else layout.STEPS
    files = {folder / layout.OUT_DIRS[step] / layout.RECORD_FILE: outputs.RECORDS[step] for step in steps}
    manifest = (outputs.CuratedManifest, layout.OUT_DIRS["curation"]) if style else (outputs.ProxyManifest, "proxy")
    files[folder / manifest[1] / layout.MANIFEST_FILE] = manifest[0]
    files[folder / layout.METRICS_FILE] = outputs.FlatMetrics
    files[folder / layout.PROXY_METRICS_FILE] = outputs.FidelityMetrics  # synthesis' (curation's) DVC metrics
    evaluation = folder / layout.OUT_DIRS["evaluate"]
    files.update({evaluation / layout.METRICS_FILE: outputs.EvaluationMetrics,
                  evaluation / layout.PROMPTS_FILE: outputs.Prompts,
                  evaluation / layout.PROMPT_SCORES_FILE: outputs.PerPrompt,
                  evaluation / layout.ENCODERS_FILE: outputs.StyleEncoders if style else outputs.SubjectEncoders,
                  evaluation / layout.VARIANCE_FILE: outputs.Variance, evaluation / layout.GATE_FILE: outputs.Gate})
    for path, model in files.items():
        if path.parent == evaluation and path.name in (layout.VARIANCE_FILE, layout.GATE_FILE) and not path.exists():
            continue  # written only when configured
        copy = scratch / "copy.json"
        model.read(path).write(copy)
        assert copy.read_bytes() == path.read_bytes(), path
    loaded = outputs.load_evaluation(evaluation)
    assert loaded.is_style == style and loaded.record is not None and loaded.encoders is not None
    if not style:
        codes = outputs.CodesMetadata.read_safetensors(folder / layout.OUT_DIRS["codes"] / layout.CODES_FILE)
        assert codes.proxy_digest == outputs.ProxyManifest.read(folder / "proxy" / layout.MANIFEST_FILE).digest
        records = outputs.load_subject_records(folder, folder / layout.OUT_DIRS["student"], evaluation)
        assert records.eval.teacher_version == records.teacher.registered
        assert records.student.proxy_digest == records.proxy.digest
