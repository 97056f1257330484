"""Janus-Pro as released, in both layouts: deepseek-ai/Janus-Pro-1B / -7B (`multi_modality`, the Janus
repository's own code) and transformers' conversion (deepseek-community/Janus-Pro-*, `model_type: janus`).

Read from github.com/deepseek-ai/Janus (janus/models/): modeling_vlm.py builds `MultiModalityCausalLM`
from config.json's six sub-configs, each `{"cls", "model_type", "params"}`: `vision_model`
(CLIPVisionTower -> siglip_vit.create_siglip_vit, a timm ViT whose width/depth/heads come from the
SIGLIP table by `model_name`; class_token False, global_pool "map", so an attention-pool head that
`ignore_head=True` never calls), `aligner` / `gen_aligner` (projector.MlpProjector "mlp_gelu":
Linear, GELU, Linear -> `layers.0`, `layers.2`), `gen_vision_model` (vq_model.VQ_16(): LlamaGen's VQ,
sizes fixed in code), `gen_head` (vision_head: output_mlp_projector, GELU, vision_head), `gen_embed`
(Embedding(image_token_size, gen_vision n_embed)) and `language_model` (LlamaForCausalLM(language_config)).
The weights ship as `torch.save`d plain state dicts in bf16 `.bin` files.

Config values: none of the releases' config files is reachable from here (real-configs README,
"Missing"). RELEASE_CONFIGS below are RECONSTRUCTED: the fields are those the code above reads; the
values are the ones the research notes list as seen in derived copies (7B: 30 layers, vocab 102400,
max_pos 16384, aligner/gen_aligner/gen_head 4096, VQ-16 16384 x 8, SigLIP-L/16 at 384 px, bf16,
transformers 4.33.1) plus DeepSeek-LLM's published sizes (7B: 4096 wide, 11008 FFN, 32 heads; 1B:
2048 wide, 5632 FFN, 24 layers, 16 heads). VQ_16 and the SigLIP-L table entry are exact copies of the
Janus code's constants. The tokenizer, processor and preprocessor files are reconstructed from the
fields processing_vlm.py / image_processing_vlm.py read (their byte sizes are not matched).

Shard layout: RELEASE_SHARDS (7B: two `pytorch_model-0000N-of-00002.bin` + index; 1B: one
`pytorch_model.bin`, as recalled, not verified here); the builder writes either.

The tiny fixtures keep every field, key name, shape rule, file and dtype; only sizes shrink (a 2-layer
64-wide Llama, a 1-block 32-wide SigLIP at 64 px, a VQ of 32 base channels with VQ-16's five levels:
4 x 4 codes, 256 entries). The original's own code could not build the tiny (its sizes live in code),
which is why the conversion reads sizes from the tensors.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

PAD = "<｜▁pad▁｜>"
BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
# the special names the Janus processor looks up (processing_vlm.py) and the chat roles
SPECIAL = [BOS, EOS, PAD, "<image_placeholder>", "<begin_of_image>", "<end_of_image>", "<|User|>", "<|Assistant|>"]

# janus/models/vq_model.py: VQ_16 = VQModel(ModelArgs(encoder_ch_mult=[1, 1, 2, 2, 4], ...)), Encoder(ch=128,
# num_res_blocks=2), z_channels 256, codebook 16384 x 8 (exact: constants of the code)
VQ16 = {"ch": 128, "ch_mult": [1, 1, 2, 2, 4], "num_res_blocks": 2, "z_channels": 256, "codebook": 16384, "embed_dim": 8}
TINY_VQ = {"ch": 32, "ch_mult": [1, 1, 2, 2, 4], "num_res_blocks": 2, "z_channels": 32, "codebook": 256, "embed_dim": 8}
# janus/models/siglip_vit.py SigLIP_MODEL_CONFIG["siglip_large_patch16_384"] (exact), depth after select_layer -1
SIGLIP_L = {"width": 1024, "layers": 24, "heads": 16, "patch_size": 16, "mlp_ratio": 4}
TINY_SIGLIP = {"width": 32, "layers": 1, "heads": 16, "patch_size": 16, "mlp_ratio": 4}
RELEASE_SHARDS = {"1B": 1, "7B": 2}
LANGUAGE = {  # RECONSTRUCTED (see the module docstring)
    "1B": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 24, "num_attention_heads": 16},
    "7B": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 30, "num_attention_heads": 32},
}


def release_config(*, hidden_size: int, intermediate_size: int, num_hidden_layers: int, num_attention_heads: int,
                   vision_width: int, vocab_size: int = 102400, image_size: int = 384, codebook: int = 16384,
                   max_position_embeddings: int = 16384) -> dict:
    """config.json of a multi_modality release (the fields MultiModalityConfig reads, sorted as
    transformers 4.33 writes them)."""
    def part(cls: str, model_type: str, **params) -> dict:
        return {"cls": cls, "model_type": model_type, "params": params}

    return {
        "aligner_config": part("MlpProjector", "aligner", depth=2, input_dim=vision_width, n_embed=hidden_size,
                               projector_type="mlp_gelu"),
        "architectures": ["MultiModalityCausalLM"],
        "gen_aligner_config": part("MlpProjector", "gen_aligner", depth=2, input_dim=8, n_embed=hidden_size,
                                   projector_type="mlp_gelu"),
        "gen_head_config": part("vision_head", "gen_head", image_token_embed=hidden_size, image_token_size=codebook,
                                n_embed=hidden_size),
        "gen_vision_config": part("VQ-16", "gen_vision", image_token_size=codebook, n_embed=8),
        "language_config": {"hidden_size": hidden_size, "intermediate_size": intermediate_size,
                            "max_position_embeddings": max_position_embeddings, "model_type": "llama",
                            "num_attention_heads": num_attention_heads, "num_hidden_layers": num_hidden_layers,
                            "num_key_value_heads": num_attention_heads, "torch_dtype": "bfloat16", "vocab_size": vocab_size},
        "model_type": "multi_modality",
        "torch_dtype": "bfloat16",
        "transformers_version": "4.33.1",
        "vision_config": part("CLIPVisionTower", "vision", image_size=image_size, model_name="siglip_large_patch16_384",
                              select_feature="same", select_layer=-1),
    }


def full_config(size: str) -> dict:
    """deepseek-ai/Janus-Pro-{size}'s config.json at full size (RECONSTRUCTED, see the module docstring)."""
    return release_config(**LANGUAGE[size], vision_width=SIGLIP_L["width"])


