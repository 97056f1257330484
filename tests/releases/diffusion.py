"""The diffusion teachers as released: SD 1.5, SDXL base 1.0, SD3 medium (diffusers), FLUX.1-dev.

`build(name, folder)` writes a tiny random-weight diffusers folder laid out as the release is:
- model_index.json and scheduler_config.json: the release's files, byte for byte.
- every model's config.json: the release's config with only size fields shrunk (`SHRINK`); every other
  field (`_class_name`, `_diffusers_version`, `_name_or_path`, `torch_dtype`, activations, scaling and
  shift factors, ...) is kept.
- tokenizers: the CLIP BPE vocab.json / merges.txt the releases ship (exact copies, in
  ../shared/real-configs) with the release's tokenizer_config.json / special_tokens_map.json; for T5 a
  tiny Unigram tokenizer.json written with the release's T5 tokenizer_config fields.
- weights named, typed and sharded as the release ships them (`Release.weights`).

`full_config(name, component)` is the release's config as it is (for the meta-device checks).

Which config values are exact copies of the Hub's files and which are derived is said per release in
`RELEASES` (see ../shared/real-configs/README.md for the sources). Everything under `SHRINK` is a size
chosen here; the T5 tokenizer vocabulary is made up (the release's is a 32k sentencepiece model).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]


def real_configs() -> Path:
    """The releases' config files: $PROXYTUNE_REAL_CONFIGS, else ../shared/real-configs beside the checkout
    (or beside its parent folder, for a git worktree under a folder of worktrees)."""
    env = os.environ.get("PROXYTUNE_REAL_CONFIGS")
    if env:
        return Path(env)
    near, far = REPO.parent / "shared" / "real-configs", REPO.parents[1] / "shared" / "real-configs"
    return near if near.is_dir() or not far.is_dir() else far


# The CLIP BPE files: SDXL's tokenizer{,_2}/vocab.json and merges.txt (exact copies); SD 1.5, SD3 and
# FLUX ship the same openai/clip-vit-large-patch14 files.
CLIP_BPE = "stabilityai__stable-diffusion-xl-base-1.0/tokenizer"


@dataclass(frozen=True)
class Weights:
    """How one component's weights are stored in the release."""

    dtype: torch.dtype
    shards: int = 1  # >1: NAME-0000i-of-0000N.safetensors + NAME.safetensors.index.json
    variants: tuple[str, ...] = ()  # extra `variant` files (e.g. "fp16": NAME.fp16.safetensors, in float16)


@dataclass(frozen=True)
class Release:
    """One released diffusers folder.

    Attributes:
        hub_id: the repository a user names.
        configs: its folder under real-configs.
        weights: component -> how its weights are stored (sizes from the Hub's file listing: e.g. SD 1.5's
            unet 3.44 GB = 860M params in float32).
        tokenizer_configs: tokenizer folder -> real-configs folder whose tokenizer_config.json and
            special_tokens_map.json it uses (the release's own unless said otherwise).
        provenance: which files are exact copies and which are derived.
    """

    hub_id: str
    configs: str
    weights: dict[str, Weights]
    tokenizer_configs: dict[str, str]
    provenance: str
    copied: tuple[str, ...] = ()  # other files copied verbatim (feature_extractor)
    position_ids: bool = False  # transformers < 4.31 saved CLIP's position_ids buffer in the file


