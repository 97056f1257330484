"""The diffusion teachers as released (SD 1.5, SDXL base, SD3 medium, FLUX.1-dev), on tiny folders laid out
as the releases are (tests/releases/diffusion.py) and on the releases' full-size configs on the meta device:
the folder loads with every weight from its files, the teacher takes a training step in the release's
dtype, the tuned teacher synthesises images in that dtype, and a broken folder is one clear error."""

import json
import re
import shutil

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from safetensors import safe_open

from conftest import copy_images, make_params, require_input, tiny_spec
from proxytune import preflight
from proxytune.backends.teachers import diffusion, teacher_sizes
from proxytune.errors import ProxytuneError
from releases import diffusion as releases

NAMES = list(releases.RELEASES)
# How a user with the release would set the spec: the dtype the release ships (SD 1.5 / SDXL main files
# are float32; SD3 medium float16; FLUX.1-dev bfloat16).
PRECISION = {"sd15": ("no", "float32"), "sdxl": ("no", "float32"), "sd3": ("fp16", "float16"),
             "flux-dev": ("bf16", "bfloat16")}
MULTIPLE = {"sd15": 8, "sdxl": 8, "sd3": 16, "flux-dev": 16}


@pytest.fixture(scope="session")
def release_folders(tmp_path_factory):
    configs = releases.real_configs()
    require_input(configs.is_dir(), f"the releases' config files are not at {configs}: set PROXYTUNE_REAL_CONFIGS "
                                    "(a copy of shared/real-configs)")
    root = tmp_path_factory.mktemp("teacher-releases")
    return {name: releases.build(name, root / name) for name in NAMES}


def _pattern(key: str) -> str:
    return re.sub(r"\.\d+\.", ".N.", key)


def _file_keys(folder) -> dict[str, torch.dtype]:
    """Every tensor of a component's main (non-variant) weight files: key -> dtype."""
    index = list(folder.glob("*.safetensors.index.json"))
    files = sorted(set(json.loads(index[0].read_text())["weight_map"].values())) if index else \
        [p.name for p in folder.glob("*.safetensors") if p.name.count(".") == 1]
    out = {}
    for file in files:
        with safe_open(str(folder / file), "pt") as f:
            for key in f.keys():
                out[key] = f.get_slice(key).get_dtype()
    return out


@pytest.mark.parametrize("name", NAMES)
def test_folder_is_laid_out_as_released_and_loads_every_weight(release_folders, name):
    folder, release = release_folders[name], releases.RELEASES[name]
    real = releases.real_configs() / release.configs
    assert (folder / "model_index.json").read_bytes() == (real / "model_index.json").read_bytes()
    dtype_names = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
    for component, weights in release.weights.items():
        written = json.loads((folder / component / "config.json").read_text())
        full = releases.full_config(name, component)
        shrunk = set(releases.SHRINK[name][component]) | {"vocab_size"}
        assert {k: v for k, v in written.items() if k not in shrunk} == {k: v for k, v in full.items() if k not in shrunk}
        floats = {d for d in _file_keys(folder / component).values() if d in dtype_names.values()}
        assert floats == {dtype_names[weights.dtype]}, component
        shards = list((folder / component).glob("*-of-*.safetensors"))
        assert len([p for p in shards if p.name.count(".") == 1]) == (weights.shards if weights.shards > 1 else 0)
    # the pipeline holds exactly the files' values: no key missing and silently re-initialised
    pipe = diffusion.load_pipeline(str(folder))
    assert diffusion.detect_family(str(folder)).name == {"sd15": "sd", "sdxl": "sdxl", "sd3": "sd3", "flux-dev": "flux"}[name]
    torch.manual_seed(0)  # as `build` drew the weights
    for component, weights in release.weights.items():
        expected = releases.instantiate(name, component, releases.tiny_config(name, component)).state_dict()
        loaded = getattr(pipe, component).state_dict()
        assert set(expected) == set(loaded), component
        for key, value in expected.items():
            assert torch.equal(value.to(weights.dtype).float(), loaded[key].float()), (component, key)
    # the latent scale the teacher step and sampling use (SD 1.5's config omits it: diffusers' default)
    assert pipe.vae.config.scaling_factor == {"sd15": 0.18215, "sdxl": 0.13025, "sd3": 1.5305, "flux-dev": 0.3611}[name]
    # pre-flight reads the same folder without loading it: it passes, and knows the resolution multiple
    preflight.check_model(str(folder), "teacher", folder.parent)
    assert teacher_sizes.resolution_multiple(str(folder), folder) == MULTIPLE[name]


# Parameter counts from docs: research notes (SDXL UNet 2.57B, CLIP-L 123M, OpenCLIP-bigG 695M, VAE 84M,
# FLUX.1-dev transformer 11.9B, T5-XXL encoder 4.76B); the SD 1.5 model card (UNet 860M); SD3 medium's
# model card (2B MMDiT).
FULL_COUNTS = {
    "sd15": {"unet": 860e6, "vae": 84e6, "text_encoder": 123e6},
    "sdxl": {"unet": 2.57e9, "vae": 84e6, "text_encoder": 123e6, "text_encoder_2": 695e6},
    "sd3": {"transformer": 2.0e9, "vae": 84e6, "text_encoder": 124e6, "text_encoder_2": 695e6, "text_encoder_3": 4.76e9},
    "flux-dev": {"transformer": 11.9e9, "vae": 84e6, "text_encoder": 123e6, "text_encoder_2": 4.76e9},
}


