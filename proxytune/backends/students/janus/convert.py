"""deepseek-ai/Janus-Pro-1B / -7B as released (`model_type: multi_modality`) -> transformers' Janus layout
(`proxytune convert janus SRC OUT`).

Why a conversion and not a loader: the released folders are written for the Janus repository's own
`MultiModalityCausalLM` (janus/models/modeling_vlm.py), whose config names classes by string
(`cls: "CLIPVisionTower"`, `"VQ-16"`, `"MlpProjector"`, `"vision_head"`) and hard-codes most sizes in code
(`VQ_16()` takes no arguments; the SigLIP tower's width, depth and heads come from a table keyed by
`model_name`). Its vision tower is timm's ViT (fused qkv, `blocks.N`), its VQ keys are LlamaGen's
(`conv_blocks.N.res.M`, `mid.0/1/2`). transformers' own Janus (`model_type: janus`, which proxytune
trains) reads converted copies, and transformers converts once for the same reasons; so does proxytune.
Loading the original directly would mean carrying a second Janus implementation.

What the conversion does, read from the originals:
- sizes: the language model from `language_config` (a LlamaConfig, as the original builds it); the
  vision tower's heads, patch and MLP ratio from the SigLIP table entry its `model_name` names, its
  width, depth and image grid from the weights; the VQ's channels, levels, residual blocks, latent
  width and codebook from the weights (the original's VQ-16 is fixed in code, so the weights are the
  only record of it);
- keys: timm's `qkv` is split into q/k/v, `pos_embed` (1, N, W) loses its batch axis, the unused
  attention-pool head (`attn_pool`, never called: `ignore_head=True`) and the quantizer's usage
  counter (`codebook_used`) are dropped, every other tensor is renamed one to one;
- dtype: the tensors in the dtype config.json declares (bf16, which the released tensors already are);
  the converted config.json declares it too, so transformers loads them in it;
- the language model's `lm_head` is kept as its own tensor (`tie_word_embeddings: false`), as in the
  original's LlamaForCausalLM;
- the tokenizer is re-saved as is, with `<｜▁pad▁｜>` as its pad token when it names none (the original
  pads its CFG rows with that token; proxytune left-pads prompts with it); preprocessor_config.json
  becomes transformers' Janus image processor with the release's size, mean/std and rescale values.

The output folder is written staged: complete or absent.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from proxytune.errors import ProxytuneError, first_line
from proxytune.files import staged_dir

# janus/models/siglip_vit.py SigLIP_MODEL_CONFIG: what the weights cannot tell (heads; the rest is checked)
SIGLIP_TOWERS = {
    "siglip_large_patch16_384": {"heads": 16, "patch_size": 16, "mlp_ratio": 4.0},
    "siglip_so400m_patch14_384": {"heads": 16, "patch_size": 14, "mlp_ratio": 3.7362},
    "siglip_so400m_patch14_224": {"heads": 16, "patch_size": 14, "mlp_ratio": 3.7362},
}
PAD = "<｜▁pad▁｜>"
IMAGE_TAG = "<image_placeholder>"
WEIGHT_FILES = ("pytorch_model.bin.index.json", "pytorch_model.bin", "model.safetensors.index.json", "model.safetensors")
SOURCE_FILES = ["config.json", "*.json", "*.bin", "*.safetensors", "tokenizer*"]


# -----------------------------------------------------------------------------
# reading the release


def resolve_source(src: str) -> Path:
    """A folder, or a hub id already in the local Hugging Face cache (nothing is downloaded)."""
    path = Path(src).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ProxytuneError(f"Janus checkpoint {src!r}: a file, not the release's folder (config.json and its weights)")
    if src.startswith((".", "/", "~")):
        raise ProxytuneError(f"Janus checkpoint {src!r}: no such folder")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(src, local_files_only=True, allow_patterns=SOURCE_FILES))
    except Exception:
        raise ProxytuneError(f"Janus checkpoint {src!r}: not a folder and not in the local Hugging Face cache; "
                             f"download it first (`hf download {src}`) or pass its folder") from None


def read_release_config(folder: Path, ref: str) -> dict:
    """config.json of a multi_modality release, checked for the parts this conversion knows.

    Raises:
        ProxytuneError: missing/unreadable config.json, another model_type, or a part (class, projector,
            SigLIP tower) this conversion does not know; the message names the file and the field.
    """
    file = folder / "config.json"
    try:
        config = json.loads(file.read_text())
    except Exception as err:
        raise ProxytuneError(f"Janus checkpoint {ref!r}: cannot read {file.name} ({type(err).__name__}: {err})") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type == "janus":
        raise ProxytuneError(f"Janus checkpoint {ref!r}: config.json is already transformers' Janus layout; "
                             "name the folder as student.model directly")
    if model_type != "multi_modality":
        raise ProxytuneError(f"Janus checkpoint {ref!r}: config.json model_type {model_type!r}, expected 'multi_modality' "
                             "(deepseek-ai/Janus-Pro-1B or -7B as released)")
    expected = {"vision_config": "CLIPVisionTower", "aligner_config": "MlpProjector", "gen_vision_config": "VQ-16",
                "gen_aligner_config": "MlpProjector", "gen_head_config": "vision_head"}
    for part, cls in expected.items():
        got = (config.get(part) or {}).get("cls")
        if got != cls:
            raise ProxytuneError(f"Janus checkpoint {ref!r}: config.json {part}.cls is {got!r}; this conversion knows {cls!r}")
    for part in ("aligner_config", "gen_aligner_config"):
        projector = config[part].get("params", {}).get("projector_type")
        if projector != "mlp_gelu":
            raise ProxytuneError(f"Janus checkpoint {ref!r}: config.json {part}.params.projector_type is {projector!r}; "
                                 "this conversion knows 'mlp_gelu'")
    tower = config["vision_config"].get("params", {}).get("model_name")
    if tower not in SIGLIP_TOWERS:
        raise ProxytuneError(f"Janus checkpoint {ref!r}: config.json vision_config.params.model_name is {tower!r}; "
                             f"this conversion knows {', '.join(SIGLIP_TOWERS)}")
    return config


def read_release_weights(folder: Path, ref: str) -> dict:
    """Every tensor of the release: `.bin` shards + index as released (weights only), or safetensors."""
    from proxytune.backends.checkpoints import read_state_dict

    present = [name for name in WEIGHT_FILES if (folder / name).is_file()]
    if not present:
        raise ProxytuneError(f"Janus checkpoint {ref!r}: no weights ({' / '.join(WEIGHT_FILES)}) in {folder}")
    first = folder / present[0]
    if first.name.endswith(".index.json"):
        try:
            shards = sorted(set(json.loads(first.read_text())["weight_map"].values()))
        except Exception as err:
            raise ProxytuneError(f"Janus checkpoint {ref!r}: {first.name}: no readable weight_map ({type(err).__name__})") from None
    else:
        shards = [first.name]
    weights: dict = {}
    for shard in shards:
        weights.update(read_state_dict(folder / shard, label=f"Janus checkpoint {ref!r}: {shard}"))
    return weights


# -----------------------------------------------------------------------------
# keys: the original's -> transformers'


def _aligner(rest: str) -> str | None:
    """MlpProjector `layers.0` -> fc1, `layers.2k` -> hidden_layers.(k-1) (the odd entries are GELUs)."""
    match = re.fullmatch(r"layers\.(\d+)\.(weight|bias)", rest)
    if not match or int(match[1]) % 2:
        return None
    index = int(match[1]) // 2
    return f"fc1.{match[2]}" if index == 0 else f"hidden_layers.{index - 1}.{match[2]}"


def _vq(rest: str) -> str:
    """LlamaGen's VQ names -> transformers' JanusVQVAE names (the level order is the same in both)."""
    rest = re.sub(r"^(encoder|decoder)\.conv_blocks\.", lambda m: f"{m[1]}.{'down' if m[1] == 'encoder' else 'up'}.", rest)
    rest = re.sub(r"\.res\.(\d+)\.", r".block.\1.", rest)
    return re.sub(r"\.mid\.([012])\.", lambda m: ".mid." + ("block_1", "attn_1", "block_2")[int(m[1])] + ".", rest)


VISION_BLOCK = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.proj": "self_attn.projection_layer",
                "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}


def _vision(rest: str) -> str | None:
    """timm ViT names (after `vision_model.vision_tower.`) -> JanusVisionModel names; None: not mapped."""
    simple = {"patch_embed.proj.weight": "embeddings.patch_embedding.weight",
              "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
              "pos_embed": "embeddings.position_embedding.weight",
              "norm.weight": "post_layernorm.weight", "norm.bias": "post_layernorm.bias"}
    if rest in simple:
        return simple[rest]
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias)", rest)
    if match and (match[2] in VISION_BLOCK or match[2] == "attn.qkv"):
        name = "self_attn.qkv" if match[2] == "attn.qkv" else VISION_BLOCK[match[2]]
        return f"encoder.layers.{match[1]}.{name}.{match[3]}"
    return None


def convert_key(key: str) -> str | None:
    """The transformers key of one original key; "" for a tensor the conversion drops; None: unknown.

    `...self_attn.qkv.*` is split into q/k/v by `convert_state_dict`."""
    if key.startswith("language_model.model."):
        return "model.language_model." + key[len("language_model.model."):]
    if key == "language_model.lm_head.weight":
        return "lm_head.weight"
    if key == "gen_embed.weight":
        return "model.generation_embeddings.weight"
    if key.startswith("gen_head."):
        rest = key[len("gen_head."):].replace("output_mlp_projector.", "proj_out.", 1)
        return "model.generation_head." + rest if rest.split(".")[0] in ("proj_out", "vision_head") else None
    for prefix, target in (("gen_aligner.", "model.generation_aligner."), ("aligner.", "model.aligner.")):
        if key.startswith(prefix):
            rest = _aligner(key[len(prefix):])
            return target + rest if rest else None
    if key.startswith("gen_vision_model."):
        rest = key[len("gen_vision_model."):]
        return "" if rest == "quantize.codebook_used" else "model.vqmodel." + _vq(rest)
    if key.startswith("vision_model.vision_tower."):
        rest = key[len("vision_model.vision_tower."):]
        if rest.startswith("attn_pool."):
            return ""
        mapped = _vision(rest)
        return "model.vision_model." + mapped if mapped else None
    return None


def convert_state_dict(weights: dict, ref: str = "Janus checkpoint") -> dict:
    """The original's tensors under transformers' Janus keys (same dtypes; q/k/v split, pos_embed squeezed).

    Raises:
        ProxytuneError: a key the conversion does not know, or a qkv / pos_embed of the wrong shape.
    """
    out = {}
    for key, tensor in weights.items():
        new = convert_key(key)
        if new is None:
            raise ProxytuneError(f"{ref}: tensor {key!r} is not part of a Janus-Pro release this conversion knows")
        if not new:
            continue
        if ".self_attn.qkv." in new:
            if tensor.shape[0] % 3:
                raise ProxytuneError(f"{ref}: tensor {key!r} has {tensor.shape[0]} rows, not q, k and v of one width")
            for name, part in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3, dim=0)):
                out[new.replace(".qkv.", f".{name}.")] = part.contiguous()
        elif new.endswith("position_embedding.weight"):
            if tensor.dim() != 3 or tensor.shape[0] != 1:
                raise ProxytuneError(f"{ref}: tensor {key!r} has shape {tuple(tensor.shape)}, expected (1, positions, width)")
            out[new] = tensor[0].contiguous()
        else:
            out[new] = tensor
    return out


# -----------------------------------------------------------------------------
# sizes: the release's config + shapes -> transformers' JanusConfig


def _count(shapes: dict, pattern: str) -> int:
    found = {int(m[1]) for key in shapes if (m := re.fullmatch(pattern, key))}
    return max(found) + 1 if found else 0


def _shape(shapes: dict, key: str, ref: str) -> tuple:
    if key not in shapes:
        raise ProxytuneError(f"{ref}: tensor {key!r} is missing")
    return tuple(shapes[key])


def janus_config_kwargs(config: dict, shapes: dict, *, image_token_id: int | None, ref: str = "Janus checkpoint") -> dict:
    """Keyword arguments of transformers' JanusConfig (plain dicts) for a release's config + tensor shapes.

    `shapes` maps the original's keys to shapes (a state dict's, or a full-size layout's without
    weights). Raises ProxytuneError where the release's generation head cannot be expressed in
    transformers' Janus (its projection and the language model must have one width)."""
    language = {k: v for k, v in config["language_config"].items() if k not in ("model_type", "torch_dtype", "dtype")}
    language.update(tie_word_embeddings=False)
    hidden = language.get("hidden_size")
    tower = SIGLIP_TOWERS[config["vision_config"]["params"]["model_name"]]
    width = _shape(shapes, "vision_model.vision_tower.norm.weight", ref)[0]
    patch = _shape(shapes, "vision_model.vision_tower.patch_embed.proj.weight", ref)[-1]
    positions = _shape(shapes, "vision_model.vision_tower.pos_embed", ref)[1]
    image_size = config["vision_config"]["params"].get("image_size", 384)
    if patch != tower["patch_size"] or (image_size // patch) ** 2 != positions:
        raise ProxytuneError(f"{ref}: vision tower patch {patch} and {positions} positions do not fit "
                             f"image_size {image_size} of config.json")
    aligner, gen_aligner, gen_head = (config[p]["params"] for p in ("aligner_config", "gen_aligner_config", "gen_head_config"))
    vision = {"hidden_size": width, "num_attention_heads": tower["heads"], "mlp_ratio": tower["mlp_ratio"],
              "num_hidden_layers": _count(shapes, r"vision_model\.vision_tower\.blocks\.(\d+)\.norm1\.weight"),
              "image_size": image_size, "patch_size": patch, "projection_dim": aligner["n_embed"],
              "depth": aligner.get("depth", 1), "num_image_tokens": positions}
    # the VQ: fixed in the original's code (VQ_16()), so read from its tensors
    enc = "gen_vision_model.encoder."
    base = _shape(shapes, enc + "conv_in.weight", ref)[0]
    levels = _count(shapes, r"gen_vision_model\.encoder\.conv_blocks\.(\d+)\.res\.0\.conv1\.weight")
    multipliers = [_shape(shapes, f"{enc}conv_blocks.{i}.res.0.conv1.weight", ref)[0] // base for i in range(levels)]
    codebook, embed_dim = _shape(shapes, "gen_vision_model.quantize.embedding.weight", ref)
    widths = {hidden, gen_aligner["n_embed"], gen_head["n_embed"], gen_head["image_token_embed"]}
    if len(widths) != 1:  # transformers' JanusVQVAEHead has one projection width for both of the original's
        raise ProxytuneError(f"{ref}: config.json gen_head/gen_aligner widths {sorted(widths, key=str)} differ from each "
                             "other or from the language model's; transformers' Janus cannot hold that head")
    if gen_head["image_token_size"] != codebook:
        raise ProxytuneError(f"{ref}: config.json gen_head_config.params.image_token_size {gen_head['image_token_size']} "
                             f"!= the VQ codebook's {codebook} entries")
    vq = {"embed_dim": embed_dim, "num_embeddings": codebook, "base_channels": base, "channel_multiplier": multipliers,
          "num_res_blocks": _count(shapes, r"gen_vision_model\.encoder\.conv_blocks\.0\.res\.(\d+)\.conv1\.weight"),
          "latent_channels": _shape(shapes, enc + "conv_out.weight", ref)[0], "projection_dim": gen_aligner["n_embed"],
          "num_hidden_layers": gen_aligner.get("depth", 1), "image_token_embed_dim": gen_head["image_token_embed"],
          "num_patches": image_size // patch}
    kwargs = {"text_config": language, "vision_config": vision, "vq_config": vq, "tie_word_embeddings": False}
    if image_token_id is not None:
        kwargs["image_token_id"] = image_token_id
    return kwargs


def build_config(kwargs: dict, dtype: str = "bfloat16"):
    """transformers' JanusConfig from `janus_config_kwargs` (the text config a LlamaConfig, as the original's)."""
    from transformers import JanusConfig, JanusVisionConfig, JanusVQVAEConfig, LlamaConfig

    text = LlamaConfig(**kwargs["text_config"])
    config = JanusConfig(text_config=text, vision_config=JanusVisionConfig(**kwargs["vision_config"]),
                         vq_config=JanusVQVAEConfig(**kwargs["vq_config"]),
                         **{k: v for k, v in kwargs.items() if k not in ("text_config", "vision_config", "vq_config")})
    config.dtype = dtype
    config.text_config.dtype = dtype
    return config


# -----------------------------------------------------------------------------
# the whole conversion


def convert_release(src: str, out_dir: str | Path) -> dict:
    """Write transformers' Janus layout of the release `src` (folder or cached hub id) to `out_dir`.

    Returns {"dtype", "image_size", "tensors"}. The folder is staged: complete or absent.

    Raises:
        ProxytuneError: `out_dir` exists; `src` is not a multi_modality release this conversion knows;
            a weight file is unreadable, or a tensor is unknown, missing or of the wrong shape.
    """
    import torch
    from transformers import AutoTokenizer, JanusForConditionalGeneration

    from proxytune.backends import checkpoints

    out = Path(out_dir)
    if out.exists():
        raise ProxytuneError(f"{out}: already exists; choose a new folder")
    folder = resolve_source(src)
    ref = f"Janus checkpoint {src!r}"
    config = read_release_config(folder, src)
    try:
        # AutoTokenizer reads config.json and warns that multi_modality is not a type it knows
        with checkpoints.transformers_errors_only():
            tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as err:
        raise ProxytuneError(f"{ref}: cannot load its tokenizer ({first_line(err)})") from None
    if tokenizer.pad_token is None and PAD in tokenizer.get_vocab():
        tokenizer.pad_token = PAD
    weights = read_release_weights(folder, src)
    declared = str(config.get("torch_dtype", "float32"))
    dtype = getattr(torch, declared, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ProxytuneError(f"{ref}: config.json torch_dtype {declared!r} is not a floating-point dtype")
    kwargs = janus_config_kwargs(config, {k: tuple(v.shape) for k, v in weights.items()},
                                 image_token_id=tokenizer.get_vocab().get(IMAGE_TAG), ref=ref)
    janus_config = build_config(kwargs, declared)
    # in the declared dtype (the release's tensors already are: bf16), as a user's load of the original gets them
    converted = {k: v.to(dtype) if v.is_floating_point() else v for k, v in convert_state_dict(weights, ref).items()}
    del weights
    with torch.device("meta"):
        model = JanusForConditionalGeneration(janus_config)
    check_layout(model.state_dict(), converted, ref)
    model.load_state_dict(converted, strict=True, assign=True)
    _materialise_buffers(model)
    with staged_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _image_processor(folder, ref).save_pretrained(tmp)
    return {"dtype": declared, "image_size": kwargs["vision_config"]["image_size"], "tensors": len(converted)}


def _image_processor(folder: Path, ref: str):
    """transformers' Janus image processor with the release's preprocessor_config.json values (VLMImageProcessor:
    image_size, mean/std, min_size, rescale_factor, do_normalize), as transformers' own conversion sets them."""
    try:
        from transformers import JanusImageProcessorPil as processor_class  # transformers 5: no torchvision needed
    except ImportError:
        from transformers import JanusImageProcessor as processor_class

    file = folder / "preprocessor_config.json"
    try:
        original = json.loads(file.read_text()) if file.is_file() else {}
    except Exception as err:
        raise ProxytuneError(f"{ref}: cannot read {file.name} ({type(err).__name__})") from None
    kwargs = {k: original[k] for k in ("do_normalize", "image_mean", "image_std", "min_size", "rescale_factor") if k in original}
    if "image_size" in original:
        kwargs["size"] = {"height": original["image_size"], "width": original["image_size"]}
    return processor_class(**kwargs)


def check_layout(expected: dict, converted: dict, ref: str) -> None:
    """Every key of transformers' model present once with its shape (lm_head included); else one line."""
    missing = sorted(set(expected) - set(converted))
    extra = sorted(set(converted) - set(expected))
    if missing or extra:
        what = f"lacks {missing[0]!r}" if missing else f"has {extra[0]!r}, which transformers' Janus does not"
        raise ProxytuneError(f"{ref}: the converted checkpoint {what} ({len(missing)} missing, {len(extra)} unexpected)")
    for key, tensor in expected.items():
        if tuple(converted[key].shape) != tuple(tensor.shape):
            raise ProxytuneError(f"{ref}: converted tensor {key!r} has shape {tuple(converted[key].shape)}, "
                                 f"transformers' Janus expects {tuple(tensor.shape)}")


def _materialise_buffers(model) -> None:
    """Non-persistent buffers built on the meta device (rotary frequencies, position ids): rebuilt on CPU."""
    import torch

    for module in model.modules():
        for name, buffer in list(module.named_buffers(recurse=False)):
            if buffer.is_meta:
                module.register_buffer(name, torch.zeros(buffer.shape, dtype=buffer.dtype), persistent=False)