def tiny_config(vocab_size: int) -> dict:
    return release_config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          vision_width=TINY_SIGLIP["width"], vocab_size=vocab_size, image_size=64,
                          codebook=TINY_VQ["codebook"], max_position_embeddings=256)


# -----------------------------------------------------------------------------
# the original's state-dict rules (module names and shapes as the Janus code builds them)


def _linear(key: str, out: int, inp: int, bias: bool = True) -> dict:
    return {f"{key}.weight": (out, inp), **({f"{key}.bias": (out,)} if bias else {})}


def _norm(key: str, width: int) -> dict:
    return {f"{key}.weight": (width,), f"{key}.bias": (width,)}


def _conv(key: str, out: int, inp: int, k: int) -> dict:
    return {f"{key}.weight": (out, inp, k, k), f"{key}.bias": (out,)}


def _resnet(key: str, cin: int, cout: int) -> dict:
    shapes = {**_norm(f"{key}.norm1", cin), **_conv(f"{key}.conv1", cout, cin, 3), **_norm(f"{key}.norm2", cout),
              **_conv(f"{key}.conv2", cout, cout, 3)}
    return shapes | (_conv(f"{key}.nin_shortcut", cout, cin, 1) if cin != cout else {})


def _attn(key: str, c: int) -> dict:
    return {**_norm(f"{key}.norm", c), **{k: v for n in ("q", "k", "v", "proj_out") for k, v in _conv(f"{key}.{n}", c, c, 1).items()}}


