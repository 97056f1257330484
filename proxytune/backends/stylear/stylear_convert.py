"""StyleAR's released weights as proxytune files: the resampler's and the LoRA's original layouts.

`proxytune convert stylear` turns StyleAR's released folder (model.safetensors: its LoRA on
Lumina-mGPT; image_proj.pth: the perceiver resampler) into a style student folder that
`style_student.StyleStudent.load` reads:

- `resampler_from_original` / `resampler_to_original`: the original `Resampler`'s key names <->
  `style_tokens.StyleResampler`;
- `lora_to_peft` / `lora_from_peft` / `write_peft_adapter`: StyleAR's own LoRA layout
  (`model.safetensors`) <-> peft names on transformers' ChameleonForConditionalGeneration;
- `convert_released`: the whole folder.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from proxytune.backends.stylear.style_student import STYLE_META
from proxytune.backends.stylear.style_tokens import (CFG_SCALE, CLIP_HIDDEN_LAYER, CLIP_VISION_MODEL, NOISE_STRENGTH, PLACEHOLDER,
                                             STYLE_PROMPT_TEMPLATE, STYLEAR_RESAMPLER, ResamplerConfig, StyleResampler,
                                             save_resampler)
from proxytune.errors import ProxytuneError


def _original_names(depth: int) -> dict[str, str]:
    """Original Resampler parameter name -> StyleResampler name."""
    names = {"latents": "queries", "proj_in.weight": "input_proj.weight", "proj_in.bias": "input_proj.bias",
             "proj_out.weight": "output_proj.weight", "proj_out.bias": "output_proj.bias",
             "norm_out.weight": "output_norm.weight", "norm_out.bias": "output_norm.bias"}
    per_layer = {"0.norm1.weight": "norm_media.weight", "0.norm1.bias": "norm_media.bias",
                 "0.norm2.weight": "norm_queries.weight", "0.norm2.bias": "norm_queries.bias",
                 "0.to_q.weight": "query.weight", "0.to_kv.weight": "key_value.weight", "0.to_out.weight": "attn_out.weight",
                 "1.0.weight": "ff_norm.weight", "1.0.bias": "ff_norm.bias",
                 "1.1.weight": "ff_up.weight", "1.3.weight": "ff_down.weight"}
    for i in range(depth):
        names.update({f"layers.{i}.{k}": f"blocks.{i}.{v}" for k, v in per_layer.items()})
    return names


def resampler_from_original(state: dict[str, torch.Tensor], *, dim_head: int = 64,
                            label: str = "image_proj.pth") -> StyleResampler:
    """A StyleResampler holding the weights of an original `Resampler` state dict (its own key names,
    as image_proj.pth stores them: the solver copies image_proj.pth[name] into each parameter name).

    The sizes are read from the tensors; heads = inner width / dim_head (the inner width is all the
    weights tell; StyleAR: 768 = 12 x 64). Position embeddings and mean-pooled latents (off in StyleAR)
    are refused, as are missing, unexpected or misshapen keys."""
    if any(k.startswith(("pos_emb.", "to_latents_from_mean_pooled_seq.")) for k in state):
        raise ProxytuneError(f"{label}: a resampler with position embeddings or mean-pooled latents "
                             "(StyleAR uses neither) is not supported")
    try:
        latents, proj_in, proj_out = state["latents"], state["proj_in.weight"], state["proj_out.weight"]
        inner, ff = state["layers.0.0.to_q.weight"].shape[0], state["layers.0.1.1.weight"].shape[0]
    except KeyError as err:
        raise ProxytuneError(f"{label}: not a StyleAR resampler state dict (no {err.args[0]!r})") from None
    depth = len({k.split(".")[1] for k in state if k.startswith("layers.")})
    dim = latents.shape[-1]
    if inner % dim_head or ff % dim:
        raise ProxytuneError(f"{label}: inner width {inner} / dim_head {dim_head} or FF width {ff} / dim {dim} "
                             "is not whole")
    config = ResamplerConfig(dim=dim, depth=depth, dim_head=dim_head, heads=inner // dim_head,
                             num_queries=latents.shape[1], embedding_dim=proj_in.shape[1],
                             output_dim=proj_out.shape[0], ff_mult=ff // dim)
    names = _original_names(depth)
    unexpected = sorted(set(state) - set(names))
    missing = sorted(set(names) - set(state))
    if unexpected or missing:
        raise ProxytuneError(f"{label}: keys do not match a depth-{depth} resampler (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]})")
    module = StyleResampler(config)
    ours = module.state_dict()
    for theirs, mine in names.items():
        if tuple(state[theirs].shape) != tuple(ours[mine].shape):
            raise ProxytuneError(f"{label}: {theirs} has shape {tuple(state[theirs].shape)}, "
                                 f"expected {tuple(ours[mine].shape)}")
    module.load_state_dict({mine: state[theirs].float() for theirs, mine in names.items()})
    return module


def resampler_to_original(module: StyleResampler) -> dict[str, torch.Tensor]:
    """The inverse of `resampler_from_original`: the state dict under the original's key names."""
    ours = module.state_dict()
    return {theirs: ours[mine].clone() for theirs, mine in _original_names(module.config.depth).items()}


