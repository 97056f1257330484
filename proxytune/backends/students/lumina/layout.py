"""Lumina-mGPT's token names and what its config.json must say for `lumina.backend.load` to load it.

Import-light on purpose (no torch): the model pre-flight and `proxytune convert lumina-mgpt` read the
config before any weights are touched, and `lumina` takes its token names from here. The released 7B
folders (Alpha-VLLM/Lumina-mGPT-7B-512/768/1024) and transformers' own Chameleon conversions both pass.
"""

from __future__ import annotations

IMAGE_START = "<racm3:break>"
IMAGE_END = "<eoss>"
ROW_END = "<reserved08799>"
END_OF_TURN = "<reserved08706>"  # the conversation template's separator: closes the prompt and the image turn
SIZE_BASE = 8800  # <reserved{8800 + n}>: n steps of SIZE_UNIT pixels
SIZE_UNIT = 32  # the item processor's patch size: two codes of Chameleon's x16 VQ
VQ_FACTOR = 16
DTYPES = ("bfloat16", "float16", "float32")


def size_token(pixels: int) -> str:
    """Lumina-mGPT's token for an image height or width: <reserved{8800 + pixels / 32}>."""
    return f"<reserved{SIZE_BASE + pixels // SIZE_UNIT:05d}>"


def image_token_name(code: int) -> str:
    """Chameleon's name of image code `code`: digits written as letters A-J, between IMGIMG and Z."""
    return "IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(code)) + "Z"


def config_problem(config: dict, image_size: int | None = None) -> str | None:
    """The first reason `config` (a parsed config.json) is not a Lumina-mGPT checkpoint proxytune loads,
    or None. Each reason names the field. Defaults are ChameleonConfig's.

    Lumina-mGPT's q/k norms hold one (head_dim) row per model-parallel rank, repeated over that rank's heads,
    so model_parallel_size must divide the query and the key/value heads. `image_size`, when given, must
    have its size token in the vocabulary.
    """
    if config.get("model_type") != "chameleon":
        return f"model_type {config.get('model_type')!r} is not 'chameleon' (Lumina-mGPT's Chameleon)"
    dtype = config.get("torch_dtype", config.get("dtype"))
    if dtype is not None and dtype not in DTYPES:
        return f"torch_dtype {dtype!r} is not one of {', '.join(DTYPES)}"
    vq = config.get("vq_config") or {}
    levels = vq.get("channel_multiplier", [1, 1, 2, 2, 4]) if isinstance(vq, dict) else None
    if not isinstance(levels, list):
        return "vq_config must be an object with a channel_multiplier list (ChameleonVQVAEConfig)"
    if 2 ** (len(levels) - 1) != VQ_FACTOR:
        return (f"vq_config.channel_multiplier gives an x{2 ** (len(levels) - 1)} VQ; Lumina-mGPT's size tokens need "
                f"Chameleon's x{VQ_FACTOR} (channel_multiplier of 5 levels)")
    heads = config.get("num_attention_heads", 32)
    kv_heads = config.get("num_key_value_heads") or heads
    parallel = config.get("model_parallel_size") or 1
    if not all(isinstance(n, int) and n >= 1 for n in (heads, kv_heads, parallel)):
        return (f"num_attention_heads {heads!r}, num_key_value_heads {kv_heads!r} and model_parallel_size "
                f"{parallel!r} must be positive integers")
    if heads % parallel or kv_heads % parallel:
        return (f"model_parallel_size {parallel} does not divide num_attention_heads {heads} and num_key_value_heads "
                f"{kv_heads} (its q/k norms hold one row per model-parallel rank)")
    vocab = config.get("vocabulary_map")
    if not isinstance(vocab, dict) or not vocab:
        return ("no vocabulary_map: proxytune finds Lumina-mGPT's image, size and turn tokens by name in it "
                "(the released config.json holds Chameleon's whole map)")
    wanted = [IMAGE_START, IMAGE_END, ROW_END, END_OF_TURN]
    if isinstance(image_size, int):
        if image_size % SIZE_UNIT:
            return f"image_size {image_size} is not a multiple of {SIZE_UNIT} px (Lumina-mGPT's size tokens count 32 px steps)"
        wanted.append(size_token(image_size))
    codes = vq.get("num_embeddings", 8192)
    if not isinstance(codes, int) or codes < 1:
        return f"vq_config.num_embeddings {codes!r} is not a codebook size"
    if codes <= len(vocab):  # else the codes' tokens cannot all be there: counted, not listed
        wanted += [image_token_name(code) for code in range(codes)]
    missing = [name for name in wanted if name not in vocab] + [f"IMGIMG tokens of {codes} codes"] * (codes > len(vocab))
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        return (f"vocabulary_map lacks {', '.join(missing[:3])}{more} (Lumina-mGPT's tokens; use the config.json the "
                "checkpoint was released with)")
    return None


def read_config(model: str) -> dict | None:
    """config.json of a folder, or of a hub id already in the local hub cache (no download); None
    when neither has one.

    Raises:
        ValueError: the file is not JSON.
    """
    import json
    from pathlib import Path

    if Path(model).is_dir():
        file = Path(model) / "config.json"
        return json.loads(file.read_text()) if file.is_file() else None
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(model, "config.json")
    except Exception:  # not a valid repo id: the loader says so
        return None
    return json.loads(Path(cached).read_text()) if isinstance(cached, str) else None
