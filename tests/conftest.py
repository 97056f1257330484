import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# read once, before any fixture points the variable at the `photos` stand-in
DREAMBENCH_ENV = os.environ.get("PROXYTUNE_DREAMBENCH")


def dreambench_dir() -> Path:
    """The DreamBench copy tests that need DreamBench itself use: $PROXYTUNE_DREAMBENCH, else ./data/dreambench
    (what `proxytune data dreambench` writes)."""
    return Path(DREAMBENCH_ENV) if DREAMBENCH_ENV else REPO / "data" / "dreambench"


@pytest.fixture(scope="session")
def dreambench() -> Path:
    """DreamBench itself (its prompts, folder layout, licence files): skipped when no copy is found, except
    under CI, where a missing copy fails (.ci/run points PROXYTUNE_DREAMBENCH at ../shared/dreambench)."""
    root = dreambench_dir()
    require_input((root / "dog").is_dir(),
                  f"DreamBench copy not found at {root}: run `proxytune data dreambench` or set PROXYTUNE_DREAMBENCH")
    return root


def require_input(present: bool, reason: str) -> None:
    """Skip a test whose input from outside the repository (DreamBench, the releases' config files) is not on
    this machine; under CI, where .ci/run provides them from ../shared, fail instead."""
    if present:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set: .ci/run provides it from ../shared)")
    pytest.skip(reason)


# Photo subjects test specs name as `images: dreambench:NAME`, and the toy subject whose rendered references
# stand in for each.
STAND_INS = {"dog": "stripy-box", "cat": "dotty-ball"}


@pytest.fixture(scope="session")
def photos(tmp_path_factory, tiny_model_cache) -> Path:
    """A stand-in for DreamBench with its layout (NAME/NN.jpg, 5 photos each) for tests that only need a photo:
    the toy world's rendered references, upscaled to 256 px, so the suite runs without a DreamBench copy.

    Tests point PROXYTUNE_DREAMBENCH here (the `project` fixture does), so `images: dreambench:dog` resolves.
    """
    from PIL import Image

    from proxytune.toyworld.subjects import reference_folder

    root = tmp_path_factory.mktemp("photos")
    for name, toy in STAND_INS.items():
        (root / name).mkdir()
        for k, path in enumerate(sorted(reference_folder(toy).iterdir())):
            image = Image.open(path).convert("RGB").resize((256, 256), Image.BICUBIC)
            image.save(root / name / f"{k:02d}.jpg", quality=95)
    return root


@pytest.fixture(scope="session", autouse=True)
def tiny_model_cache(tmp_path_factory):
    """One tiny-model cache for the session (PROXYTUNE_HOME), unless the caller set one."""
    if "PROXYTUNE_HOME" not in os.environ:
        os.environ["PROXYTUNE_HOME"] = str(tmp_path_factory.mktemp("proxytune-home"))
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    yield


@pytest.fixture
def project(tmp_path, photos, monkeypatch):
    """A fresh project folder (no git) with DreamBench pointed at the stand-in `photos`; cwd is inside it."""
    monkeypatch.setenv("PROXYTUNE_DREAMBENCH", str(photos))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "specs").mkdir()
    return tmp_path


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty Hugging Face cache, in offline mode."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def copy_images(src: Path, dst: Path, count: int | None = None) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for path in sorted(src.iterdir())[:count]:
        shutil.copy(path, dst / path.name)
    return dst


def make_params(project: Path, spec: dict, subject: str | None = None):
    """Write `spec` into the project, compile it, and return the StageParams of one subject."""
    import yaml

    from proxytune.project import resolve_spec, write_compiled
    from proxytune.stages.params import load_params

    path = project / "specs" / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec))
    write_compiled([resolve_spec(path, project)], project)
    subject = subject or spec["subjects"][0]["name"]
    return load_params(project / "runs" / spec["name"] / subject / "params.yaml")


def tiny_spec(name: str = "t", **sections) -> dict:
    """A spec sized for tests: tiny models, few steps, few images."""
    spec = {
        "name": name,
        "seed": 0,
        "subjects": [{"name": "dog", "class": "dog", "images": "dreambench:dog"}],
        "teacher": {"model": "tiny-sd", "resolution": 64, "steps": 20, "batch_size": 2, "learning_rate": 1e-3,
                    "checkpoint_every": 10},
        "synthesis": {"num_images": 6, "num_inference_steps": 4, "batch_size": 4},
        "student": {"model": "tiny-llamagen", "steps": 20, "batch_size": 4, "learning_rate": 1e-3,
                    "checkpoint_every": 10, "sampling": {"cfg_scale": 2.0, "top_k": 50}},
        "evaluation": {"num_prompts": 2, "images_per_prompt": 2, "clip_model": "tiny-clip",
                       "dino_model": "tiny-dino", "grid_prompts": 2, "variance_samples": 4,
                       "bootstrap_resamples": 200, "gate": [{"metric": "dino", "vs": "teacher"}]},
    }
    for key, value in sections.items():
        spec[key] = {**spec.get(key, {}), **value} if isinstance(value, dict) else value
    return spec


def add_lora(bundle, rank: int = 16) -> list:
    """Wrap a student bundle's model in a peft LoRA on its own targets; returns the trainable params."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    bundle.model = get_peft_model(bundle.model, LoraConfig(r=rank, lora_alpha=rank, target_modules=bundle.lora_target_modules()))
    return [p for p in bundle.model.parameters() if p.requires_grad]


def record_step_gradients(recipe) -> list[list]:
    """The gradient of every trainable tensor as each update computes it (before clipping), one list a step."""
    steps, clip = [], recipe.accelerator.clip_grad_norm_

    def spy(parameters, *args, **kwargs):
        parameters = list(parameters)
        steps.append([p.grad.detach().clone() for p in parameters])
        return clip(parameters, *args, **kwargs)

    recipe.accelerator.clip_grad_norm_ = spy
    return steps
