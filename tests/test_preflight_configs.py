"""Model pre-flight reads what it can (issue 26): each model's config.json / model_index.json /
proxytune_student.json, from the folder or from the local Hugging Face cache, before `apply` writes anything.

The folders here hold config files only (the refusals read no weights), with the releases' own field names:
Janus-Pro as deepseek-ai ships it (the Janus repository's `multi_modality` config), Lumina-mGPT as its
Chameleon code saves it (model_type chameleon, model_parallel_size, vocabulary_map, vq_config), and diffusers
pipelines with their real `_class_name` and text encoders' torch_dtype. Each refusal is one line naming the
spec file and key, the model's file and the fix, exit 2, and the project is left as it was.
"""

import json
from pathlib import Path

import pytest

from proxytune import model_configs, preflight
from proxytune.backends.students.janus import CONVERT_FIX as JANUS_CONVERT_FIX
from test_model_preflight import cache_repo, fake_pipeline, fake_weights_folder, refused, write_spec

# deepseek-ai/Janus-Pro-7B's config.json fields as the Janus repository's MultiModalityConfig reads them
# (values from the research notes; the hub file itself was not reachable, so the bytes are not the release's).
JANUS_PRO_7B = {
    "aligner_config": {"cls": "MlpProjector", "model_type": "aligner",
                       "params": {"depth": 2, "input_dim": 1024, "n_embed": 4096, "projector_type": "mlp_gelu"}},
    "architectures": ["MultiModalityCausalLM"],
    "gen_aligner_config": {"cls": "MlpProjector", "model_type": "gen_aligner",
                           "params": {"depth": 2, "input_dim": 8, "n_embed": 4096, "projector_type": "mlp_gelu"}},
    "gen_head_config": {"cls": "vision_head", "model_type": "gen_head",
                        "params": {"image_token_embed": 4096, "image_token_size": 16384, "n_embed": 4096}},
    "gen_vision_config": {"cls": "VQ-16", "model_type": "gen_vision", "params": {"image_token_size": 16384, "n_embed": 8}},
    "language_config": {"max_position_embeddings": 16384, "model_type": "llama", "num_hidden_layers": 30,
                        "torch_dtype": "bfloat16", "vocab_size": 102400},
    "model_type": "multi_modality",
    "torch_dtype": "bfloat16",
    "transformers_version": "4.33.1",
    "vision_config": {"cls": "CLIPVisionTower", "model_type": "vision",
                      "params": {"image_size": 384, "model_name": "siglip_large_patch16_384", "select_feature": "same",
                                 "select_layer": -1}},
}


