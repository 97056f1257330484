"""Lumina-mGPT's released weights into transformers' Chameleon (used by `lumina.backend.load`).

The releases were saved by Lumina-mGPT's own Chameleon classes (lumina_mgpt/model/chameleon/), whose
q/k LayerNorms hold (model_parallel_size, head_dim) parameters; transformers' hold one row per head.
`lumina.backend.load` lets transformers load everything else and skip those (ignore_mismatched_sizes), then
`expand_qk_norms` reads them from the checkpoint and repeats them per head as the original does;
any other mismatch, or a missing language-model weight, is refused in one line.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from proxytune.errors import ProxytuneError


QK_NORM = re.compile(r"model\.layers\.\d+\.self_attn\.(q|k)_norm\.(weight|bias)")


def expand_qk_norms(model, mismatched: Iterable[tuple], stored: Callable[[str], torch.Tensor], ref: str) -> None:
    """Load Lumina-mGPT's released q/k LayerNorm parameters into transformers' per-head ones.

    Lumina-mGPT's own Chameleon (model/chameleon/modeling_chameleon.py, `ChameleonLayerNorm`) stores
    them as (model_parallel_size, head_dim) and applies row r to heads r * n .. (r + 1) * n - 1, with
    n = heads // model_parallel_size (repeat_interleave on dim 0; heads = num_key_value_heads for
    k_norm); transformers' Chameleon stores one row per head. `mismatched` are transformers'
    (key, checkpoint shape, model shape) triples and `stored(key)` reads a key from the checkpoint.

    Raises:
        ProxytuneError: a mismatched key that is not such a norm, or a norm of another shape.
    """
    config, params = model.config, dict(model.named_parameters())
    mp = getattr(config, "model_parallel_size", 1) or 1
    for key, theirs, ours in sorted(mismatched):
        match = QK_NORM.fullmatch(key)
        heads = (config.num_attention_heads if match and match[1] == "q" else config.num_key_value_heads)
        head_dim = config.hidden_size // config.num_attention_heads
        if not match or tuple(theirs) != (mp, head_dim) or tuple(ours) != (heads, head_dim) or heads % mp:
            raise ProxytuneError(f"student model {ref!r}: checkpoint key {key} has shape {tuple(theirs)}, the model "
                                 f"expects {tuple(ours)}" + ("" if not match else f" (or ({mp}, {head_dim}) per "
                                                             f"model_parallel_size {mp}, as Lumina-mGPT saves it)"))
        with torch.no_grad():
            params[key].copy_(stored(key).to(params[key].dtype).repeat_interleave(heads // mp, dim=0))


def stored_tensor(weights: str, key: str) -> torch.Tensor:
    """One tensor of a safetensors checkpoint (folder or hub id; shards with an index, or one file)."""
    from safetensors import safe_open

    if Path(weights).is_dir():
        def locate(name: str) -> str | None:
            return str(Path(weights) / name) if (Path(weights) / name).exists() else None
    else:
        from huggingface_hub import try_to_load_from_cache

        def locate(name: str) -> str | None:  # from_pretrained has just fetched the files into the cache
            found = try_to_load_from_cache(weights, name)
            return found if isinstance(found, str) else None

    index = locate("model.safetensors.index.json")
    file = json.loads(Path(index).read_text())["weight_map"][key] if index else "model.safetensors"
    with safe_open(locate(file), framework="pt") as f:
        return f.get_tensor(key)


def refuse_missing(missing_keys: list[str], weights: str, ref: str) -> None:
    """A missing language-model weight would be left at random init: refuse (the VQ encoder is filled)."""
    missing = sorted(k for k in missing_keys if ".vqmodel." not in f".{k}")
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise ProxytuneError(f"student model {ref!r}: checkpoint {weights} lacks {missing[0]}{more}")