def _check_shape_rules(name: str, configs: dict[str, dict]) -> None:
    """What `diffusion.predict` / `encode_prompts` and the pipelines rely on, for tiny and full configs alike."""
    te = configs.get("text_encoder", {})
    te2 = configs.get("text_encoder_2", {})
    vae = configs["vae"]
    if name == "sd15":
        assert configs["unet"]["cross_attention_dim"] == te["hidden_size"]
        assert configs["unet"]["in_channels"] == vae["latent_channels"]
    elif name == "sdxl":
        unet = configs["unet"]
        assert unet["cross_attention_dim"] == te["hidden_size"] + te2["hidden_size"]
        # pooled bigG projection + 6 size/crop numbers (original size, crop corner, target size)
        assert unet["projection_class_embeddings_input_dim"] == te2["projection_dim"] + 6 * unet["addition_time_embed_dim"]
    elif name == "sd3":
        dit, t5 = configs["transformer"], configs["text_encoder_3"]
        assert dit["pooled_projection_dim"] == te["projection_dim"] + te2["projection_dim"]
        assert dit["joint_attention_dim"] == t5["d_model"] >= te["hidden_size"] + te2["hidden_size"]
        assert dit["in_channels"] == vae["latent_channels"]
    else:
        dit, t5 = configs["transformer"], configs["text_encoder_2"]
        assert dit["pooled_projection_dim"] == te["hidden_size"] and dit["joint_attention_dim"] == t5["d_model"]
        assert dit["in_channels"] == 4 * vae["latent_channels"]  # 2x2 packed latents
        assert dit["guidance_embeds"] is True  # FLUX.1-dev is guidance-distilled: predict feeds a guidance value
    assert len(vae["block_out_channels"]) == 4  # x8 VAE


@pytest.mark.parametrize("name", NAMES)
def test_full_size_release_on_meta_device(release_folders, name):
    release = releases.RELEASES[name]
    full = {c: releases.full_config(name, c) for c in release.weights}
    _check_shape_rules(name, full)
    _check_shape_rules(name, {c: releases.tiny_config(name, c) for c in release.weights})
    index = releases.model_index(name)
    family = diffusion.FAMILIES[index["_class_name"]]
    assert set(family.text_encoders) | {family.denoiser, "vae"} <= set(release.weights)
    assert teacher_sizes.multiple_from_configs(index, full["vae"], full.get("transformer")) == MULTIPLE[name]
    vae = full["vae"]
    scaling = {"sd15": None, "sdxl": 0.13025, "sd3": 1.5305, "flux-dev": 0.3611}[name]
    shift = {"sd15": None, "sdxl": None, "sd3": 0.0609, "flux-dev": 0.1159}[name]
    assert vae.get("scaling_factor") == scaling and vae.get("shift_factor") == shift
    tiny_folder = release_folders[name]
    for component in release.weights:
        with torch.device("meta"):
            model = releases.instantiate(name, component, full[component])
        count = sum(p.numel() for p in model.parameters())
        if component in FULL_COUNTS[name]:
            assert count == pytest.approx(FULL_COUNTS[name][component], rel=0.02), (component, count)
        # the tiny folder's key names are the full release's, layer indices aside
        full_keys = {_pattern(k) for k in releases.state_dict_as_released(model, torch.float32, release.position_ids)}
        tiny_keys = {_pattern(k) for k in _file_keys(tiny_folder / component)}
        tied = {"encoder.embed_tokens.weight"} if full[component].get("model_type") == "t5" else set()
        assert full_keys - tied == tiny_keys, (component, sorted(full_keys ^ tiny_keys)[:5])
        if component == family.denoiser:  # the default LoRA targets resolve in the released denoiser
            names = [n for n, _ in model.named_modules()]
            for target in family.default_targets:
                assert any(n == target or n.endswith("." + target) for n in names), target


