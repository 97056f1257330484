"""A student backend is one record: a fake family registered here (and nowhere else) is detected, loaded,
accepted by the spec, checked by the pre-flight and offered by `proxytune convert`; and each family's sampler
defaults have one source, its record."""

import inspect
import json
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner
from pydantic import TypeAdapter, ValidationError

from proxytune import builtins, preflight
from proxytune.backends import students
from proxytune.backends.students import SamplerDefaults, StudentFamily, TinyStudent
from proxytune.backends.students.api import StudentBackend, sampling_settings
from proxytune.errors import ProxytuneError
from proxytune.model_configs import ModelProblem

FIX = "a fake release: convert it once with `proxytune convert fakear {src} OUT`"


class FakeStudent:
    """The least a StudentBackend offers: a 2 x 2 grid of 4 codes, one linear layer as the model."""

    backend = "fakear"
    image_size = 8
    random_init = True

    def __init__(self, path: str):
        self.path = path
        self.model = torch.nn.Linear(4, 4)

    @property
    def seq_len(self) -> int:
        return 4

    @property
    def codebook_size(self) -> int:
        return 4

    def lora_target_modules(self, groups=None):
        return ["model"]

    def num_layers(self) -> int:
        return 1

    def images_to_pixels(self, images):
        return torch.zeros(len(images), 3, 8, 8)

    def encode_images(self, pixels):
        return torch.zeros(len(pixels), 4, dtype=torch.long)

    def tokenizers_to(self, device):
        pass

    def decode_codes(self, codes):
        return [None] * len(codes)

    def encode_prompts(self, prompts):
        return torch.zeros(len(prompts), 4)

    def image_logits(self, cond, codes, drop_cond):
        return self.model(cond)[:, None].expand(-1, codes.shape[1], -1)

    def generate(self, prompts, seeds, *, cfg_scale=2.0, top_k=3, temperature=0.5, use_cache=True):
        return torch.zeros(len(prompts), 4, dtype=torch.long)


def _write_checkpoint(folder: Path, model_type: str = "fake_ar", weights: bool = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
    if weights:
        (folder / "model.safetensors").write_bytes(b"")


@click.command(name="fakear")
@click.argument("release")
@click.option("--shards", type=int, default=1, help="How many shards the fake release has.")
def _convert_fakear(release: str, shards: int) -> None:
    """A fake release -> a fake student folder."""


FAKE = StudentFamily(
    name="fakear", label="FakeAR",
    load=lambda path, *, ref, device="cpu": FakeStudent(path),
    sampling=SamplerDefaults(cfg_scale=2.0, top_k=3, temperature=0.5, source="this test"),
    model_types=("fake_ar",), refused={"fake_original": FIX}, convert=lambda: _convert_fakear,
    tiny={"tiny-fakear": TinyStudent("tiny-fakear-test-v1", _write_checkpoint)},
    check_folder=lambda folder, meta, config, checks: checks.weights(folder, "FakeAR checkpoint"),
)


@pytest.fixture
def fake_family(monkeypatch, tmp_path):
    """FAKE registered for one test; both tables are put back afterwards."""
    monkeypatch.setenv("PROXYTUNE_HOME", str(tmp_path / "home"))
    builtins.model_names("student")  # fill the tables first, so that the copies below hold everything
    monkeypatch.setattr(students, "_FAMILIES", dict(students.families()))
    monkeypatch.setattr(builtins, "_MODELS", dict(builtins._MODELS))
    students.register(FAKE)
    return FAKE


def test_a_fake_family_is_detected_and_loaded(fake_family, tmp_path):
    _write_checkpoint(tmp_path / "ckpt")
    assert students.detect(str(tmp_path / "ckpt"), "ref") == "fakear"
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta" / "proxytune_student.json").write_text(json.dumps({"backend": "fakear"}))
    assert students.detect(str(tmp_path / "meta"), "ref") == "fakear"
    _write_checkpoint(tmp_path / "release", "fake_original")
    with pytest.raises(ProxytuneError) as err:
        students.detect(str(tmp_path / "release"), "org/release")
    assert str(err.value) == f"student model 'org/release': config.json: {FIX.format(src='org/release')}"

    student = students.load_student("tiny-fakear")  # made once into the model cache, then loaded by the record
    assert isinstance(student, StudentBackend) and student.backend == "fakear"
    assert Path(student.path).name == "tiny-fakear-test-v1" and (Path(student.path) / "config.json").is_file()
    assert students.load_student(str(tmp_path / "ckpt")).path == str((tmp_path / "ckpt").resolve())


def test_the_spec_and_the_preflight_accept_the_fake_family(fake_family, tmp_path):
    from proxytune.spec.student import StudentModel

    model = TypeAdapter(StudentModel)
    assert model.validate_python("tiny-fakear") == "tiny-fakear"
    with pytest.raises(ValidationError, match="tiny-fakear"):  # the error lists it among the built-ins
        model.validate_python("tiny-nonesuch")

    preflight.check_model("tiny-fakear", "student", tmp_path)
    _write_checkpoint(tmp_path / "good")
    preflight.check_model(str(tmp_path / "good"), "student", tmp_path)
    _write_checkpoint(tmp_path / "no-weights", weights=False)
    with pytest.raises(ModelProblem, match="no weights .*not a FakeAR checkpoint folder"):  # the record's check
        preflight.check_model(str(tmp_path / "no-weights"), "student", tmp_path)
    _write_checkpoint(tmp_path / "release", "fake_original")
    with pytest.raises(ModelProblem, match="convert it once with `proxytune convert fakear"):
        preflight.check_model(str(tmp_path / "release"), "student", tmp_path)


def test_convert_offers_the_fake_family(fake_family):
    from proxytune.cli import main

    listing = CliRunner().invoke(main, ["convert", "--help"])
    assert listing.exit_code == 0 and "fakear" in listing.output and "A fake release -> a fake" in listing.output
    own = CliRunner().invoke(main, ["convert", "fakear", "--help"])
    assert own.exit_code == 0 and "--shards" in own.output


def test_sampler_defaults_have_one_source(fake_family):
    """The record's SamplerDefaults are what sampling_settings, each generate signature and the spec's
    descriptions say."""
    from proxytune.backends.students.janus.backend import JanusStudent
    from proxytune.backends.students.llamagen.backend import ARStudentBundle
    from proxytune.backends.students.lumina.backend import LuminaStudent
    from proxytune.spec.student import SamplingSpec

    classes = {"llamagen": ARStudentBundle, "janus": JanusStudent, "lumina-mgpt": LuminaStudent, "fakear": FakeStudent}
    descriptions = " ".join(field.description for field in SamplingSpec.model_fields.values())
    for name, record in students.families().items():
        defaults = record.sampling.settings()
        assert sampling_settings(name, SamplingSpec()) == defaults
        signature = inspect.signature(classes[name].generate).parameters
        assert {key: signature[key].default for key in defaults} == defaults, name
        if name != "fakear":  # the descriptions were written when the spec was imported, before this test
            for key, value in defaults.items():
                assert f"{record.label} {'none' if value is None else value}" in descriptions, (name, key)
    assert sampling_settings("fakear", SamplingSpec(top_k=7))["top_k"] == 7
