"""StyleAR's released weights (Ani2017/StyleAR on the hub, code wuyi2020/StyleAR), on Lumina-mGPT-7B-768.

How the release is read (wuyi2020/StyleAR, `lumina_mgpt/inference_solver.py` and `LoraModel.py`):
- `stylear_models/model.safetensors` (safetensors.torch.load_file): the LoRA of rank 4 that
  `ChameleonSdpaAttentionLora`, `ChameleonMLPLora` and `LMHeadLora` add beside q/k/v/o_proj, down_proj
  and lm_head; `LinearLora` holds `A` (in_features, r) and `B` (r, out_features), no bias, no scaling
  (output + x @ A @ B). Keys `model.layers.{i}.self_attn.{q,k,v,o}_proj_lora.{A,B}`,
  `model.layers.{i}.mlp.down_proj_lora.{A,B}`, `lm_head.lm_head_lora.{A,B}`; the solver copies only
  these names (any other key of the file is ignored).
- `stylear_models/image_proj.pth` (torch.load): the `Resampler(dim=4096, depth=4, dim_head=64,
  heads=12, num_queries=16, embedding_dim=1280, output_dim=4096, ff_mult=4)` state dict, its own
  parameter names (latents, proj_in, layers.{i}.0 attention, layers.{i}.1 feed-forward, proj_out, norm_out).
- Both are cast on loading (`.to(self.dtype)`, bf16 by default): the files' own dtype is not in the
  code (not known: the builder writes either).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

LORA_RANK = 4  # inference_solver.py: lora_rank = 4
NUM_LAYERS = 32  # the solver's loop over Lumina-mGPT-7B's layers


def lora_shapes(config: dict, r: int = LORA_RANK) -> dict[str, tuple[int, ...]]:
    """Every LoRA tensor of model.safetensors at a Chameleon config's sizes (config.json fields)."""
    h, heads = config["hidden_size"], config["num_attention_heads"]
    kv, inter, vocab = config["num_key_value_heads"] * (h // heads), config["intermediate_size"], config["vocab_size"]
    shapes = {"lm_head.lm_head_lora.A": (h, r), "lm_head.lm_head_lora.B": (r, vocab)}
    for i in range(config["num_hidden_layers"]):
        for name, (n_in, n_out) in {"self_attn.q_proj": (h, h), "self_attn.k_proj": (h, kv), "self_attn.v_proj": (h, kv),
                                    "self_attn.o_proj": (h, h), "mlp.down_proj": (inter, h)}.items():
            shapes[f"model.layers.{i}.{name}_lora.A"] = (n_in, r)
            shapes[f"model.layers.{i}.{name}_lora.B"] = (r, n_out)
    return shapes


def lora_state(model, r: int = LORA_RANK, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random A (in, r), B (r, out) under StyleAR's names for every module its solver wraps, at the sizes
    of `model` (a Chameleon); B is not zero, so the LoRA changes the logits."""
    g = torch.Generator().manual_seed(seed)
    config = model.config
    shapes = lora_shapes({"hidden_size": config.hidden_size, "num_attention_heads": config.num_attention_heads,
                          "num_key_value_heads": config.num_key_value_heads, "vocab_size": model.lm_head.out_features,
                          "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_hidden_layers}, r)
    return {key: torch.randn(shape, generator=g) * 0.5 for key, shape in shapes.items()}


def resampler_shapes(c) -> dict[str, tuple[int, ...]]:
    """The original Resampler's parameters (apply_pos_emb False, no mean-pooled latents) for a
    `style_tokens.ResamplerConfig`-like `c`."""
    inner = c.heads * c.dim_head
    shapes = {"latents": (1, c.num_queries, c.dim), "proj_in.weight": (c.dim, c.embedding_dim), "proj_in.bias": (c.dim,),
              "proj_out.weight": (c.output_dim, c.dim), "proj_out.bias": (c.output_dim,),
              "norm_out.weight": (c.output_dim,), "norm_out.bias": (c.output_dim,)}
    for i in range(c.depth):
        p = f"layers.{i}."
        shapes.update({p + "0.norm1.weight": (c.dim,), p + "0.norm1.bias": (c.dim,), p + "0.norm2.weight": (c.dim,),
                       p + "0.norm2.bias": (c.dim,), p + "0.to_q.weight": (inner, c.dim),
                       p + "0.to_kv.weight": (2 * inner, c.dim), p + "0.to_out.weight": (c.dim, inner),
                       p + "1.0.weight": (c.dim,), p + "1.0.bias": (c.dim,),
                       p + "1.1.weight": (c.dim * c.ff_mult, c.dim), p + "1.3.weight": (c.dim, c.dim * c.ff_mult)})
    return shapes


def resampler_state(c, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under the original Resampler's names (LayerNorms not at identity)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in resampler_shapes(c).items():
        layer_norm = re.fullmatch(r"(layers\.\d+\.(0\.norm[12]|1\.0)|norm_out)\.weight", key)
        state[key] = (1.0 if layer_norm else 0.0) + torch.randn(shape, generator=g) * 0.3
    return state


def build(folder: Path, lora: dict[str, torch.Tensor], resampler: dict[str, torch.Tensor], *,
          dtype: torch.dtype = torch.bfloat16, extra: dict[str, torch.Tensor] | None = None) -> Path:
    """Write `stylear_models/` as the solver reads it: model.safetensors (LoRA, plus `extra` keys the
    solver ignores) and image_proj.pth, in `dtype`."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.to(dtype).contiguous() for k, v in {**lora, **(extra or {})}.items()}
    save_file(tensors, str(folder / "model.safetensors"))
    torch.save({k: v.to(dtype) for k, v in resampler.items()}, folder / "image_proj.pth")
    return folder
