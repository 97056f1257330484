"""Lumina-mGPT-7B-512/768/1024 (Alpha-VLLM) as released, and Chameleon's tokenizer folder.

How the release is made (read from Alpha-VLLM/Lumina-mGPT, `lumina_mgpt/`):
- `model/chameleon/convert_chameleon_weights_to_hf.py` turns Meta's Chameleon into Lumina-mGPT's own
  vendored Chameleon classes (not transformers'): q/k projections permuted for rotate-half RoPE, and
  the q/k LayerNorm weight and bias stored as (model_parallel_size, head_dim), the unsharded 7B
  branch writing `.view(head_dim // 2, 2).t().reshape(1, -1)`.
- `model/chameleon/modeling_chameleon.py` `ChameleonLayerNorm(head_dim, model_parallel_size,
  n_heads_per_mp)` holds those (mp, head_dim) parameters and applies them per head with
  `repeat_interleave(n_heads_per_mp, dim=0)` (n_heads_per_mp = num_key_value_heads // mp for k_norm).
- `finetune_solver.py` loads `ChameleonXLLMXForConditionalGeneration` (config class
  `ChameleonXLLMXConfig`: ChameleonConfig + z_loss_weight) in bfloat16, deletes `model.vqmodel`, and
  `xllmx/util/ckpt.py` saves with `save_pretrained(state_dict=...)` in bf16: safetensors shards with a
  `model.safetensors.index.json` (the hub lists two shards).
- Chameleon's tokenizer folder (`ckpts/chameleon/tokenizer/`: vqgan.ckpt, vqgan.yaml,
  text_tokenizer.json) is read separately (`data/item_processor.py`, `model/chameleon_vae_ori/`);
  vqgan.ckpt is a taming VQGAN checkpoint `{"state_dict": ...}` and vqgan.yaml its
  `model.params` (embed_dim, n_embed, ddconfig).

The tiny builder keeps every rule and shrinks only sizes (hidden 64, 4 heads of 16, 2 layers, a
9,260-entry vocabulary with Chameleon's special tokens at their real ids, 128 px images, 256 codes).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

RELEASES = ("512", "768", "1024")
# generation_config.json of all three (111 B on the hub; content from ../shared/real-configs/, exact)
GENERATION_CONFIG = {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2, "transformers_version": "4.43.3"}

# config.json fields of the released 7B models. Exact: model_type and the field names (the config
# classes above write them); bos/eos (generation_config.json is "_from_model_config" with 1 / 2);
# transformers_version (generation_config.json). Derived: the sizes from the converter's rules on
# Chameleon-7B's params (dim 4096, 32 layers, 32 heads, no n_kv_heads, mp 1, swin_norm false for 7B,
# intermediate = 256 * ceil(int(8 * 4096 / 3) / 256) = 11008, vocab 65536, norm_eps 1e-5, rope 10000).
# Reconstructed (the hub's config.json, 1.71 MB, was not found): architectures (the solver's class),
# max_position_embeddings / dropout / z_loss_weight / mask_image_logits (exps/7B.sh passes 4096 /
# 0.05 / 1e-5 / --unmask_image_logits; the released values are unknown), vq_config (the converter
# copies vqgan.yaml's params and adds the renamed keys; values are transformers' ChameleonVQVAEConfig
# defaults, which are Chameleon's VQGAN: 8192 x 256 codes, ch 128, ch_mult 1,1,2,2,4).
FULL_CONFIG = {
    "architectures": ["ChameleonXLLMXForConditionalGeneration"],
    "model_type": "chameleon",
    "torch_dtype": "bfloat16",
    "transformers_version": "4.43.3",
    "vocab_size": 65536,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "hidden_act": "silu",
    "max_position_embeddings": 4096,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-05,
    "use_cache": True,
    "pad_token_id": None,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "model_parallel_size": 1,
    "swin_norm": False,
    "mlp_bias": False,
    "mask_image_logits": False,
    "dropout": 0.05,
    "z_loss_weight": 1e-05,
}
FULL_VQ = {"embed_dim": 256, "n_embed": 8192, "double_z": False, "z_channels": 256, "resolution": 512,
           "in_channels": 3, "out_ch": 3, "ch": 128, "ch_mult": [1, 1, 2, 2, 4], "num_res_blocks": 2,
           "attn_resolutions": [], "dropout": 0.0}
FULL_VOCAB_IMAGE_TOKENS = 8192  # ids 4..8195

TINY = {"vocab_size": None, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 512, "initializer_range": 0.125}
TINY_VQ = {"embed_dim": 8, "n_embed": 256, "double_z": False, "z_channels": 32, "resolution": 128, "in_channels": 3,
           "out_ch": 3, "ch": 32, "ch_mult": [1, 1, 2, 2, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
TINY_IMAGE_SIZE = 128


def vq_config(taming: dict) -> dict:
    """config.json's vq_config as the converter writes it: vqgan.yaml's params plus the renamed keys."""
    out = dict(taming)
    for old, new in [("ch", "base_channels"), ("out_ch", "out_channels"), ("n_embed", "num_embeddings"),
                     ("ch_mult", "channel_multiplier"), ("double_z", "double_latent"), ("z_channels", "latent_channels")]:
        out[new] = out[old]
    return out


def full_config(release: str = "768") -> dict:
    """The full-size config.json of Lumina-mGPT-7B-{release} (all three share the 7B architecture; the
    image size is only in the prompt and size tokens). Its vocabulary_map holds Chameleon's special
    and image tokens at their real ids (<s> 0 .. the 8192 image tokens at 4..8195 .. <reserved08999>),
    not the text tokens of the real 65,536-entry map (Meta's gated tokenizer)."""
    if release not in RELEASES:
        raise ValueError(f"unknown release {release!r}")
    return {**FULL_CONFIG, "vq_config": vq_config(FULL_VQ), "vocabulary_map": tiny_vocabulary(FULL_VOCAB_IMAGE_TOKENS)}


def head_dim(config: dict) -> int:
    return config["hidden_size"] // config["num_attention_heads"]


def release_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor the released safetensors hold, by key, at `config`'s sizes (no vqmodel: deleted
    before saving; q/k norms (model_parallel_size, head_dim), as Lumina-mGPT's ChameleonLayerNorm)."""
    h, d, v = config["hidden_size"], head_dim(config), config["vocab_size"]
    kv, inter, mp = config["num_key_value_heads"] * d, config["intermediate_size"], config["model_parallel_size"]
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
            p + "self_attn.q_norm.weight": (mp, d), p + "self_attn.q_norm.bias": (mp, d),
            p + "self_attn.k_norm.weight": (mp, d), p + "self_attn.k_norm.bias": (mp, d),
            p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter),
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
        })
    return shapes