RELEASES = {
    "sd15": Release(
        hub_id="runwayml/stable-diffusion-v1-5",
        configs="runwayml__stable-diffusion-v1-5",
        weights={"unet": Weights(torch.float32), "vae": Weights(torch.float32),
                 "text_encoder": Weights(torch.float32), "safety_checker": Weights(torch.float32)},
        tokenizer_configs={"tokenizer": "runwayml__stable-diffusion-v1-5/tokenizer"},
        provenance="every config exact (git); vocab/merges exact (SDXL's copy of the same CLIP files)",
        copied=("feature_extractor/preprocessor_config.json",),
        position_ids=True,  # text_encoder config names transformers 4.22.0.dev0
    ),
    "sdxl": Release(
        hub_id="stabilityai/stable-diffusion-xl-base-1.0",
        configs="stabilityai__stable-diffusion-xl-base-1.0",
        # main files are float32 (unet 10.3 GB = 2.57B x 4) although the text encoders' configs say
        # float16; the fp16 `variant` files sit beside them
        weights={"unet": Weights(torch.float32, variants=("fp16",)), "vae": Weights(torch.float32, variants=("fp16",)),
                 "text_encoder": Weights(torch.float32, variants=("fp16",)),
                 "text_encoder_2": Weights(torch.float32, variants=("fp16",))},
        tokenizer_configs={"tokenizer": "stabilityai__stable-diffusion-xl-base-1.0/tokenizer",
                           "tokenizer_2": "stabilityai__stable-diffusion-xl-base-1.0/tokenizer_2"},
        provenance="every config and tokenizer file exact (git); vae_1_0/, vae_decoder/, vae_encoder/ (ONNX) and "
                   "the root sd_xl_base_1.0.safetensors are not written (the pipeline does not read them)",
    ),
    "sd3": Release(
        hub_id="stabilityai/stable-diffusion-3-medium-diffusers",
        configs="stabilityai__stable-diffusion-3-medium-diffusers",
        weights={"transformer": Weights(torch.float16), "vae": Weights(torch.float16),
                 "text_encoder": Weights(torch.float16), "text_encoder_2": Weights(torch.float16),
                 "text_encoder_3": Weights(torch.float16, shards=2)},
        # DERIVED: SD3's CLIP tokenizer files were not found; SDXL's (same CLIP-L / bigG tokenizers) stand in
        tokenizer_configs={"tokenizer": "stabilityai__stable-diffusion-xl-base-1.0/tokenizer",
                           "tokenizer_2": "stabilityai__stable-diffusion-xl-base-1.0/tokenizer_2",
                           "tokenizer_3": "black-forest-labs__FLUX.1-dev/tokenizer_2"},
        provenance="model/scheduler configs exact (size-verified, June 2024); tokenizer configs DERIVED "
                   "(SDXL's CLIP ones, FLUX's T5 one)",
    ),
    "flux-dev": Release(
        hub_id="black-forest-labs/FLUX.1-dev",
        configs="black-forest-labs__FLUX.1-dev",
        weights={"transformer": Weights(torch.bfloat16, shards=3), "vae": Weights(torch.bfloat16),
                 "text_encoder": Weights(torch.bfloat16), "text_encoder_2": Weights(torch.bfloat16, shards=2)},
        tokenizer_configs={"tokenizer": "black-forest-labs__FLUX.1-dev/tokenizer",
                           "tokenizer_2": "black-forest-labs__FLUX.1-dev/tokenizer_2"},
        provenance="transformer/vae/scheduler/text encoder configs exact (size-verified); model_index likely exact; "
                   "tokenizer configs a derived copy (FLUX.1-schnell re-save); the root flux1-dev.safetensors and "
                   "ae.safetensors (BFL format) are not written",
    ),
}

# Size fields shrunk per release and component; every other field stays as released. The shrunk sizes
# keep the shape rules the pipelines rely on: SDXL cross_attention_dim = CLIP-L + bigG hidden, its
# added-embedding input = bigG projection + 6 x addition_time_embed_dim; SD3 pooled = the two CLIP
# projections, joint dim = T5 d_model >= the two CLIP hiddens; FLUX pooled = CLIP hidden, joint = T5,
# in_channels = 4 x VAE latent channels. The VAEs keep 4 blocks (x8 downsampling).
_VAE = {"block_out_channels": [32, 64, 128, 128], "layers_per_block": 1}
_CLIP_L = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "projection_dim": 32}
_T5 = {"d_model": 48, "d_ff": 64, "d_kv": 8, "num_heads": 4, "num_layers": 2, "num_decoder_layers": 2}
SHRINK = {
    "sd15": {
        "unet": {"block_out_channels": [32, 32, 64, 64], "layers_per_block": 1, "cross_attention_dim": 32},
        "vae": _VAE,
        "text_encoder": _CLIP_L,
        "safety_checker": {"projection_dim": 32,
                           "text_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2},
                           "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2},
                           "text_config_dict": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2},
                           "vision_config_dict": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}},
    },
    "sdxl": {
        "unet": {"block_out_channels": [32, 64, 64], "layers_per_block": 1, "attention_head_dim": [2, 4, 4],
                 "transformer_layers_per_block": [1, 1, 2], "addition_time_embed_dim": 8,
                 "cross_attention_dim": 32 + 48, "projection_class_embeddings_input_dim": 48 + 6 * 8},
        "vae": _VAE,
        "text_encoder": _CLIP_L,
        "text_encoder_2": {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 2,
                           "projection_dim": 48},
    },
    "sd3": {
        "transformer": {"num_attention_heads": 2, "num_layers": 2, "caption_projection_dim": 2 * 64,
                        "joint_attention_dim": 48, "pooled_projection_dim": 16 + 24, "pos_embed_max_size": 16},
        "vae": _VAE,
        "text_encoder": {**_CLIP_L, "hidden_size": 16, "intermediate_size": 32, "projection_dim": 16},
        "text_encoder_2": {**_CLIP_L, "hidden_size": 24, "intermediate_size": 48, "projection_dim": 24},
        "text_encoder_3": _T5,
    },
    "flux-dev": {
        "transformer": {"num_attention_heads": 1, "num_layers": 1, "num_single_layers": 2,
                        "joint_attention_dim": 32, "pooled_projection_dim": 32},
        "vae": _VAE,
        "text_encoder": _CLIP_L,
        "text_encoder_2": {**_T5, "d_model": 32},
    },
}

