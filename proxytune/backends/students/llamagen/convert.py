"""Original LlamaGen text-to-image GPT checkpoints as proxytune LlamaGen students (key conversion).

LlamaGen's T2I GPT is a Llama decoder over [120 caption slots; image codes] with two
differences from transformers' Llama that a port has to carry:

1. Its attention projects q, k, v with one fused `wqkv` and rotates interleaved pairs
   (x[2i], x[2i+1]) of each head as complex numbers; transformers rotates (x[i], x[i + d/2])
   ("rotate-half"). Splitting `wqkv` and permuting the q and k rows of every head from
   interleaved to rotate-half order gives the same attention scores (q.k is unchanged when q
   and k are permuted alike; v and the output projection are untouched).
2. Its RoPE is 2D: `llamagen.model.LlamaGenStudent` carries it in its (cos, sin) tables, laid
   out for the permuted rows (see that module).

Key map (original, under ckpt["model"] -> student):

    cls_embedding.uncond_embedding             -> uncond_embedding (its first cond_len of 120 rows)
    cls_embedding.cap_proj.fc{1,2}.weight      -> cap_proj.fc{1,2}.weight
    tok_embeddings.weight                      -> backbone.embed_tokens.weight
    layers.i.attention.wqkv.weight             -> backbone.layers.i.self_attn.{q,k,v}_proj.weight (q, k permuted)
    layers.i.attention.wo.weight               -> backbone.layers.i.self_attn.o_proj.weight
    layers.i.feed_forward.w1 / w3 / w2.weight  -> backbone.layers.i.mlp.gate_proj / up_proj / down_proj.weight
    layers.i.attention_norm.weight             -> backbone.layers.i.input_layernorm.weight
    layers.i.ffn_norm.weight                   -> backbone.layers.i.post_attention_layernorm.weight
    norm.weight                                -> backbone.norm.weight
    output.weight                              -> lm_head.weight

The architecture is read from the checkpoint's shapes (`config_from_state_dict`): width, vocabulary,
caption width, depth and FFN width; the head count from the original's GPT presets by width (or
given). The CFG-null caption has 120 rows in every original checkpoint (its CaptionEmbedder always
allocates 120, whatever cls_token_num), and the original reads its first cls_token_num rows
(120 for the released T2I models, the default here).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from proxytune.backends import checkpoints
from proxytune.backends.students.llamagen.model import ARStudentConfig, LlamaGenStudent, LlamaGenStudentConfig, head_dim
from proxytune.backends.students import meta as student_meta
from proxytune.backends.students.meta import StudentMeta
from proxytune.errors import ProxytuneError, first_line
from proxytune.files import staged_dir

# Per-layer renames that are plain copies; wqkv is split and permuted separately.
LAYER_RENAMES = {
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
GLOBAL_RENAMES = {
    "cls_embedding.uncond_embedding": "uncond_embedding",
    "cls_embedding.cap_proj.fc1.weight": "cap_proj.fc1.weight",
    "cls_embedding.cap_proj.fc2.weight": "cap_proj.fc2.weight",
    "tok_embeddings.weight": "backbone.embed_tokens.weight",
    "norm.weight": "backbone.norm.weight",
    "output.weight": "lm_head.weight",
}


# -----------------------------------------------------------------------------
# conversion


ORIGINAL_UNCOND_ROWS = 120  # CaptionEmbedder's token_num: the null caption's rows in every checkpoint
ORIGINAL_COND_LEN = 120  # cls_token_num (and t5_feature_max_len) of LlamaGen's T2I training and sampling
# Heads of the original GPT presets by width (GPT-B, L, XL, XXL, 1B, XXXL, 3B, 7B); the weights do not say.
ORIGINAL_HEADS = {768: 12, 1024: 16, 1280: 20, 1536: 24, 2048: 32, 2560: 40, 3200: 32, 4096: 32}


def original_shapes(config: ARStudentConfig) -> dict[str, tuple[int, ...]]:
    """Every key of an original LlamaGen T2I GPT state dict and its shape for `config`."""
    H, V, Dt, F = config.hidden_size, config.codebook_size, config.text_dim, config.intermediate_size
    shapes = {
        "cls_embedding.uncond_embedding": (ORIGINAL_UNCOND_ROWS, Dt),
        "cls_embedding.cap_proj.fc1.weight": (H, Dt),
        "cls_embedding.cap_proj.fc2.weight": (H, H),
        "tok_embeddings.weight": (V, H),
        "norm.weight": (H,),
        "output.weight": (V, H),
    }
    for i in range(config.num_hidden_layers):
        shapes |= {
            f"layers.{i}.attention.wqkv.weight": (3 * H, H),  # LlamaGen T2I has n_kv_head == n_head
            f"layers.{i}.attention.wo.weight": (H, H),
            f"layers.{i}.feed_forward.w1.weight": (F, H),
            f"layers.{i}.feed_forward.w3.weight": (F, H),
            f"layers.{i}.feed_forward.w2.weight": (H, F),
            f"layers.{i}.attention_norm.weight": (H,),
            f"layers.{i}.ffn_norm.weight": (H,),
        }
    return shapes


def _shape(original: dict, key: str) -> tuple[int, ...]:
    if key not in original:
        raise ProxytuneError(f"LlamaGen checkpoint: missing key {key} (not a LlamaGen T2I GPT state dict)")
    return tuple(original[key].shape)


def config_from_state_dict(
    original: dict[str, torch.Tensor],
    *,
    grid_size: int,
    cond_len: int = ORIGINAL_COND_LEN,
    num_heads: int | None = None,
) -> LlamaGenStudentConfig:
    """The architecture of an original T2I GPT state dict, read from its tensor shapes.

    Args:
        original: the checkpoint's state dict (original key names).
        grid_size: codes per image side (image size / the VQ's downsampling).
        cond_len: caption slots it was trained with (LlamaGen's --cls-token-num). Default: 120.
        num_heads: attention heads. Default: the original GPT preset of its width (`ORIGINAL_HEADS`).
    Raises:
        ProxytuneError: a key the shapes are read from is missing, an unknown width without
            num_heads, or a null caption with fewer rows than cond_len.
    """
    V, H = _shape(original, "tok_embeddings.weight")
    _, Dt = _shape(original, "cls_embedding.cap_proj.fc1.weight")
    F = _shape(original, "layers.0.feed_forward.w1.weight")[0]
    layers = 0
    while f"layers.{layers}.attention.wqkv.weight" in original:
        layers += 1
    if num_heads is None:
        if H not in ORIGINAL_HEADS:
            raise ProxytuneError(f"LlamaGen checkpoint: width {H} is none of the original GPT presets "
                                 f"({', '.join(map(str, ORIGINAL_HEADS))}); give its number of heads")
        num_heads = ORIGINAL_HEADS[H]
    rows = _shape(original, "cls_embedding.uncond_embedding")[0]
    if rows < cond_len:
        raise ProxytuneError(f"LlamaGen checkpoint: cls_embedding.uncond_embedding has {rows} rows, "
                             f"fewer than the {cond_len} caption slots")
    return LlamaGenStudentConfig(
        codebook_size=V,
        hidden_size=H,
        num_hidden_layers=layers,
        num_attention_heads=num_heads,
        intermediate_size=F,
        cond_len=cond_len,
        text_dim=Dt,
        grid_size=grid_size,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
    )


def interleaved_to_rotate_half(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Reorder q or k projection rows of each head: pair (2i, 2i + 1) -> rows (i, i + d/2).

    Args:
        weight: (num_heads * d, in) rows in the original's interleaved order.
    Returns:
        (num_heads * d, in), a new tensor.
    """
    out_dim, in_dim = weight.shape
    d = out_dim // num_heads
    return weight.reshape(num_heads, d // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def _check_keys(original: dict, config: ARStudentConfig) -> None:
    expected = original_shapes(config)
    problems = []
    missing = [k for k in expected if k not in original]
    unexpected = sorted(k for k in original if k not in expected)
    for label, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            more = f" (+{len(keys) - 3} more)" if len(keys) > 3 else ""
            problems.append(f"{label} keys {', '.join(keys[:3])}{more}")
    uncond = "cls_embedding.uncond_embedding"
    for key, shape in expected.items():
        if key not in original:
            continue
        if not original[key].is_floating_point():
            problems.append(f"{key} is {original[key].dtype}, not floating-point weights")
        got = tuple(original[key].shape)
        if key == uncond:  # any number of rows that covers the caption slots (the original: 120)
            if len(got) != 2 or got[1] != config.text_dim or got[0] < config.cond_len:
                problems.append(f"{key} has shape {got}, config expects (>= {config.cond_len}, {config.text_dim})")
        elif got != shape:
            problems.append(f"{key} has shape {got}, config expects {shape}")
    if problems:
        raise ProxytuneError("LlamaGen checkpoint does not fit the config: " + "; ".join(problems[:5]))


def convert_state_dict(original: dict[str, torch.Tensor], config: ARStudentConfig) -> dict[str, torch.Tensor]:
    """Original LlamaGen T2I GPT weights -> a `LlamaGenStudent` state dict (see the module's key map).

    Plain renames keep the caller's tensors (no copy); q, k, v and the null caption's rows are new tensors.

    Args:
        original: the checkpoint's state dict (ckpt["model"]), original key names.
        config: the architecture it was trained with (`config_from_state_dict`, `llamagen.model.llamagen_t2i_xl()`).
    Raises:
        ProxytuneError: a key is missing or unexpected, or a shape disagrees with `config`.
        ValueError: the head width cannot carry the 2D RoPE.
    """
    head_dim(config)
    _check_keys(original, config)
    H, heads = config.hidden_size, config.num_attention_heads
    state = {new: original[old] for old, new in GLOBAL_RENAMES.items()}
    # the original slices its 120-row null caption to the caption slots in every forward
    state["uncond_embedding"] = original["cls_embedding.uncond_embedding"][: config.cond_len].clone()
    for i in range(config.num_hidden_layers):
        src, dst = f"layers.{i}.", f"backbone.layers.{i}."
        q, k, v = original[src + "attention.wqkv.weight"].split(H, dim=0)  # (H, H) each
        state[dst + "self_attn.q_proj.weight"] = interleaved_to_rotate_half(q, heads)
        state[dst + "self_attn.k_proj.weight"] = interleaved_to_rotate_half(k, heads)
        state[dst + "self_attn.v_proj.weight"] = v.clone()  # not a view into the whole wqkv
        for old, new in LAYER_RENAMES.items():
            state[dst + new] = original[src + old]
    return state


def read_original_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The weights of a LlamaGen checkpoint file (see `checkpoints.read_state_dict`)."""
    state = checkpoints.read_state_dict(path, label="LlamaGen checkpoint")
    return checkpoints.tensors_only(state, label=f"LlamaGen checkpoint {str(path)!r}")


def load_original_checkpoint(
    path: str | Path,
    config: LlamaGenStudentConfig | None = None,
    *,
    grid_size: int = 16,
    cond_len: int = ORIGINAL_COND_LEN,
    num_heads: int | None = None,
    dtype: torch.dtype | None = None,
) -> LlamaGenStudent:
    """Build a `LlamaGenStudent` from an original LlamaGen T2I GPT checkpoint.

    The model is built on the meta device and takes the converted tensors as they are, so the
    full-size model is never random-initialised first.

    Args:
        path: a LlamaGen `.pt` / `.pth` checkpoint (or a `.safetensors` file with the original keys).
        config: its architecture. Default: read from the checkpoint (`config_from_state_dict` with
            grid_size, cond_len and num_heads).
        grid_size, cond_len, num_heads: see `config_from_state_dict` (used when config is None).
        dtype: cast floating weights to this dtype. Default: None (keep the checkpoint's).
    Returns:
        The model on the CPU in eval mode (not frozen).
    Raises:
        ProxytuneError: any failure to read or convert it, as one line naming the file (and the key
            where one is at fault).
    """
    original = read_original_state_dict(path)
    try:
        if config is None:
            config = config_from_state_dict(original, grid_size=grid_size, cond_len=cond_len, num_heads=num_heads)
        state = convert_state_dict(original, config)
        if dtype is not None:
            state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        with torch.device("meta"):
            model = LlamaGenStudent(config)
        model.load_state_dict(state, strict=True, assign=True)
        left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if left:  # every tensor of the model must have come from the checkpoint
            raise ProxytuneError(f"not loaded from the checkpoint: {', '.join(left)}")
    except ProxytuneError as err:
        raise ProxytuneError(f"{str(path)!r}: {err}") from None
    except Exception as err:  # any other failure is still one line naming the file
        raise ProxytuneError(f"LlamaGen checkpoint {str(path)!r}: cannot build the model from it "
                             f"({first_line(err)})") from None
    return model.eval()


# -----------------------------------------------------------------------------
# a student folder from the original files

DEFAULT_IMAGE_SIZE = 256  # t2i_XL_stage1_256.pt's


def trained_image_size(path: str | Path) -> int | None:
    """The --image-size a LlamaGen checkpoint was trained at, from the "args" train_t2i.py saves with
    it (an argparse.Namespace); None when the file holds no such record (or is not readable: the
    weights' reader says why). Memory-maps the file, so the weights are not read twice."""
    import argparse

    path = Path(path)
    if path.suffix == ".safetensors" or not path.is_file():
        return None
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # e.g. an old (non-zip) file that cannot be memory-mapped
        return None
    size = getattr(ckpt.get("args"), "image_size", None) if isinstance(ckpt, dict) else None
    return size if isinstance(size, int) and size > 0 else None


def resolve_image_size(gpt_checkpoint: str | Path, image_size: int | None) -> tuple[int, str | None]:
    """(the size to convert for, a note for the user or None): the given size, else the trained one,
    else 256; the note says when a given size differs from the one the checkpoint was trained at."""
    trained = trained_image_size(gpt_checkpoint)
    note = None
    if image_size is not None and trained is not None and image_size != trained:
        note = f"{gpt_checkpoint} was trained at {trained} px; converting for {image_size} px"
    return image_size or trained or DEFAULT_IMAGE_SIZE, note


def _text_encoder_ref(text_encoder: str | Path) -> str:
    """An existing folder as an absolute path (the student folder must load from anywhere); else a hub id.

    Raises:
        ProxytuneError: a path that looks local (./, ../, ~, /) but is not a folder.
    """
    local = Path(text_encoder).expanduser()
    if local.is_dir():
        return str(local.resolve())
    if str(text_encoder).startswith((".", "/", "~")) or local.exists():
        raise ProxytuneError(f"text encoder {str(text_encoder)!r}: not a folder (give a T5 folder or a hub id)")
    return str(text_encoder)


def _vq_factor(vq_folder: Path) -> int:
    """Pixels per code side of a diffusers VQModel folder (2 ** (levels - 1))."""
    try:
        config = json.loads((vq_folder / "config.json").read_text())
        return 2 ** (len(config["block_out_channels"]) - 1)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ProxytuneError(f"{vq_folder}: not a diffusers VQModel folder ({err})") from None


def convert_to_student_folder(
    gpt_checkpoint: str | Path,
    out_dir: str | Path,
    *,
    vq_folder: str | Path,
    config: LlamaGenStudentConfig | None = None,
    image_size: int | None = None,
    cond_len: int = ORIGINAL_COND_LEN,
    num_heads: int | None = None,
    text_encoder: str = "google/flan-t5-xl",
) -> Path:
    """Write a proxytune student folder (the llamagen backend) from an original T2I GPT checkpoint.

    The GPT weights are converted (`load_original_checkpoint`, architecture read from the
    checkpoint, the code grid from image_size and the VQ's downsampling) and saved as
    `transformer/`; the VQ tokenizer is copied from `vq_folder`, a diffusers VQModel folder; the T5
    caption encoder is not copied but named (hub id, or a folder as an absolute path) in
    proxytune_student.json, which `backend.load` follows.

    Args:
        gpt_checkpoint: t2i_XL_stage1_256.pt (image_size 256) or t2i_XL_stage2_512.pt (512).
        out_dir: the new folder (must not exist).
        vq_folder: the VQ tokenizer as a diffusers VQModel folder (config.json + weights).
        config: the GPT architecture. Default: read from the checkpoint.
        image_size: pixels per side of the checkpoint's images. Default: the size its training
            arguments record (`trained_image_size`), else 256.
        cond_len: caption slots (LlamaGen's --cls-token-num). Default: 120.
        num_heads: attention heads. Default: the original preset of the checkpoint's width.
        text_encoder: T5 encoder (and tokenizer) hub id or folder.
    Raises:
        ProxytuneError: an existing out_dir, a VQ folder that is not one, an image size the VQ does
            not divide, a text-encoder path that is not a folder, or a bad checkpoint.
    """
    out_dir, vq_folder = Path(out_dir), Path(vq_folder)
    if out_dir.exists():
        raise ProxytuneError(f"{out_dir}: already exists; choose a new folder")
    if not (vq_folder / "config.json").is_file():
        raise ProxytuneError(f"{vq_folder}: not a diffusers VQModel folder (no config.json)")
    factor = _vq_factor(vq_folder)
    image_size, _ = resolve_image_size(gpt_checkpoint, image_size)
    if image_size % factor:
        raise ProxytuneError(f"image size {image_size}: not a multiple of the VQ's downsampling {factor}")
    text_encoder = _text_encoder_ref(text_encoder)
    model = load_original_checkpoint(gpt_checkpoint, config, grid_size=image_size // factor, cond_len=cond_len,
                                     num_heads=num_heads)
    with staged_dir(out_dir) as tmp:
        model.save_pretrained(tmp / "transformer", safe_serialization=True)
        shutil.copytree(vq_folder, tmp / "vqvae")
        meta = {"backend": "llamagen", "image_size": image_size, "text_encoder": text_encoder,
                "tokenizer": text_encoder}
        student_meta.write(tmp, StudentMeta.parse(meta), indent=2)
    return out_dir