def tiny_vocabulary(codes: int) -> dict[str, int]:
    """Chameleon's token names at their real ids up to <reserved08999> (image tokens from id 4)."""
    from proxytune.backends.students.lumina.tiny import _tiny_vocabulary

    return _tiny_vocabulary(codes)


def write_text_tokenizer(folder: Path, codes: int) -> dict[str, int]:
    """The -768 repo's tokenizer files (tokenizer.json, tokenizer_config.json, special_tokens_map.json):
    BOS <s> added, no EOS, <pad> 1, the end of turn <reserved08706> as sep (the converter sets
    sep_token_id 8710 and pad_token_id 1), tokenizer_class LlamaTokenizer (what LlamaTokenizerFast
    writes). Reconstructed: the files' exact fields were not found; the tiny tokenizer.json is a
    byte-level BPE (transformers 5 loads it with its generic backend whatever the class says).
    Returns the whole vocabulary."""
    from transformers import AutoTokenizer

    from proxytune.backends.tokenizer import write_char_bpe_tokenizer

    entries = tiny_vocabulary(codes)
    special = [n for n in entries if n.startswith("<") and not n.startswith("<tiny-unused")]
    write_char_bpe_tokenizer(folder, entries, special=special, bos="<s>", eos="</s>", pad="<pad>", unk="<unk>",
                             model_max_length=4096)
    tok_config = json.loads((folder / "tokenizer_config.json").read_text())
    tok_config.pop("backend", None)  # transformers 5's key; the release was written by 4.43's LlamaTokenizerFast
    tok_config.update({"tokenizer_class": "LlamaTokenizer", "sep_token": "<reserved08706>", "add_bos_token": True,
                       "add_eos_token": False, "legacy": False})
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
    special_map = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "sep_token": "<reserved08706>",
                   "unk_token": "<unk>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")
    return dict(AutoTokenizer.from_pretrained(folder).get_vocab())