# The tiny T5 tokenizer: T5's special ids (pad 0, eos 1, unk 2), pieces, then the 100 extra ids.
_T5_PIECES = ["\u2581"] + [f"\u2581{c}" for c in "abcdefghijklmnopqrstuvwxyz"] + list("abcdefghijklmnopqrstuvwxyz0123456789.,'-*")


def _read(relative: str) -> dict:
    return json.loads((real_configs() / relative).read_text())


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def model_index(name: str) -> dict:
    return _read(f"{RELEASES[name].configs}/model_index.json")


def full_config(name: str, component: str) -> dict:
    """The release's config.json of `component`, as released (full size)."""
    return _read(f"{RELEASES[name].configs}/{component}/config.json")


def tiny_config(name: str, component: str) -> dict:
    """The release's config with the `SHRINK` sizes (nested dicts updated key by key)."""
    config = full_config(name, component)
    for key, value in SHRINK[name][component].items():
        config[key] = {**config[key], **value} if isinstance(value, dict) else value
    if config.get("model_type") == "t5":
        config["vocab_size"] = t5_vocab_size()
    return config


def t5_vocab_size() -> int:
    """3 special tokens + pieces + 100 extra ids, rounded up to a multiple of 64 (as T5's 32128 is)."""
    used = 3 + len(_T5_PIECES) + 100
    return -(-used // 64) * 64


def model_class(name: str, component: str):
    """The class model_index.json names for `component` (diffusers, transformers or the SD safety checker)."""
    library, class_name = model_index(name)[component]
    if library == "stable_diffusion":
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

        return StableDiffusionSafetyChecker
    module = __import__(library)
    return getattr(module, class_name)


def instantiate(name: str, component: str, config: dict) -> torch.nn.Module:
    """A model of the release's class from a config dict (under `torch.device("meta")` for full size)."""
    cls = model_class(name, component)
    if hasattr(cls, "from_config") and cls.__module__.startswith("diffusers.models"):
        return cls.from_config(config)
    config_class = cls.config_class
    return cls(config_class.from_dict(config))


def released_key(model: torch.nn.Module, key: str) -> str:
    """A state-dict key as the release's file names it. The releases were saved by transformers 4.22-4.43,
    whose CLIPTextModel / CLIPVisionModel wrapped their transformer in a `text_model` / `vision_model`
    attribute; transformers 5 dropped that level (and adds it back for CLIPTextModel when loading)."""
    name = type(model).__name__
    if name == "CLIPTextModel":
        return f"text_model.{key}"
    if name == "StableDiffusionSafetyChecker" and key.startswith("vision_model."):
        return f"vision_model.{key}"
    return key


def state_dict_as_released(model: torch.nn.Module, dtype: torch.dtype, position_ids: bool) -> dict[str, torch.Tensor]:
    """The tensors a release file holds, under the release's key names: tied copies dropped (transformers
    saves T5's `shared.weight` only), floats in the release's dtype, CLIP's position_ids added where old
    transformers saved them. On the meta device nothing is dropped (meta tensors share no storage)."""
    out, seen = {}, set()
    for key, value in model.state_dict().items():
        if not value.is_meta and value.data_ptr() in seen:
            continue
        seen.add(value.data_ptr())
        out[released_key(model, key)] = (value.to(dtype) if value.is_floating_point() else value).contiguous()
    if position_ids:
        for key, buffer in model.named_buffers():
            if key.endswith("embeddings.position_ids") and released_key(model, key) not in out:
                out[released_key(model, key)] = buffer.clone()
    return out


def write_weights(folder: Path, stem: str, tensors: dict[str, torch.Tensor], shards: int, variant: str | None = None) -> None:
    """`stem`.safetensors, or `stem`-0000i-of-0000N.safetensors + `stem`.safetensors.index.json."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    suffix = f".{variant}" if variant else ""
    if shards == 1:
        save_file(tensors, str(folder / f"{stem}{suffix}.safetensors"), metadata={"format": "pt"})
        return
    keys = list(tensors)
    per = -(-len(keys) // shards)
    weight_map = {}
    for i in range(shards):
        file = f"{stem}-{i + 1:05d}-of-{shards:05d}{suffix}.safetensors"
        part = {k: tensors[k] for k in keys[i * per : (i + 1) * per]}
        save_file(part, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    _write_json(folder / f"{stem}{suffix}.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})


def _write_clip_tokenizer(folder: Path, configs: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for file in ("vocab.json", "merges.txt"):
        shutil.copyfile(real_configs() / CLIP_BPE / file, folder / file)
    for file in ("tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(real_configs() / configs / file, folder / file)


def _write_spiece_model(path: Path, vocab: list[tuple[str, float]]) -> None:
    """A sentencepiece ModelProto as T5's spiece.model is laid out: <pad> and </s> control pieces, <unk>,
    then the pieces (the 100 extra ids are not in it; the tokenizer adds them), Unigram, pad 0, eos 1, unk 2,
    no bos."""
    from transformers.utils import sentencepiece_model_pb2_new as sp

    model = sp.ModelProto()
    kinds = {"<pad>": sp.ModelProto.SentencePiece.CONTROL, "</s>": sp.ModelProto.SentencePiece.CONTROL,
             "<unk>": sp.ModelProto.SentencePiece.UNKNOWN}
    for piece, score in vocab:
        model.pieces.add(piece=piece, score=score, type=kinds.get(piece, sp.ModelProto.SentencePiece.NORMAL))
    spec = model.trainer_spec
    spec.model_type, spec.vocab_size = sp.TrainerSpec.UNIGRAM, len(vocab)
    spec.pad_id, spec.eos_id, spec.unk_id, spec.bos_id = 0, 1, 2, -1
    model.normalizer_spec.name = "nmt_nfkc"
    model.normalizer_spec.add_dummy_prefix = True
    model.normalizer_spec.remove_extra_whitespaces = True
    model.normalizer_spec.escape_whitespaces = True
    path.write_bytes(model.SerializeToString())


def _write_t5_tokenizer(folder: Path, configs: str) -> None:
    """A tiny T5 Unigram tokenizer in the release's four files: spiece.model (the sentencepiece model proto),
    tokenizer.json (Metaspace, "</s>" appended), and the release's tokenizer_config.json /
    special_tokens_map.json (added-token ids moved to the tiny vocabulary). The Unigram scores are made up
    and no NFKC charsmap is written: prompts of plain ASCII tokenize the same either way."""
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import Unigram

    extra = [f"<extra_id_{i}>" for i in range(99, -1, -1)]  # T5 puts <extra_id_99> first, <extra_id_0> last
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(p, -float(i + 1)) for i, p in enumerate(_T5_PIECES)]
    vocab += [(e, 0.0) for e in extra]
    tokenizer = Tokenizer(Unigram(vocab, unk_id=2, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                             special_tokens=[("</s>", 1)])
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<pad>", "</s>", "<unk>", *extra)])
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    _write_spiece_model(folder / "spiece.model", vocab[: 3 + len(_T5_PIECES)])
    ids = {token: tokenizer.token_to_id(token) for token in ("<pad>", "</s>", "<unk>", *extra)}
    config = _read(f"{configs}/tokenizer_config.json")
    config["added_tokens_decoder"] = {str(ids[entry["content"]]): entry for entry in config["added_tokens_decoder"].values()}
    _write_json(folder / "tokenizer_config.json", config)
    shutil.copyfile(real_configs() / configs / "special_tokens_map.json", folder / "special_tokens_map.json")


def build(name: str, folder: Path, seed: int = 0) -> Path:
    """Write the tiny `name` release (a key of RELEASES) into `folder`; returns it."""
    release = RELEASES[name]
    root = real_configs()
    if not (root / release.configs / "model_index.json").is_file():
        raise FileNotFoundError(f"the releases' config files are not at {root}: set PROXYTUNE_REAL_CONFIGS")
    folder.mkdir(parents=True, exist_ok=True)
    index = model_index(name)
    shutil.copyfile(root / release.configs / "model_index.json", folder / "model_index.json")
    (folder / "scheduler").mkdir()
    shutil.copyfile(root / release.configs / "scheduler/scheduler_config.json", folder / "scheduler/scheduler_config.json")
    for file in release.copied:
        (folder / file).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / release.configs / file, folder / file)
    torch.manual_seed(seed)
    for component, weights in release.weights.items():
        config = tiny_config(name, component)
        model = instantiate(name, component, config)
        _write_json(folder / component / "config.json", config)
        diffusers_model = index[component][0] == "diffusers"
        stem = "diffusion_pytorch_model" if diffusers_model else "model"
        write_weights(folder / component, stem, state_dict_as_released(model, weights.dtype, release.position_ids), weights.shards)
        for variant in weights.variants:
            tensors = state_dict_as_released(model, getattr(torch, {"fp16": "float16"}[variant]), release.position_ids)
            write_weights(folder / component, stem, tensors, weights.shards, variant)
    for tokenizer, configs in release.tokenizer_configs.items():
        if index[tokenizer][1].startswith("T5"):
            _write_t5_tokenizer(folder / tokenizer, configs)
        else:
            _write_clip_tokenizer(folder / tokenizer, configs)
    return folder
