"""Spec validation: every bad input gives one line naming the file and key, exit code 2, nothing written."""

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from proxytune.cli import main
from proxytune.spec import ExperimentSpec, load_spec

GOOD = {
    "name": "t",
    "subjects": [{"name": "dog", "class": "dog", "images": "dreambench:dog"}],
    "teacher": {"model": "tiny-sd"},
}


def write(project: Path, data, name: str = "spec.yaml") -> Path:
    path = project / "specs" / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def with_(**overrides):
    data = json.loads(json.dumps(GOOD))
    for dotted, value in overrides.items():
        node = data
        keys = dotted.split("__")
        for key in keys[:-1]:
            node = node.setdefault(key, {}) if not key.isdigit() else node[int(key)]
        node[keys[-1] if not keys[-1].isdigit() else int(keys[-1])] = value
    return data


BAD_SPECS = [
    ("name: t\nsubjects: [\n", "malformed YAML"),
    ("- just\n- a list\n", "(top level): must be a mapping"),
    (with_(teacher__lora={"rank": 0}), "teacher.lora.rank: must be a positive integer"),
    (with_(teacher__lora={"rank": -3}), "teacher.lora.rank: must be a positive integer"),
    (with_(teacher__lora={"rnk": 4}), "teacher.lora.rnk: unknown key"),
    (with_(teachr={"steps": 3}), "teachr: unknown key"),
    (with_(teacher__steps="many"), "teacher.steps:"),
    (with_(student__cfg_dropout=1.5), "student.cfg_dropout:"),
    (with_(student__sampling={"cfg_scale": 0.5}), "student.sampling.cfg_scale:"),
    (with_(student__sampling={"top_k": 0}), "student.sampling.top_k:"),
    (with_(name="../evil"), "name: must be"),
    (with_(name="a/b"), "name: must be"),
    (with_(subjects__0__name="dog/.."), "subjects[0].name: must be"),
    (with_(student__model="gpt-17"), "student.model: unknown model 'gpt-17'"),
    (with_(teacher__model="sdxl"), "teacher.model: unknown model 'sdxl'"),
    (with_(synthesis__prompt="a photo of a {class}"), "synthesis.prompt: must contain '{token}'"),
    ({"name": "t", "subjects": [{"name": "dog", "images": "x"}]}, "subjects[0].class: required key is missing"),
    ({"name": "t", "subjects": []}, "subjects:"),
    (with_(subjects__0__images="no/such/folder"), "subjects[0].images: no such folder"),
    # values the stages could not use: a seed past 64 bits, non-finite floats, a resolution the VAE cannot divide
    (with_(seed=2**64), "seed: must be an integer from 0 to 4294967295"),
    (with_(synthesis__seed=2**32), "synthesis.seed: must be an integer from 0 to 4294967295"),
    (with_(teacher__learning_rate=float("inf")), "teacher.learning_rate: must be a finite number"),
    (with_(teacher__learning_rate=float("nan")), "teacher.learning_rate: must be a finite number"),
    (with_(student__betas=[float("nan"), 0.9]), "student.betas[0]: must be a finite number"),
    (with_(evaluation__gate=[{"metric": "dino", "margin": float("-inf")}]), "evaluation.gate[0].margin: must be a finite"),
    (with_(student__variants={"b": {"learning_rate": float("inf")}}), "student.variants.b.learning_rate: must be a finite"),
    (with_(teacher__resolution=60), "teacher.resolution: 60 is not a multiple of 8, which tiny-sd needs"),
    (with_(teacher__model="tiny-flux", teacher__resolution=100), "teacher.resolution: 100 is not a multiple of 8"),
    # memory options (issue 27)
    (with_(teacher__quantize="int4"), "teacher.quantize: Input should be 'none', 'int8', 'fp8' or 'nf4'"),
    (with_(teacher__quantize="int8", teacher__processes=2), "teacher.processes: with quantize: int8, must be 1"),
    (with_(evaluation__student_batch_size=0), "evaluation.student_batch_size: must be a positive integer"),
    (with_(memory="sometimes"), "memory: Input should be 'checkpointing', 'auto' or 'manual'"),
    # proxy fidelity (issue 29): curation and its gate read the scores
    (with_(synthesis__fidelity={"enabled": False, "keep": 2}),
     "synthesis.fidelity: keep and min_share need the scores: set enabled: true"),
]


@pytest.mark.parametrize("data,expected", BAD_SPECS, ids=[e for _, e in BAD_SPECS])
@pytest.mark.parametrize("command", ["validate", "compile", "apply"])
def test_bad_spec_one_line_exit_2_nothing_written(project, data, expected, command):
    path = write(project, data)
    result = CliRunner().invoke(main, [command, str(path)])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith(f"error: {path}: "), lines[0]
    assert expected in lines[0]
    assert "Traceback" not in result.output
    assert sorted(p.name for p in project.iterdir()) == ["specs"]  # no dvc.yaml, runs/, registry/, .dvc/


def test_missing_spec_file(project):
    result = CliRunner().invoke(main, ["validate", "specs/nope.yaml"])
    assert result.exit_code == 2
    assert "specs/nope.yaml: no such spec file" in result.output