def tiny_config(vocab: dict[str, int], *, model_parallel_size: int = 1, num_key_value_heads: int | None = None) -> dict:
    sizes = {**TINY, "vocab_size": len(vocab)}
    if num_key_value_heads:
        sizes["num_key_value_heads"] = num_key_value_heads
    return {**FULL_CONFIG, **sizes, "model_parallel_size": model_parallel_size, "vq_config": vq_config(TINY_VQ),
            "vocabulary_map": vocab}


def random_release_state(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under the release's key and shape rules, float32 (cast on saving). The q/k norm
    parameters are random too (not LayerNorm's ones/zeros), so a wrong expansion changes the logits."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in release_shapes(config).items():
        if key.endswith("layernorm.weight") or key == "model.norm.weight" or "_norm.weight" in key:
            state[key] = 1 + 0.2 * torch.randn(shape, generator=g)
        elif key.endswith("_norm.bias"):
            state[key] = 0.2 * torch.randn(shape, generator=g)
        else:
            state[key] = config["initializer_range"] * torch.randn(shape, generator=g)
    return state


def write_shards(folder: Path, state: dict[str, torch.Tensor], dtype: torch.dtype = torch.bfloat16) -> None:
    """Two safetensors shards and model.safetensors.index.json, as save_pretrained writes them."""
    from safetensors.torch import save_file

    keys = list(state)
    half = len(keys) // 2
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    weight_map, total = {}, 0
    for name, part in zip(names, (keys[:half], keys[half:])):
        tensors = {k: state[k].to(dtype).contiguous() for k in part}
        save_file(tensors, folder / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def build(folder: Path, release: str = "768", *, seed: int = 0, model_parallel_size: int = 1,
          num_key_value_heads: int | None = None) -> dict[str, torch.Tensor]:
    """Write a tiny Alpha-VLLM/Lumina-mGPT-7B-{release} folder; returns its float32 weights (before the
    bf16 cast) for tests that compare against them."""
    if release not in RELEASES:
        raise ValueError(f"unknown release {release!r}")
    folder.mkdir(parents=True, exist_ok=True)
    vocab = write_text_tokenizer(folder, TINY_VQ["n_embed"])
    config = tiny_config(vocab, model_parallel_size=model_parallel_size, num_key_value_heads=num_key_value_heads)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (folder / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2) + "\n")
    state = random_release_state(config, seed)
    write_shards(folder, state)
    return state


def vqgan_shapes(taming: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of Chameleon's vqgan.ckpt state_dict (taming-transformers' VQModel: Encoder,
    quant_conv, VectorQuantizer, post_quant_conv, Decoder) for vqgan.yaml's params `taming`."""
    ch, mult, blocks, z = taming["ch"], taming["ch_mult"], taming["num_res_blocks"], taming["z_channels"]
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(name, c_out, c_in, k):
        shapes.update({f"{name}.weight": (c_out, c_in, k, k), f"{name}.bias": (c_out,)})

    def norm(name, c):
        shapes.update({f"{name}.weight": (c,), f"{name}.bias": (c,)})

    def resnet(name, c_in, c_out):
        norm(f"{name}.norm1", c_in), conv(f"{name}.conv1", c_out, c_in, 3)
        norm(f"{name}.norm2", c_out), conv(f"{name}.conv2", c_out, c_out, 3)
        if c_in != c_out:
            conv(f"{name}.nin_shortcut", c_out, c_in, 1)

    def mid(name, c):
        resnet(f"{name}.mid.block_1", c, c), norm(f"{name}.mid.attn_1.norm", c)
        for part in ("q", "k", "v", "proj_out"):
            conv(f"{name}.mid.attn_1.{part}", c, c, 1)
        resnet(f"{name}.mid.block_2", c, c)

    if taming["attn_resolutions"]:
        raise ValueError("attention inside the levels is not modelled (Chameleon's VQGAN has none)")
    conv("encoder.conv_in", ch, taming["in_channels"], 3)
    c_in = ch
    for i, m in enumerate(mult):
        for j in range(blocks):
            resnet(f"encoder.down.{i}.block.{j}", c_in, ch * m)
            c_in = ch * m
        if i != len(mult) - 1:
            conv(f"encoder.down.{i}.downsample.conv", c_in, c_in, 3)
    mid("encoder", c_in)
    norm("encoder.norm_out", c_in), conv("encoder.conv_out", 2 * z if taming["double_z"] else z, c_in, 3)
    conv("quant_conv", taming["embed_dim"], z, 1)
    shapes["quantize.embedding.weight"] = (taming["n_embed"], taming["embed_dim"])
    conv("post_quant_conv", z, taming["embed_dim"], 1)
    c_in = ch * mult[-1]
    conv("decoder.conv_in", c_in, z, 3)
    mid("decoder", c_in)
    for i in reversed(range(len(mult))):  # taming indexes the decoder's levels by resolution: up[n-1] runs first
        for j in range(blocks + 1):
            resnet(f"decoder.up.{i}.block.{j}", c_in, ch * mult[i])
            c_in = ch * mult[i]
        if i != 0:
            conv(f"decoder.up.{i}.upsample.conv", c_in, c_in, 3)
    norm("decoder.norm_out", c_in), conv("decoder.conv_out", taming["out_ch"], c_in, 3)
    return shapes


def build_chameleon_tokenizer(folder: Path, seed: int = 0) -> Path:
    """Chameleon's tokenizer folder as Lumina-mGPT reads it: vqgan.ckpt ({"state_dict": taming keys,
    encoder, codebook and decoder}) and vqgan.yaml (model.target / model.params with ddconfig and
    lossconfig); tiny sizes of TINY_VQ. Returns the folder."""
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in vqgan_shapes(TINY_VQ).items():  # random, at roughly unit activations
        noise = torch.randn(shape, generator=g)
        if key.endswith("bias"):
            state[key] = 0.1 * noise
        elif len(shape) == 1:  # GroupNorm weights
            state[key] = 1 + 0.1 * noise
        else:  # convolutions (fan-in scaled) and the codebook
            state[key] = noise / (shape[1] * shape[2] * shape[3]) ** 0.5 if len(shape) == 4 else noise
    torch.save({"state_dict": state}, folder / "vqgan.ckpt")
    ddconfig = {k: TINY_VQ[k] for k in ("double_z", "z_channels", "resolution", "in_channels", "out_ch", "ch", "ch_mult",
                                        "num_res_blocks", "attn_resolutions", "dropout")}
    params = {"embed_dim": TINY_VQ["embed_dim"], "n_embed": TINY_VQ["n_embed"], "ddconfig": ddconfig,
              "lossconfig": {"target": "taming.modules.losses.vqperceptual.DummyLoss"}, "ckpt_path": "vqgan.ckpt"}
    yaml_text = yaml.safe_dump({"model": {"target": "taming.models.vqgan.VQModel", "params": params}}, sort_keys=False)
    (folder / "vqgan.yaml").write_text(yaml_text)
    return folder
