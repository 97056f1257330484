"""Model pre-flight (issue 12): `apply` resolves every model a spec names before it writes anything. A folder
without the files its loader needs, or a hub id neither cached nor reachable, is one line naming the spec
file and key, exit 2, and dvc.yaml, params, .dvc/, registry/ and the project lock stay as they were."""

import json
import socket
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from conftest import tiny_spec
from proxytune import preflight
from proxytune.cli import main


def write_spec(project: Path, **sections) -> Path:
    path = project / "specs" / "t.yaml"
    path.write_text(yaml.safe_dump(tiny_spec(**sections)))
    return path


def snapshot(project: Path) -> dict[str, bytes | None]:
    """Every file and folder of the project (folders as None)."""
    return {str(p.relative_to(project)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(project.rglob("*")) if not p.is_symlink()}


def refused(project: Path, path: Path, key: str, *words: str) -> str:
    before = snapshot(project)
    result = CliRunner().invoke(main, ["apply", str(path)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith(f"error: {path}: {key}: "), lines[0]
    for word in words:
        assert word in lines[0], lines[0]
    assert snapshot(project) == before  # nothing created, nothing modified
    for name in ("dvc.yaml", "runs", ".dvc", "registry", ".proxytune"):
        assert not (project / name).exists() or name in {p.split("/")[0] for p in before}
    return lines[0]


def cache_repo(cache: Path, repo: str, files: dict[str, str]) -> None:
    """Lay out `repo` in a Hugging Face cache as a download would (refs/main -> snapshots/COMMIT)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    for name, text in files.items():
        target = folder / "snapshots" / commit / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)


def fake_weights_folder(folder: Path, config: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config or {}))
    (folder / "model.safetensors").write_bytes(b"\0" * 8)
    return folder


def fake_pipeline(folder: Path) -> Path:
    """The files of an SD pipeline folder (no real weights: the pre-flight reads no weights)."""
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.30.0",
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "scheduler": ["diffusers", "DDPMScheduler"], "safety_checker": [None, None]}
    folder.mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps(index))
    for name in ("unet", "text_encoder"):
        fake_weights_folder(folder / name)
    fake_weights_folder(folder / "vae", {"block_out_channels": [32, 64, 64, 64]})
    (folder / "tokenizer").mkdir()
    (folder / "tokenizer" / "tokenizer_config.json").write_text("{}")
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text("{}")
    return folder


# -- refused before anything is written ---------------------------------------------------------------
def test_teacher_folder_without_a_pipeline(project):
    (project / "models" / "sd").mkdir(parents=True)
    (project / "models" / "sd" / "unet.safetensors").write_bytes(b"\0" * 8)  # weights, but no pipeline
    path = write_spec(project, teacher={"model": "./models/sd"})
    refused(project, path, "teacher.model", "models/sd has no model_index.json", "not a diffusers pipeline folder")


def test_teacher_pipeline_missing_a_component(project):
    folder = fake_pipeline(project / "models" / "sd")
    for file in (folder / "unet").iterdir():
        file.unlink()
    path = write_spec(project, teacher={"model": "./models/sd"})
    refused(project, path, "teacher.model", "model_index.json lists unet (UNet2DConditionModel) but unet/ is missing")


def test_student_folder_without_a_model(project):
    (project / "models" / "student").mkdir(parents=True)
    (project / "models" / "student" / "README.md").write_text("weights to follow\n")
    path = write_spec(project, student={"model": "./models/student"})
    refused(project, path, "student.model", "has neither proxytune_student.json nor config.json",
            "not a student model folder")


def test_student_llamagen_layout_missing_its_vq(project):
    folder = project / "models" / "student"
    fake_weights_folder(folder / "transformer")
    fake_weights_folder(folder / "text_encoder")
    (folder / "tokenizer").mkdir()
    (folder / "tokenizer" / "tokenizer_config.json").write_text("{}")
    (folder / "proxytune_student.json").write_text(json.dumps({"backend": "llamagen", "image_size": 64}))
    path = write_spec(project, student={"model": "./models/student"})
    refused(project, path, "student.model", "vqvae: no such folder (student vqvae)")


def test_missing_model_folder(project):
    path = write_spec(project, evaluation={"dino_model": "./models/nowhere"})
    refused(project, path, "evaluation.dino_model", "models/nowhere: no such folder")


def test_hub_id_not_cached_while_offline(project, offline_hub):
    path = write_spec(project, teacher={"model": "someone/not-downloaded"})
    refused(project, path, "teacher.model", "hub id 'someone/not-downloaded'", "not in the local Hugging Face cache",
            "HF_HUB_OFFLINE is set")


def test_hub_id_when_the_hub_cannot_be_reached(project, tmp_path, monkeypatch):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens once closed
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # huggingface_hub.constants may hold an earlier test's value
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    path = write_spec(project, evaluation={"clip_model": "openai/clip-vit-base-patch32"})
    refused(project, path, "evaluation.clip_model", "'openai/clip-vit-base-patch32'",
            f"http://127.0.0.1:{port} cannot be reached")


def test_default_encoders_are_checked_too(project, offline_hub):
    """A spec that leaves evaluation's models unset gets the real hub encoders: not cached, refused."""
    spec = tiny_spec()
    del spec["evaluation"]["clip_model"], spec["evaluation"]["dino_model"]
    path = project / "specs" / "t.yaml"
    path.write_text(yaml.safe_dump(spec))
    refused(project, path, "evaluation.clip_model", "'openai/clip-vit-base-patch32'")


def test_a_role_mismatch_in_the_quality_filter(project):
    path = write_spec(project, synthesis={"filter": {"enabled": True, "metric": "clip", "drop_fraction": 0.1}})
    refused(project, path, "synthesis.filter.model", "unknown clip model 'tiny-dino' ('tiny-dino' is a dino model)")


def test_an_existing_project_is_left_unmodified(project):
    """A refusal after an earlier compile: dvc.yaml and the params files keep their bytes."""
    path = write_spec(project)
    assert CliRunner().invoke(main, ["compile", str(path)]).exit_code == 0
    assert (project / "dvc.yaml").exists()
    path = write_spec(project, teacher={"model": "./models/missing-sd"}, synthesis={"num_images": 7})
    refused(project, path, "teacher.model", "no such folder")


# -- accepted ---------------------------------------------------------------------------------------------
def test_cached_hub_ids_and_complete_folders_pass(project, offline_hub):
    cache_repo(offline_hub, "org/cached-clip", {"config.json": "{}"})
    cache_repo(offline_hub, "org/cached-sd", {"model_index.json": json.dumps({"_class_name": "StableDiffusionPipeline"})})
    fake_pipeline(project / "models" / "sd")
    path = write_spec(project, teacher={"model": "./models/sd"},
                      evaluation={"clip_model": "org/cached-clip"})
    result = CliRunner().invoke(main, ["apply", str(path), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "stages to run: " in result.output
    preflight.check_model("org/cached-sd", "teacher", project)


@pytest.mark.parametrize("name,role", [("tiny-sd", "teacher"), ("tiny-llamagen", "student"), ("tiny-janus", "student"),
                                       ("tiny-lumina-mgpt", "student"), ("tiny-clip", "clip"), ("tiny-dino", "dino")])
def test_the_built_in_models_folders_pass_as_local_folders(tmp_path, name, role):
    """The checks are not stricter than the loaders: every built-in model's materialised folder passes."""
    from proxytune import builtins
    from proxytune.backends import encoders
    from proxytune.backends.teachers import diffusion

    builders = {"teacher": diffusion.TINY_TEACHERS, "student": builtins.builders("student"), "clip": encoders.TINY_CLIP,
                "dino": encoders.TINY_DINO}
    folder = Path(builders[role][name]())
    preflight.check_model(str(folder), role, tmp_path)