def vq_shapes(vq: dict, prefix: str = "gen_vision_model.") -> dict:
    """vq_model.VQModel: Encoder/Decoder `conv_blocks.N.{res,attn}.M`, `mid.0/1/2`, quantizer + usage buffer."""
    ch, mult, nrb, z = vq["ch"], vq["ch_mult"], vq["num_res_blocks"], vq["z_channels"]
    s = _conv("encoder.conv_in", ch, 3, 3)
    block_in = ch
    for level, m in enumerate(mult):  # Encoder: attention on the last level only; downsample on the others
        for r in range(nrb):
            s |= _resnet(f"encoder.conv_blocks.{level}.res.{r}", block_in, ch * m)
            block_in = ch * m
            if level == len(mult) - 1:
                s |= _attn(f"encoder.conv_blocks.{level}.attn.{r}", block_in)
        if level != len(mult) - 1:
            s |= _conv(f"encoder.conv_blocks.{level}.downsample.conv", block_in, block_in, 3)
    s |= _resnet("encoder.mid.0", block_in, block_in) | _attn("encoder.mid.1", block_in) | _resnet("encoder.mid.2", block_in, block_in)
    s |= _norm("encoder.norm_out", block_in) | _conv("encoder.conv_out", z, block_in, 3)
    block_in = ch * mult[-1]  # Decoder: conv_blocks[0] is the deepest level (built over reversed levels)
    s |= _conv("decoder.conv_in", block_in, z, 3)
    s |= _resnet("decoder.mid.0", block_in, block_in) | _attn("decoder.mid.1", block_in) | _resnet("decoder.mid.2", block_in, block_in)
    for index, level in enumerate(reversed(range(len(mult)))):
        for r in range(nrb + 1):
            s |= _resnet(f"decoder.conv_blocks.{index}.res.{r}", block_in, ch * mult[level])
            block_in = ch * mult[level]
            if level == len(mult) - 1:
                s |= _attn(f"decoder.conv_blocks.{index}.attn.{r}", block_in)
        if level != 0:
            s |= _conv(f"decoder.conv_blocks.{index}.upsample.conv", block_in, block_in, 3)
    s |= _norm("decoder.norm_out", block_in) | _conv("decoder.conv_out", 3, block_in, 3)
    s |= {"quantize.embedding.weight": (vq["codebook"], vq["embed_dim"]), "quantize.codebook_used": (65536,)}
    s |= _conv("quant_conv", vq["embed_dim"], z, 1) | _conv("post_quant_conv", z, vq["embed_dim"], 1)
    return {prefix + k: v for k, v in s.items()}