# StyleAR LoRA: the solver wraps every layer's self_attn (q/k/v/o_proj_lora) and mlp (down_proj_lora)
# and lm_head (lm_head_lora); LinearLora computes x @ A @ B with A (in, r), B (r, out), no scaling.
_STYLEAR_LORA = re.compile(r"^(?P<parent>model\.layers\.\d+\.(?P<block>self_attn|mlp)|lm_head)"
                           r"\.(?P<leaf>q_proj|k_proj|v_proj|o_proj|down_proj|lm_head)_lora\.(?P<part>[AB])$")
_LEAVES = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("down_proj",), None: ("lm_head",)}
PEFT_PREFIX = "base_model.model."
LORA_TARGETS = r".*\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.down_proj)|lm_head"  # peft fullmatch regex


def lora_to_peft(state: dict[str, torch.Tensor], *, label: str = "model.safetensors") -> tuple[dict[str, torch.Tensor], int]:
    """(peft adapter state dict, rank) from StyleAR's LoRA layout.

    The original wraps a layer's self_attn and mlp, and lm_head, in modules whose LoRA sits beside
    the wrapped linear: `model.layers.{i}.self_attn.q_proj_lora.A` is the LoRA of
    `model.layers.{i}.self_attn.q_proj` (likewise k/v/o, `mlp.down_proj_lora`), `lm_head.lm_head_lora.A`
    that of `lm_head`. Each becomes `base_model.model.<module>.lora_A.weight` = A transposed (B likewise
    to lora_B), so that with lora_alpha = r (peft scale 1) peft adds exactly x @ A @ B to the
    projection's output, as the original's LinearLora does."""
    out, rank = {}, None
    for key, value in state.items():
        m = _STYLEAR_LORA.match(key)
        if m is None or m.group("leaf") not in _LEAVES[m.group("block")]:
            raise ProxytuneError(f"{label}: {key!r} is not a StyleAR LoRA key")
        if value.ndim != 2:
            raise ProxytuneError(f"{label}: {key!r} has shape {tuple(value.shape)}, not a matrix")
        r = value.shape[1] if m.group("part") == "A" else value.shape[0]
        if rank is not None and r != rank:
            raise ProxytuneError(f"{label}: {key!r} has rank {r}, others {rank}")
        rank = r
        module = m.group("parent") if m.group("leaf") == "lm_head" else f"{m.group('parent')}.{m.group('leaf')}"
        out[f"{PEFT_PREFIX}{module}.lora_{m.group('part')}.weight"] = value.t().contiguous()
    if rank is None:
        raise ProxytuneError(f"{label}: no StyleAR LoRA keys")
    for module in {k.rsplit(".", 2)[0] for k in out}:
        if f"{module}.lora_A.weight" not in out or f"{module}.lora_B.weight" not in out:
            raise ProxytuneError(f"{label}: {module.removeprefix(PEFT_PREFIX)} lacks its A or B")
    return out, rank