@pytest.mark.parametrize("name", NAMES)
def test_training_step_and_synthesis_in_the_release_dtype(project, photos, release_folders, name):
    from proxytune.stages import synthesis
    from proxytune.stages.teacher import TeacherTrainer

    precision, dtype_name = PRECISION[name]
    copy_images(photos / "dog", project / "one", count=1)
    spec = tiny_spec(teacher={"model": str(release_folders[name]), "resolution": 64, "steps": 1, "batch_size": 1,
                              "mixed_precision": precision, "learning_rate": 1e-2},
                     synthesis={"num_images": 1, "num_inference_steps": 1, "batch_size": 1, "dtype": dtype_name})
    spec["subjects"][0]["images"] = "../one"
    params = make_params(project, spec)
    recipe = TeacherTrainer(params)
    recipe.setup()
    dtype = getattr(torch, dtype_name)
    assert recipe.denoiser.dtype == dtype  # loaded in the release's dtype
    assert all(p.dtype == torch.float32 for p in recipe.trainable)  # the LoRA trains in fp32
    before = [p.detach().clone() for p in recipe.trainable]
    values = recipe.train_step()
    assert np.isfinite(values["loss"]) and values["loss"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, recipe.trainable))
    diffusion.save_lora(recipe.pipe, params.out("teacher") / "adapter")

    scratch = project / "scratch"
    scratch.mkdir()
    seen = []
    real = diffusion.generate
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(diffusion, "generate", lambda pipe, *a, **k: seen.append(pipe.dtype) or real(pipe, *a, **k))
        synthesis.generate_missing(params, params.out("teacher"), scratch)
    assert seen == [dtype]
    from PIL import Image

    image = np.asarray(Image.open(scratch / "00000.png"), dtype=np.float32)
    assert image.shape == (64, 64, 3) and image.std() > 0  # decoded, not a NaN-black or constant frame


def test_auto_generation_dtype_is_float32_on_cpu_and_bfloat16_on_a_bf16_gpu(monkeypatch):
    from proxytune.stages import runtime

    assert runtime.generation_dtype("auto") == torch.float32  # CPU: the suite's numbers stay
    assert runtime.generation_dtype("float16") == torch.float16
    monkeypatch.setattr(runtime, "device", lambda: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert runtime.generation_dtype("auto") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert runtime.generation_dtype("auto") == torch.float32


def test_a_bad_synthesis_dtype_is_a_clear_error():
    from proxytune.spec.synthesis import SynthesisSpec

    with pytest.raises(ValidationError, match="dtype") as err:
        SynthesisSpec(dtype="float64")
    assert "'auto', 'float32', 'bfloat16' or 'float16'" in str(err.value)


def _break(folder, how: str) -> str:
    """Damage a copy of a release folder; returns the component the error must name."""
    from safetensors.torch import load_file, save_file

    if how == "truncated shard":
        (folder / "transformer/diffusion_pytorch_model-00002-of-00003.safetensors").write_bytes(b"\0" * 10)
        return "transformer"
    if how == "missing file":
        (folder / "text_encoder/model.safetensors").unlink()
        return "text_encoder"
    if how == "wrong shape":
        path = folder / "vae/diffusion_pytorch_model.safetensors"
        tensors = load_file(path)
        tensors["decoder.conv_in.weight"] = torch.zeros(1, 1, 3, 3, dtype=torch.bfloat16)
        save_file(tensors, path)
        return "vae"
    if how.startswith("missing key"):  # both libraries would initialise it at random and only log that
        component, key = ("vae", "decoder.conv_out.bias") if how.endswith("diffusers") else \
            ("text_encoder", "text_model.final_layer_norm.weight")
        path = next((folder / component).glob("*.safetensors"))
        tensors = load_file(path)
        del tensors[key]
        save_file(tensors, path)
        return component
    (folder / "tokenizer_2/tokenizer.json").write_text("{not json")
    return "tokenizer_2"


@pytest.mark.parametrize("how", ["truncated shard", "missing file", "wrong shape", "missing key diffusers",
                                 "missing key transformers", "broken tokenizer"])
def test_a_broken_release_folder_is_one_line_naming_checkpoint_and_component(release_folders, tmp_path, how):
    folder = tmp_path / "flux"
    shutil.copytree(release_folders["flux-dev"], folder)
    component = _break(folder, how)
    with pytest.raises(ProxytuneError) as err:
        diffusion.load_pipeline(str(folder))
    message = str(err.value)
    assert "\n" not in message and str(folder) in message and f"({component}/)" in message, message
    if how.startswith("missing key"):
        assert "final_layer_norm.weight" in message or "decoder.conv_out.bias" in message


def test_pipeline_support_is_told_from_model_index_alone(release_folders, tmp_path):
    from proxytune.preflight import ModelProblem, check_model

    for folder in release_folders.values():
        check_model(str(folder), "teacher", tmp_path)
    other = tmp_path / "kandinsky"
    other.mkdir()
    (other / "model_index.json").write_text('{"_class_name": "KandinskyV22Pipeline"}')
    with pytest.raises(ModelProblem) as err:
        check_model(str(other), "teacher", tmp_path)
    problem = str(err.value)
    assert "KandinskyV22Pipeline" in problem and "StableDiffusionXLPipeline" in problem and "\n" not in problem


def test_a_broken_adapter_is_one_line_naming_the_file(release_folders, tmp_path):
    (tmp_path / diffusion.LORA_WEIGHT_NAME).write_bytes(b"not safetensors")
    with pytest.raises(ProxytuneError) as err:
        diffusion.load_pipeline_with_lora(str(release_folders["sd15"]), tmp_path)
    message = str(err.value)
    assert "\n" not in message and str(tmp_path / diffusion.LORA_WEIGHT_NAME) in message, message