def siglip_shapes(tower: dict, image_size: int, prefix: str = "vision_model.vision_tower.") -> dict:
    """siglip_vit.VisionTransformer (no class token, pre_norm False, global_pool "map") + timm's AttentionPoolLatent."""
    w, p = tower["width"], tower["patch_size"]
    hidden = int(w * tower["mlp_ratio"])
    s = {"pos_embed": (1, (image_size // p) ** 2, w), **_conv("patch_embed.proj", w, 3, p)}
    for i in range(tower["layers"]):
        b = f"blocks.{i}"
        s |= _norm(f"{b}.norm1", w) | _linear(f"{b}.attn.qkv", 3 * w, w) | _linear(f"{b}.attn.proj", w, w)
        s |= _norm(f"{b}.norm2", w) | _linear(f"{b}.mlp.fc1", hidden, w) | _linear(f"{b}.mlp.fc2", w, hidden)
    s |= _norm("norm", w)
    s |= {"attn_pool.latent": (1, 1, w)} | _linear("attn_pool.q", w, w) | _linear("attn_pool.kv", 2 * w, w)
    s |= _linear("attn_pool.proj", w, w) | _norm("attn_pool.norm", w)
    s |= _linear("attn_pool.mlp.fc1", hidden, w) | _linear("attn_pool.mlp.fc2", w, hidden)
    return {prefix + k: v for k, v in s.items()}


def release_shapes(config: dict, *, vq: dict = VQ16, tower: dict = SIGLIP_L) -> dict:
    """Every key of MultiModalityCausalLM's state dict with its shape, for a release config.json."""
    lang = config["language_config"]
    h, ffn, vocab = lang["hidden_size"], lang["intermediate_size"], lang["vocab_size"]
    s = siglip_shapes(tower, config["vision_config"]["params"]["image_size"]) | vq_shapes(vq)
    for name in ("aligner", "gen_aligner"):
        params = config[f"{name}_config"]["params"]
        s |= _linear(f"{name}.layers.0", params["n_embed"], params["input_dim"])
        for d in range(1, params["depth"]):
            s |= _linear(f"{name}.layers.{2 * d}", params["n_embed"], params["n_embed"])
    head = config["gen_head_config"]["params"]
    s |= _linear("gen_head.output_mlp_projector", head["image_token_embed"], head["n_embed"])
    s |= _linear("gen_head.vision_head", head["image_token_size"], head["image_token_embed"])
    gen = config["gen_vision_config"]["params"]
    s["gen_embed.weight"] = (gen["image_token_size"], gen["n_embed"])
    kv = h // lang["num_attention_heads"] * lang["num_key_value_heads"]
    s["language_model.model.embed_tokens.weight"] = (vocab, h)
    for i in range(lang["num_hidden_layers"]):
        b = f"language_model.model.layers.{i}"
        s |= _linear(f"{b}.self_attn.q_proj", h, h, False) | _linear(f"{b}.self_attn.k_proj", kv, h, False)
        s |= _linear(f"{b}.self_attn.v_proj", kv, h, False) | _linear(f"{b}.self_attn.o_proj", h, h, False)
        s |= _linear(f"{b}.mlp.gate_proj", ffn, h, False) | _linear(f"{b}.mlp.up_proj", ffn, h, False)
        s |= _linear(f"{b}.mlp.down_proj", h, ffn, False)
        s |= {f"{b}.input_layernorm.weight": (h,), f"{b}.post_attention_layernorm.weight": (h,)}
    s["language_model.model.norm.weight"] = (h,)
    s["language_model.lm_head.weight"] = (vocab, h)
    return s


# -----------------------------------------------------------------------------
# writing folders


def write_tokenizer_files(folder: Path, *, model_max_length: int = 16384) -> int:
    """tokenizer.json (a byte-level character tokenizer with the real special names), tokenizer_config.json
    and special_tokens_map.json with the release's fields; returns the vocabulary size."""
    from proxytune.backends.tokenizer import write_char_bpe_tokenizer

    write_char_bpe_tokenizer(folder, {n: i for i, n in enumerate(SPECIAL)}, special=SPECIAL, bos=BOS, eos=EOS, pad=PAD)
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": BOS, "clean_up_tokenization_spaces": False, "eos_token": EOS, "model_max_length": model_max_length,
        "pad_token": None, "tokenizer_class": "LlamaTokenizerFast", "unk_token": None, "use_default_system_prompt": True},
        indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps({
        "additional_special_tokens": ["<image_placeholder>", "<|User|>", "<|Assistant|>"],
        "bos_token": BOS, "eos_token": EOS}, indent=2) + "\n")
    return len(SPECIAL) + 256


def write_processor_files(folder: Path, image_size: int, num_image_tokens: int) -> None:
    """processor_config.json (VLChatProcessor) and preprocessor_config.json (VLMImageProcessor) fields."""
    (folder / "processor_config.json").write_text(json.dumps({
        "add_special_token": False, "ignore_id": -100, "image_tag": "<image_placeholder>", "mask_prompt": True,
        "num_image_tokens": num_image_tokens, "processor_class": "VLChatProcessor", "sft_format": "deepseek"}, indent=2) + "\n")
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "background_color": [127, 127, 127], "do_normalize": True, "image_mean": [0.5, 0.5, 0.5],
        "image_processor_type": "VLMImageProcessor", "image_size": image_size, "image_std": [0.5, 0.5, 0.5],
        "min_size": 14, "processor_class": "VLChatProcessor", "rescale_factor": 1 / 255}, indent=2) + "\n")