def janus_pro_folder(folder: Path) -> Path:
    """Janus-Pro as downloaded: the multi_modality config, bf16 .bin shards + index, its tokenizer files."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(JANUS_PRO_7B, indent=2))
    for name in ("pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"):
        (folder / name).write_bytes(b"\0" * 8)
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {}}))
    for name in ("tokenizer_config.json", "special_tokens_map.json", "processor_config.json",
                 "preprocessor_config.json"):
        (folder / name).write_text("{}")
    return folder


def lumina_vocabulary(codes: int = 8192) -> dict[str, int]:
    """Chameleon's vocabulary_map as far as Lumina-mGPT reads it: turn, image, row, size and image-code tokens."""
    names = ["<s>", "<racm3:break>", "<eoss>", "<reserved08706>", "<reserved08799>",
             *(f"<reserved{8800 + n:05d}>" for n in range(1, 40))]
    names += ["IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(code)) + "Z" for code in range(codes)]
    return {name: i for i, name in enumerate(names)}


def lumina_config(**changes) -> dict:
    """config.json of Alpha-VLLM/Lumina-mGPT-7B-768 as Lumina-mGPT's ChameleonXLLMXConfig saves it (7B sizes;
    the released vocabulary_map is reduced to the tokens proxytune reads)."""
    config = {"architectures": ["ChameleonXLLMXForConditionalGeneration"], "model_type": "chameleon",
              "torch_dtype": "bfloat16", "transformers_version": "4.43.3", "hidden_size": 4096,
              "num_attention_heads": 32, "num_key_value_heads": 32, "num_hidden_layers": 32,
              "model_parallel_size": 1, "swin_norm": False, "vocab_size": 65536, "z_loss_weight": 1e-05,
              "vocabulary_map": lumina_vocabulary(),
              "vq_config": {"model_type": "chameleon_vqgan", "embed_dim": 256, "num_embeddings": 8192,
                            "channel_multiplier": [1, 1, 2, 2, 4], "resolution": 512}}
    config.update(changes)
    return config


def lumina_release_folder(folder: Path, config: dict) -> Path:
    """A Lumina-mGPT release: config.json, two safetensors shards + index, the text tokenizer; no VQ model."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        (folder / name).write_bytes(b"\0" * 8)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {}}))
    (folder / "tokenizer_config.json").write_text("{}")
    (folder / "tokenizer.json").write_text("{}")
    return folder


def converted_lumina(folder: Path, model: str, image_size: int = 768) -> Path:
    """What `proxytune convert lumina-mgpt MODEL OUT` writes: the VQGAN folder and proxytune_student.json."""
    fake_weights_folder(folder / "vq_decoder")
    (folder / "proxytune_student.json").write_text(json.dumps(
        {"backend": "lumina-mgpt", "model": model, "vq_decoder": "vq_decoder", "image_size": image_size}))
    return folder


# -- students ----------------------------------------------------------------------------------------------
def test_janus_pro_as_released_is_sent_to_the_converter(project):
    janus_pro_folder(project / "models" / "Janus-Pro-7B")
    path = write_spec(project, student={"model": "./models/Janus-Pro-7B"})
    line = refused(project, path, "student.model", "Janus-Pro-7B/config.json", "model_type 'multi_modality'",
                   "`proxytune convert janus ", "name OUT as student.model")
    assert JANUS_CONVERT_FIX.split("{src}")[0] in line


def test_janus_pro_in_the_hub_cache_is_refused_offline(project, offline_hub):
    """deepseek-ai/Janus-Pro-1B downloaded earlier: its cached config.json is read, the hub is not asked."""
    config = {**JANUS_PRO_7B, "language_config": {**JANUS_PRO_7B["language_config"], "num_hidden_layers": 24}}
    cache_repo(offline_hub, "deepseek-ai/Janus-Pro-1B", {"config.json": json.dumps(config)})
    path = write_spec(project, student={"model": "deepseek-ai/Janus-Pro-1B"})
    refused(project, path, "student.model", "hub id 'deepseek-ai/Janus-Pro-1B': config.json (cached at ",
            "`proxytune convert janus deepseek-ai/Janus-Pro-1B OUT`")


@pytest.mark.parametrize("size", [512, 768, 1024])
def test_lumina_release_hub_ids_need_the_conversion(project, offline_hub, size):
    repo = f"Alpha-VLLM/Lumina-mGPT-7B-{size}"
    cache_repo(offline_hub, repo, {"config.json": json.dumps(lumina_config()), "generation_config.json": "{}"})
    path = write_spec(project, student={"model": repo})
    refused(project, path, "student.model", f"hub id '{repo}': config.json (cached at ",
            f"`proxytune convert lumina-mgpt {repo} OUT --vqgan vqgan.ckpt --image-size N`")


def test_lumina_release_folder_needs_the_conversion(project):
    lumina_release_folder(project / "models" / "Lumina-mGPT-7B-768", lumina_config())
    path = write_spec(project, student={"model": "./models/Lumina-mGPT-7B-768"})
    refused(project, path, "student.model", "Lumina-mGPT-7B-768/config.json", "as released",
            "`proxytune convert lumina-mgpt ", "--vqgan vqgan.ckpt", "name OUT as student.model")


@pytest.mark.parametrize("changes,words", [
    ({"model_parallel_size": 3}, ("model_parallel_size 3 does not divide num_attention_heads 32",)),
    ({"num_key_value_heads": 6, "model_parallel_size": 4}, ("num_key_value_heads 6",)),
    ({"vq_config": {"channel_multiplier": [1, 2, 2, 4], "num_embeddings": 8192}}, ("an x8 VQ",)),
    ({"vocabulary_map": None}, ("no vocabulary_map",)),
    ({"vocabulary_map": {"<s>": 0, "<racm3:break>": 1}}, ("vocabulary_map lacks <eoss>, <reserved08799>, <reserved08706> and 2 more",)),
    ({"torch_dtype": "float8_e4m3fn"}, ("torch_dtype 'float8_e4m3fn' is not a dtype proxytune runs",)),
])
def test_converted_lumina_with_fields_lumina_cannot_load(project, changes, words):
    release = lumina_release_folder(project / "models" / "release", lumina_config(**changes))
    converted_lumina(project / "models" / "student", str(release))
    path = write_spec(project, student={"model": "./models/student"})
    refused(project, path, "student.model", "models/release/config.json", *words)


def test_converted_lumina_reads_its_cached_hub_weights_config(project, offline_hub):
    cache_repo(offline_hub, "Alpha-VLLM/Lumina-mGPT-7B-768",
               {"config.json": json.dumps(lumina_config(model_parallel_size=5)), "tokenizer_config.json": "{}"})
    converted_lumina(project / "models" / "student", "Alpha-VLLM/Lumina-mGPT-7B-768", image_size=800)
    path = write_spec(project, student={"model": "./models/student"})
    refused(project, path, "student.model", "hub id 'Alpha-VLLM/Lumina-mGPT-7B-768': config.json (cached at ",
            "model_parallel_size 5")


def test_an_image_size_without_its_size_token(project):
    release = lumina_release_folder(project / "models" / "release", lumina_config())
    converted_lumina(project / "models" / "student", str(release), image_size=2048)  # <reserved08864>: not in the map
    path = write_spec(project, student={"model": "./models/student"})
    refused(project, path, "student.model", "vocabulary_map lacks <reserved08864>")


def test_a_diffusers_pipeline_named_as_student(project):
    fake_pipeline(project / "models" / "sd")
    path = write_spec(project, student={"model": "./models/sd"})
    refused(project, path, "student.model", "models/sd/model_index.json: a diffusers pipeline (a teacher)",
            "name it as teacher.model")


def test_a_transformers_janus_with_an_unknown_dtype(project):
    folder = fake_weights_folder(project / "models" / "janus", {"model_type": "janus", "torch_dtype": "bfloat16",
                                                                "text_config": {"model_type": "llama", "dtype": "int4"}})
    (folder / "tokenizer_config.json").write_text("{}")
    path = write_spec(project, student={"model": "./models/janus"})
    refused(project, path, "student.model", "janus/config.json: text_config.dtype 'int4' is not a dtype proxytune runs",
            "float32, float16, bfloat16")


def test_a_student_config_that_is_not_json(project):
    folder = fake_weights_folder(project / "models" / "janus")
    (folder / "config.json").write_text('{"model_type": "janus",')
    path = write_spec(project, student={"model": "./models/janus"})
    refused(project, path, "student.model", "janus/config.json: not valid JSON")


# -- teachers ----------------------------------------------------------------------------------------------
def test_a_pipeline_class_without_a_family(project):
    folder = fake_pipeline(project / "models" / "upscaler")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionUpscalePipeline"}))
    path = write_spec(project, teacher={"model": "./models/upscaler"})
    refused(project, path, "teacher.model", "upscaler/model_index.json: pipeline class 'StableDiffusionUpscalePipeline' "
            "has no proxytune teacher family", "FluxPipeline")


def test_a_cached_hub_pipeline_without_a_family(project, offline_hub):
    cache_repo(offline_hub, "kandinsky-community/kandinsky-2-2-decoder",
               {"model_index.json": json.dumps({"_class_name": "KandinskyV22Pipeline", "unet": ["diffusers", "UNet2DConditionModel"]})})
    path = write_spec(project, teacher={"model": "kandinsky-community/kandinsky-2-2-decoder"})
    refused(project, path, "teacher.model", "hub id 'kandinsky-community/kandinsky-2-2-decoder': model_index.json",
            "'KandinskyV22Pipeline' has no proxytune teacher family")


def test_a_text_model_named_as_teacher(project):
    fake_weights_folder(project / "models" / "flan-t5-xl", {"architectures": ["T5ForConditionalGeneration"],
                                                             "model_type": "t5", "d_model": 2048})
    path = write_spec(project, teacher={"model": "./models/flan-t5-xl"})
    refused(project, path, "teacher.model", "no model_index.json", "a transformers 't5' model")


def test_a_teacher_text_encoder_in_an_unknown_dtype(project):
    folder = fake_pipeline(project / "models" / "sd")
    (folder / "text_encoder" / "config.json").write_text(json.dumps({"model_type": "clip_text_model", "torch_dtype": "int8"}))
    path = write_spec(project, teacher={"model": "./models/sd"})
    refused(project, path, "teacher.model", "sd/text_encoder/config.json: torch_dtype 'int8'")


def test_a_model_index_that_is_not_json(project):
    folder = fake_pipeline(project / "models" / "sd")
    (folder / "model_index.json").write_text("<html>rate limited</html>")
    path = write_spec(project, teacher={"model": "./models/sd"})
    refused(project, path, "teacher.model", "sd/model_index.json: not valid JSON")


def test_a_cached_model_index_that_is_not_json(project, offline_hub):
    cache_repo(offline_hub, "org/half-downloaded", {"model_index.json": '{"_class_name": "FluxPipe'})
    path = write_spec(project, teacher={"model": "org/half-downloaded"})
    refused(project, path, "teacher.model", "hub id 'org/half-downloaded': ", "model_index.json: not valid JSON")


# -- accepted: the releases' own configs -----------------------------------------------------------------
@pytest.mark.parametrize("cls,dtype", [("StableDiffusionPipeline", "float32"), ("StableDiffusionXLPipeline", "float16"),
                                       ("StableDiffusion3Pipeline", "float16"), ("FluxPipeline", "bfloat16")])
def test_release_pipelines_pass(tmp_path, cls, dtype):
    folder = fake_pipeline(tmp_path / "teacher")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": cls}))
    (folder / "text_encoder" / "config.json").write_text(json.dumps({"model_type": "clip_text_model", "torch_dtype": dtype}))
    preflight.check_model(str(folder), "teacher", tmp_path)


def test_janus_pro_in_transformers_layout_passes(project, offline_hub):
    """deepseek-community/Janus-Pro-*: transformers' own `janus` layout, bf16 sub-configs (as its converter writes)."""
    config = {"architectures": ["JanusForConditionalGeneration"], "model_type": "janus", "torch_dtype": "bfloat16",
              "text_config": {"model_type": "llama", "torch_dtype": "bfloat16"},
              "vision_config": {"model_type": "janus_vision_model"}, "vq_config": {"model_type": "janus_vqgan"}}
    folder = fake_weights_folder(project / "models" / "janus", config)
    (folder / "tokenizer_config.json").write_text("{}")
    preflight.check_model(str(folder), "student", project)
    cache_repo(offline_hub, "deepseek-community/Janus-Pro-1B", {"config.json": json.dumps(config)})
    preflight.check_model("deepseek-community/Janus-Pro-1B", "student", project)


def test_converted_lumina_releases_pass(project, offline_hub):
    release = lumina_release_folder(project / "models" / "release", lumina_config())
    for size in (512, 768, 1024):
        preflight.check_model(str(converted_lumina(project / f"lumina-{size}", str(release), size)), "student", project)
    cache_repo(offline_hub, "Alpha-VLLM/Lumina-mGPT-7B-768",
               {"config.json": json.dumps(lumina_config()), "tokenizer_config.json": "{}"})
    preflight.check_model(str(converted_lumina(project / "from-hub", "Alpha-VLLM/Lumina-mGPT-7B-768")), "student", project)


# -- the pre-flight's copies of torch-side names agree with the loaders ------------------------------------
def test_names_agree_with_the_loaders():
    from proxytune.backends.teachers import diffusion

    assert model_configs.TEACHER_PIPELINES == tuple(diffusion.FAMILIES)


@pytest.mark.parametrize("config,words", [
    ({"model_type": ["janus"]}, ("model_type ['janus'] is not an AR student",)),
    (lumina_config(vq_config=[1, 2]), ("vq_config must be an object",)),
    (lumina_config(num_attention_heads="32"), ("num_attention_heads '32', num_key_value_heads 32", "positive integers")),
    (lumina_config(vq_config={"num_embeddings": 10**9}), ("vocabulary_map lacks IMGIMG tokens of 1000000000 codes",)),
    (lumina_config(vq_config={"num_embeddings": "8192"}), ("vq_config.num_embeddings '8192' is not a codebook size",)),
    (lumina_config(vocabulary_map=[("<s>", 0)]), ("no vocabulary_map",)),
])
def test_config_fields_of_the_wrong_type_are_one_line(project, config, words):
    """Hand-edited or truncated configs: a field of another type is refused like a wrong value, never a traceback."""
    folder = fake_weights_folder(project / "models" / "student", config)
    (folder / "tokenizer_config.json").write_text("{}")
    if config.get("model_type") == "chameleon":
        converted_lumina(folder, ".")
    path = write_spec(project, student={"model": "./models/student"})
    refused(project, path, "student.model", "models/student/config.json", *words)


def test_any_other_failure_of_a_check_is_one_line(project, monkeypatch):
    def broken(*args, **kwargs):
        raise KeyError("vq_config")

    monkeypatch.setattr(preflight, "check_family_config", broken)
    release = lumina_release_folder(project / "models" / "release", lumina_config())
    converted_lumina(project / "models" / "student", str(release))
    path = write_spec(project, student={"model": "./models/student"})
    refused(project, path, "student.model", "models/student: its config files hold a field proxytune cannot read "
            "(KeyError: 'vq_config')")


# -- encoders ----------------------------------------------------------------------------------------------
def test_a_dinov2_named_as_the_dino_encoder(project, offline_hub):
    """ViTModel would load a DINOv2 checkpoint with a warning and random weights: refused up front."""
    cache_repo(offline_hub, "facebook/dinov2-base", {"config.json": json.dumps(
        {"architectures": ["Dinov2Model"], "model_type": "dinov2", "torch_dtype": "float32"})})
    path = write_spec(project, evaluation={"dino_model": "facebook/dinov2-base"})
    refused(project, path, "evaluation.dino_model", "hub id 'facebook/dinov2-base': config.json (cached at ",
            "model_type 'dinov2': proxytune loads the dino encoder as ViTModel (model_type 'vit')")


def test_a_siglip_folder_named_as_the_clip_encoder(project):
    fake_weights_folder(project / "models" / "siglip", {"architectures": ["SiglipModel"], "model_type": "siglip"})
    path = write_spec(project, evaluation={"clip_model": "./models/siglip"})
    refused(project, path, "evaluation.clip_model", "siglip/config.json: model_type 'siglip'", "as CLIPModel",
            "e.g. openai/clip-vit-base-patch32")
