"""What a Lumina-mGPT checkpoint's config.json must say for `lumina.load` to load it.

Import-light on purpose (no torch): the model pre-flight and `proxytune convert lumina-mgpt` read the
config before any weights are touched. The released 7B folders (Alpha-VLLM/Lumina-mGPT-7B-512/768/1024)
and transformers' own Chameleon conversions both pass.
"""

from __future__ import annotations

DTYPES = ("bfloat16", "float16", "float32")
VQ_FACTOR = 16  # Lumina-mGPT's size tokens count 32 px, two codes of Chameleon's x16 VQ


def config_problem(config: dict) -> str | None:
    """The first reason `config` (a parsed config.json) is not a Lumina-mGPT checkpoint proxytune
    loads, or None. Each reason names the field."""
    if config.get("model_type") != "chameleon":
        return f"model_type {config.get('model_type')!r} is not 'chameleon' (Lumina-mGPT's Chameleon)"
    heads = config.get("num_attention_heads", 32)
    kv_heads = config.get("num_key_value_heads") or heads
    mp = config.get("model_parallel_size") or 1
    if heads % mp or kv_heads % mp:  # the released q/k norms hold one row per model-parallel shard
        return (f"model_parallel_size {mp} divides neither num_attention_heads {heads} nor num_key_value_heads "
                f"{kv_heads} (Lumina-mGPT applies each shard's q/k norm to heads // model_parallel_size heads)")
    dtype = config.get("torch_dtype", config.get("dtype"))
    if dtype is not None and dtype not in DTYPES:
        return f"torch_dtype {dtype!r} is not one of {', '.join(DTYPES)}"
    levels = len((config.get("vq_config") or {}).get("channel_multiplier", [1, 1, 2, 2, 4]))
    if 2 ** (levels - 1) != VQ_FACTOR:
        return f"vq_config.channel_multiplier has {levels} levels: an x{2 ** (levels - 1)} VQ, not Chameleon's x16"
    if not config.get("vocabulary_map"):
        return "no vocabulary_map (Chameleon's token names: the image tokens and Lumina-mGPT's special tokens)"
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