def lora_from_peft(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `lora_to_peft` (peft keys without adapter names, lora_alpha = r). Other keys
    (peft saves lm_head's base weight beside its LoRA when lm_head is a target) are refused."""
    out = {}
    for key, value in state.items():
        if not key.endswith((".lora_A.weight", ".lora_B.weight")):
            raise ProxytuneError(f"{key!r}: not a LoRA weight (save the adapter with save_embedding_layers=False)")
        module, part = key.removeprefix(PEFT_PREFIX).rsplit(".", 2)[:2]  # "....q_proj", "lora_A"
        parent, leaf = module.rsplit(".", 1) if "." in module else (module, module)
        out[f"{parent}.{leaf}_lora.{part[-1]}"] = value.t().contiguous()
    return out


def write_peft_adapter(state: dict[str, torch.Tensor], folder: str | Path, *, base_model: str) -> Path:
    """A peft LoRA adapter folder (adapter_config.json + adapter_model.safetensors) holding StyleAR's
    LoRA; `PeftModel.from_pretrained(chameleon, folder)` reproduces the original's forward."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    weights, rank = lora_to_peft(state)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, bias="none", target_modules=LORA_TARGETS,
               base_model_name_or_path=base_model).save_pretrained(str(folder))
    save_file(weights, str(folder / "adapter_model.safetensors"))
    return folder / "adapter_model.safetensors"


# -- the released weights -> a proxytune style folder ----------------------------------------------
LUMINA_BASE = "Alpha-VLLM/Lumina-mGPT-7B-768"  # inference.py's model_path


def convert_released(model_dir: str | Path, out: str | Path, *, base_model: str = LUMINA_BASE,
                     dim_head: int = STYLEAR_RESAMPLER.dim_head) -> dict:
    """StyleAR's released folder (model.safetensors: its LoRA; image_proj.pth: the resampler) -> OUT
    with adapter/ (peft LoRA for `base_model`), style_resampler/ (resampler.safetensors + .json) and
    proxytune_style.json (the original's inference settings). image_proj.pth is read with
    torch.load(weights_only=True); keys of model.safetensors without "_lora." are ignored, as the
    original's solver ignores them. Returns the metadata written."""
    from proxytune.backends.checkpoints import read_state_dict
    from proxytune.files import staged_dir

    model_dir, out = Path(model_dir), Path(out)
    if out.exists():
        raise ProxytuneError(f"{out}: already exists; choose a new folder")
    lora_file, proj_file = model_dir / "model.safetensors", model_dir / "image_proj.pth"
    weights = read_state_dict(lora_file, label="StyleAR LoRA")
    lora = {k: v for k, v in weights.items() if "_lora." in k}
    resampler = resampler_from_original(read_state_dict(proj_file, label="StyleAR image_proj.pth"), dim_head=dim_head,
                                        label=str(proj_file))
    _, rank = lora_to_peft(lora, label=str(lora_file))
    meta = {"method": "stylear", "backend": "lumina-mgpt", "base_model": base_model, "adapter": "adapter",
            "resampler": "style_resampler", "lora_rank": rank, "lora_modules": len(lora) // 2,
            "ignored_keys": len(weights) - len(lora), "num_style_tokens": resampler.config.num_queries,
            "placeholder": PLACEHOLDER, "prompt_template": STYLE_PROMPT_TEMPLATE, "clip_vision_model": CLIP_VISION_MODEL,
            "clip_hidden_layer": CLIP_HIDDEN_LAYER, "noise_strength": NOISE_STRENGTH, "cfg_scale": CFG_SCALE,
            "top_k": 2000, "temperature": 1.0}
    with staged_dir(out) as tmp:
        write_peft_adapter(lora, tmp / "adapter", base_model=base_model)
        save_resampler(resampler, tmp / "style_resampler")
        (tmp / STYLE_META).write_text(json.dumps(meta, indent=2) + "\n")
    return meta