def test_empty_and_corrupt_reference_images(project):
    empty = project / "refs-empty"
    empty.mkdir()
    path = write(project, with_(subjects__0__images="../refs-empty"))
    result = CliRunner().invoke(main, ["apply", str(path)])
    assert result.exit_code == 2 and "subjects[0].images" in result.output and "no reference images" in result.output

    corrupt = project / "refs-corrupt"
    corrupt.mkdir()
    (corrupt / "00.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    path = write(project, with_(subjects__0__images="../refs-corrupt"))
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 2
    assert "00.jpg: not a readable image" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_defaults_are_filled_and_typed(project):
    spec = load_spec(write(project, GOOD))
    assert isinstance(spec, ExperimentSpec)
    assert spec.subjects[0].token == "sks"  # survives LlamaGen's caption cleaning
    assert spec.synthesis.num_images == 1000  # the paper's proxy set size is the default
    assert spec.student.betas == (0.9, 0.95)
    assert spec.evaluation.images_per_prompt == 4
    # sampler settings left out mean "the student backend's own" (resolved when the backend is known)
    assert spec.student.sampling.model_dump() == {"cfg_scale": None, "top_k": None, "temperature": None}


def test_schema_command_prints_json_schema():
    result = CliRunner().invoke(main, ["schema"])
    assert result.exit_code == 0
    schema = json.loads(result.output)
    assert schema["additionalProperties"] is False
    assert "teacher" in schema["properties"] and schema["required"] == ["name"]
    assert "subjects" in schema["properties"] and "styles" in schema["properties"]  # at least one of them (a validator)


def test_shipped_specs_validate():  # validation reads no reference folder: no DreamBench copy needed
    for path in sorted((Path(__file__).parents[1] / "specs").glob("*.yaml")):
        load_spec(path)


def test_builtin_names_match_backends():
    """The spec's built-in names are the backends' tiny models plus the toy world's, as the backends resolve them."""
    from proxytune import builtins
    from proxytune.backends import encoders, students
    from proxytune.backends.teachers import diffusion
    from proxytune.spec import common

    assert set(common.TINY_TEACHERS) == set(builtins.builders("teacher")) == set(diffusion.TINY_TEACHERS) | {"toy-sd"}
    # students: the spec reads proxytune.builtins, which the families' records (and the toy world) fill
    assert set(builtins.model_names("student")) == {*students.tiny_names(), "toy-llamagen"}
    assert set(common.TINY_CLIP) == set(builtins.builders("clip")) == set(encoders.TINY_CLIP) | {"toy-clip"}
    assert set(common.TINY_DINO) == set(builtins.builders("dino")) == set(encoders.TINY_DINO) | {"toy-dino"}


def test_resolution_multiple_of_a_local_pipeline_is_read_from_its_configs(project, tmp_path_factory):
    """An SD3 folder with an x8 VAE and 2x2 patches needs a multiple of 16: refused before anything is written."""
    model = tmp_path_factory.mktemp("sd3-like")
    (model / "vae").mkdir()
    (model / "transformer").mkdir()
    (model / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    (model / "vae" / "config.json").write_text(json.dumps({"block_out_channels": [128, 256, 512, 512]}))
    (model / "transformer" / "config.json").write_text(json.dumps({"patch_size": 2}))
    path = write(project, with_(teacher__model=str(model), teacher__resolution=520))
    result = CliRunner().invoke(main, ["compile", str(path)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.strip() == (f"error: {path}: teacher.resolution: 520 is not a multiple of 16, which {model} "
                                     "needs (its VAE and denoiser downsample by it); use 512 or 528")
    assert sorted(p.name for p in project.iterdir()) == ["specs"]


def test_builtin_resolution_multiples_match_the_built_pipelines():
    from proxytune import builtins
    from proxytune.backends.teachers import diffusion, teacher_sizes

    for name in ("tiny-sd", "tiny-sdxl", "tiny-sd3", "tiny-flux"):
        folder = Path(diffusion.resolve(name))
        configs = [json.loads((folder / rel).read_text()) if (folder / rel).exists() else None
                   for rel in ("model_index.json", "vae/config.json", "transformer/config.json")]
        assert teacher_sizes.multiple_from_configs(*configs) == teacher_sizes.BUILTIN_MULTIPLES[name], name
    assert set(teacher_sizes.BUILTIN_MULTIPLES) == set(builtins.model_names("teacher"))


def png_declaring(width: int, height: int) -> bytes:
    """A valid PNG header declaring width x height 8-bit greyscale pixels, with one tiny compressed row."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 4096)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("command", ["validate", "apply"])
def test_image_bomb_is_refused_before_decoding(project, command):
    """A few-kilobyte PNG declaring 60000 x 60000 pixels: one line naming the file and key, exit 2."""
    refs = project / "refs-bomb"
    refs.mkdir()
    (refs / "00.png").write_bytes(png_declaring(60000, 60000))
    path = write(project, with_(subjects__0__images="../refs-bomb"))
    result = CliRunner().invoke(main, [command, str(path)])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: subjects[0].images: "), lines
    assert "00.png: image declares 3600 Mpx, more than 89 Mpx: refused before decoding" in lines[0]
    assert sorted(p.name for p in project.iterdir()) == ["refs-bomb", "specs"]