def random_weights(shapes: dict, seed: int = 0) -> dict:
    """bf16 tensors of `shapes`, scaled like an initialised model (norm weights 1, the rest ~ 1/sqrt(fan_in))."""
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for key, shape in shapes.items():
        if key.endswith("codebook_used"):
            tensor = torch.zeros(shape)
        elif any(n in key for n in ("norm", "layernorm")) and key.endswith(".weight") and len(shape) == 1:
            tensor = 1 + 0.1 * torch.randn(shape, generator=gen)
        else:
            fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
            tensor = torch.randn(shape, generator=gen) / math.sqrt(fan_in)
        weights[key] = tensor.to(torch.bfloat16)
    return weights


def write_multi_modality(folder: Path, *, shards: int = 2, seed: int = 0) -> Path:
    """A tiny deepseek-ai/Janus-Pro-* folder as released: config.json, bf16 `.bin` weights (shards + index,
    or one pytorch_model.bin), tokenizer / processor / preprocessor files."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = write_tokenizer_files(folder)
    config = tiny_config(vocab)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    image_size = config["vision_config"]["params"]["image_size"]
    write_processor_files(folder, image_size, (image_size // TINY_SIGLIP["patch_size"]) ** 2)
    weights = random_weights(release_shapes(config, vq=TINY_VQ, tower=TINY_SIGLIP), seed)
    if shards == 1:
        torch.save(weights, folder / "pytorch_model.bin")
        return folder
    keys = list(weights)
    per = math.ceil(len(keys) / shards)
    weight_map = {}
    for i in range(shards):
        name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {k: weights[k] for k in keys[i * per : (i + 1) * per]}
        torch.save(part, folder / name)
        weight_map |= {k: name for k in part}
    total = sum(t.numel() * t.element_size() for t in weights.values())
    (folder / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    return folder


def write_transformers_layout(folder: Path, *, seed: int = 0) -> Path:
    """A tiny deepseek-community/Janus-Pro-* folder: transformers' JanusForConditionalGeneration saved by
    save_pretrained (safetensors) in bf16, with its tokenizer and image processor.

    The config is built as transformers' convert_janus_weights_to_hf.py builds it (LlamaConfig from
    language_config; JanusVisionConfig from image_size and the aligner's n_embed/depth; JanusVQVAEConfig
    from gen_vision/gen_aligner/gen_head params; image_token_id of <image_placeholder>), at tiny sizes.
    bf16 is assumed: that script loads the release's bf16 tensors with `assign=True` (they keep bf16) and
    copies language_config's torch_dtype."""
    from transformers import (AutoTokenizer, JanusConfig, JanusForConditionalGeneration, JanusImageProcessor,
                              JanusVisionConfig, JanusVQVAEConfig, LlamaConfig)

    folder.mkdir(parents=True, exist_ok=True)
    vocab = write_tokenizer_files(folder)
    release = tiny_config(vocab)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    lang = {k: v for k, v in release["language_config"].items() if k != "model_type"}
    text = LlamaConfig(**lang, pad_token_id=tokenizer.get_vocab()[PAD], bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id)
    aligner, gen_aligner, head = (release[p]["params"] for p in ("aligner_config", "gen_aligner_config", "gen_head_config"))
    vision = JanusVisionConfig(image_size=64, projection_dim=aligner["n_embed"], depth=aligner["depth"],
                               hidden_size=TINY_SIGLIP["width"], num_hidden_layers=TINY_SIGLIP["layers"],
                               num_attention_heads=TINY_SIGLIP["heads"])
    vq = JanusVQVAEConfig(embed_dim=8, num_embeddings=TINY_VQ["codebook"], projection_dim=gen_aligner["n_embed"],
                          num_hidden_layers=gen_aligner["depth"], image_token_embed_dim=head["image_token_embed"],
                          base_channels=TINY_VQ["ch"], channel_multiplier=TINY_VQ["ch_mult"],
                          num_res_blocks=TINY_VQ["num_res_blocks"], latent_channels=TINY_VQ["z_channels"])
    config = JanusConfig(text_config=text, vision_config=vision, vq_config=vq,
                         image_token_id=tokenizer.get_vocab()["<image_placeholder>"])
    torch.manual_seed(seed)
    model = JanusForConditionalGeneration(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    JanusImageProcessor(size={"height": 64, "width": 64}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(folder)
    return folder
