"""LlamaGen's text-to-image release (peizesun/llamagen_t2i + google/flan-t5-xl), laid out as released.

What a user downloads, and what each file is (read from FoundationVision/LlamaGen @ ce98ec4):

- `t2i_XL_stage1_256.pt`, `t2i_XL_stage2_512.pt`: `torch.save` of the dict that
  autoregressive/train/train_t2i.py writes: {"model": the GPT's state_dict(), "optimizer": its AdamW
  state_dict() (two groups: weights of >= 2 dims decayed, the rest not), "steps": int, "args": the
  script's argparse.Namespace}. The GPT trains in float32 under autocast (--mixed-precision bf16),
  so the weights are float32. sample_t2i.py reads ckpt["model"] (else "module", else
  "state_dict") with load_state_dict(strict=False). The key names and shapes are those of
  autoregressive/models/gpt.py `Transformer` for model_type "t2i": `freqs_cis` is a plain attribute
  and the KV caches exist only after setup_caches, so neither is in the file; the CFG null caption
  `cls_embedding.uncond_embedding` is a buffer of CaptionEmbedder's default 120 rows. The two files
  differ only in block_size (256 vs 1024 codes), which changes no tensor of the file.
  Whether the hub files still hold "optimizer"/"args" could not be checked (their sizes were not
  found); `write_gpt_checkpoint(training_state=False)` writes the {"model": ...} variant.
- `vq_ds16_t2i.pt`: tokenizer/tokenizer_image/vq_train.py's dict {"model", "optimizer",
  "discriminator", "optimizer_disc", "steps", "args"} ("ema" only with --ema), float32; keys of
  vq_model.py `VQModel` (Encoder/Decoder with `conv_blocks`, `mid.0..2`, GroupNorm(32), attention on
  the lowest-resolution level only, `quantize.codebook_used` a (65536,) usage buffer).
- google/flan-t5-xl: a `T5ForConditionalGeneration` folder (encoder, decoder, untied lm_head),
  float32; language/t5.py loads its encoder with `T5EncoderModel.from_pretrained` and
  `AutoTokenizer` (120 tokens, padding to max_length), in the sampler's --precision (bf16 default;
  language/extract_t5_feature.py made the training features in bf16 too). The fixture writes the
  weights as two safetensors shards with an index, which transformers reads first; the hub folder
  is believed to also carry pytorch_model-0000N-of-00002.bin shards (not written here).

Config values: `GPT_XL_STAGE1_256` / `GPT_XL_STAGE2_512` / `VQ_16` are copies of
../shared/real-configs/peizesun__llamagen_t2i/RECONSTRUCTED_*.json, which are RECONSTRUCTED from the
code (the hub has only .pt files); `VQ_16_CH` / `VQ_16_RES_BLOCKS` are Encoder/Decoder defaults of
vq_model.py. `FLAN_T5_XL` is DERIVED (no official copy of google/flan-t5-xl's config.json was
reachable: values from derived copies and the T5 v1.1 family's conventions). The tokenizer files
are written in the release's formats (tokenizer.json, spiece.model, tokenizer_config.json,
special_tokens_map.json) over a tiny vocabulary; their field values are RECONSTRUCTED.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

# -----------------------------------------------------------------------------
# full-size configurations

_GPT_COMMON = {  # gpt.py ModelArgs defaults + GPT_XL + sample_t2i.py (RECONSTRUCTED, see the docstring)
    "dim": 1280, "n_layer": 36, "n_head": 20, "n_kv_head": None, "multiple_of": 256, "ffn_dim_multiplier": None,
    "rope_base": 10000, "norm_eps": 1e-05, "initializer_range": 0.02, "token_dropout_p": 0.1, "attn_dropout_p": 0.0,
    "resid_dropout_p": 0.1, "ffn_dropout_p": 0.1, "drop_path_rate": 0.0, "num_classes": 1000, "caption_dim": 2048,
    "class_dropout_prob": 0.1, "model_type": "t2i", "vocab_size": 16384, "cls_token_num": 120,
    "max_batch_size": 32, "max_seq_len": 2048,
}
GPT_XL_STAGE1_256 = {**_GPT_COMMON, "block_size": 256}
GPT_XL_STAGE2_512 = {**_GPT_COMMON, "block_size": 1024}
IMAGE_SIZE = {"t2i_XL_stage1_256.pt": 256, "t2i_XL_stage2_512.pt": 512}

VQ_16 = {  # vq_model.py ModelArgs + VQ_16 (RECONSTRUCTED)
    "codebook_size": 16384, "codebook_embed_dim": 8, "codebook_l2_norm": True, "codebook_show_usage": True,
    "commit_loss_beta": 0.25, "entropy_loss_ratio": 0.0, "encoder_ch_mult": [1, 1, 2, 2, 4],
    "decoder_ch_mult": [1, 1, 2, 2, 4], "z_channels": 256, "dropout_p": 0.0,
}
VQ_16_CH, VQ_16_RES_BLOCKS = 128, 2  # Encoder/Decoder defaults (ModelArgs does not carry them)
CODEBOOK_USAGE_SLOTS = 65536  # VectorQuantizer's codebook_used buffer, whatever the codebook size

FLAN_T5_XL = {  # DERIVED (see the docstring)
    "architectures": ["T5ForConditionalGeneration"],
    "d_ff": 5120,
    "d_kv": 64,
    "d_model": 2048,
    "decoder_start_token_id": 0,
    "dense_act_fn": "gelu_new",
    "dropout_rate": 0.1,
    "eos_token_id": 1,
    "feed_forward_proj": "gated-gelu",
    "initializer_factor": 1.0,
    "is_encoder_decoder": True,
    "is_gated_act": True,
    "layer_norm_epsilon": 1e-06,
    "model_type": "t5",
    "n_positions": 512,
    "num_decoder_layers": 24,
    "num_heads": 32,
    "num_layers": 24,
    "output_past": True,
    "pad_token_id": 0,
    "relative_attention_max_distance": 128,
    "relative_attention_num_buckets": 32,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
    "transformers_version": "4.23.1",
    "use_cache": True,
    "vocab_size": 32128,
}
T5_MAX_LENGTH = 120  # language/t5.py model_max_length, sample_t2i.py --t5-feature-max-len
T5_EXTRA_IDS = 100

# -----------------------------------------------------------------------------
# tiny sizes (only sizes shrink: same levels, same 120 caption slots, same rules)

TINY_GPT = {**_GPT_COMMON, "dim": 64, "n_layer": 2, "n_head": 4, "vocab_size": 64, "caption_dim": 32}
TINY_GPT_STAGE1 = {**TINY_GPT, "block_size": 16}  # 64 px through the x16 VQ: a 4 x 4 grid
TINY_GPT_STAGE2 = {**TINY_GPT, "block_size": 64}  # 128 px: 8 x 8
TINY_IMAGE_SIZE = {"t2i_XL_stage1_256.pt": 64, "t2i_XL_stage2_512.pt": 128}
# five levels (x16) as VQ-16, narrower; the last still widens (a ResNet shortcut, as the release has)
TINY_VQ = {**VQ_16, "codebook_size": 64, "z_channels": 32, "encoder_ch_mult": [1, 1, 1, 1, 2],
           "decoder_ch_mult": [1, 1, 1, 1, 2]}
TINY_VQ_CH = 32  # GroupNorm(32) needs multiples of 32
TINY_T5 = {**FLAN_T5_XL, "d_ff": 64, "d_kv": 8, "d_model": 32, "num_decoder_layers": 2, "num_heads": 4,
           "num_layers": 2, "vocab_size": 256}
TINY_WORDS = "a an the photo of in on with dog cat backpack red blue green sitting beach wearing s".split()


# -----------------------------------------------------------------------------
# the originals' key names and shapes


def find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - n % k


def gpt_shapes(args: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of gpt.py `Transformer(ModelArgs(**args)).state_dict()` for model_type "t2i"."""
    dim, heads = args["dim"], args["n_head"]
    head_dim = dim // heads
    kv_heads = args["n_kv_head"] or heads
    hidden = int(2 * 4 * dim / 3)
    if args["ffn_dim_multiplier"] is not None:
        hidden = int(args["ffn_dim_multiplier"] * hidden)
    hidden = find_multiple(hidden, args["multiple_of"])
    caption, vocab = args["caption_dim"], args["vocab_size"]
    shapes = {
        "cls_embedding.uncond_embedding": (120, caption),  # CaptionEmbedder(token_num=120), not cls_token_num
        "cls_embedding.cap_proj.fc1.weight": (dim, caption),
        "cls_embedding.cap_proj.fc2.weight": (dim, dim),
        "tok_embeddings.weight": (vocab, dim),
    }
    for i in range(args["n_layer"]):
        shapes |= {
            f"layers.{i}.attention.wqkv.weight": ((heads + 2 * kv_heads) * head_dim, dim),
            f"layers.{i}.attention.wo.weight": (dim, dim),
            f"layers.{i}.feed_forward.w1.weight": (hidden, dim),
            f"layers.{i}.feed_forward.w3.weight": (hidden, dim),
            f"layers.{i}.feed_forward.w2.weight": (dim, hidden),
            f"layers.{i}.attention_norm.weight": (dim,),
            f"layers.{i}.ffn_norm.weight": (dim,),
        }
    return shapes | {"norm.weight": (dim,), "output.weight": (vocab, dim)}


def vq_shapes(args: dict, *, ch: int = VQ_16_CH, res_blocks: int = VQ_16_RES_BLOCKS) -> dict[str, tuple[int, ...]]:
    """Every tensor of vq_model.py `VQModel(ModelArgs(**args)).state_dict()` (Encoder/Decoder ch, num_res_blocks)."""
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(key, cin, cout, k=3):
        shapes[f"{key}.weight"], shapes[f"{key}.bias"] = (cout, cin, k, k), (cout,)

    def norm(key, c):
        shapes[f"{key}.weight"], shapes[f"{key}.bias"] = (c,), (c,)

    def resnet(key, cin, cout):
        norm(f"{key}.norm1", cin), conv(f"{key}.conv1", cin, cout), norm(f"{key}.norm2", cout)
        conv(f"{key}.conv2", cout, cout)
        if cin != cout:
            conv(f"{key}.nin_shortcut", cin, cout, 1)

    def attention(key, c):
        norm(f"{key}.norm", c)
        for name in ("q", "k", "v", "proj_out"):
            conv(f"{key}.{name}", c, c, 1)

    def middle(part, c):
        resnet(f"{part}.mid.0", c, c), attention(f"{part}.mid.1", c), resnet(f"{part}.mid.2", c, c)

    z, embed = args["z_channels"], args["codebook_embed_dim"]
    mult = args["encoder_ch_mult"]
    levels = len(mult)
    conv("encoder.conv_in", 3, ch)
    block_in = ch
    for i, m in enumerate(mult):
        for j in range(res_blocks):
            resnet(f"encoder.conv_blocks.{i}.res.{j}", block_in, ch * m)
            block_in = ch * m
            if i == levels - 1:
                attention(f"encoder.conv_blocks.{i}.attn.{j}", block_in)
        if i != levels - 1:
            conv(f"encoder.conv_blocks.{i}.downsample.conv", block_in, block_in)
    middle("encoder", block_in)
    norm("encoder.norm_out", block_in), conv("encoder.conv_out", block_in, z)

    mult = args["decoder_ch_mult"]
    block_in = ch * mult[-1]
    conv("decoder.conv_in", z, block_in)
    middle("decoder", block_in)
    for k, level in enumerate(reversed(range(levels))):  # the decoder's blocks in the order they run
        for j in range(res_blocks + 1):
            resnet(f"decoder.conv_blocks.{k}.res.{j}", block_in, ch * mult[level])
            block_in = ch * mult[level]
            if level == levels - 1:
                attention(f"decoder.conv_blocks.{k}.attn.{j}", block_in)
        if level != 0:
            conv(f"decoder.conv_blocks.{k}.upsample.conv", block_in, block_in)
    norm("decoder.norm_out", block_in), conv("decoder.conv_out", block_in, 3)

    shapes["quantize.embedding.weight"] = (args["codebook_size"], embed)
    if args["codebook_show_usage"]:
        shapes["quantize.codebook_used"] = (CODEBOOK_USAGE_SLOTS,)
    conv("quant_conv", z, embed, 1), conv("post_quant_conv", embed, z, 1)
    return shapes


# -----------------------------------------------------------------------------
# writers


def random_state(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    """float32 tensors: 1-D (norm weights, biases) near their trained scale, the rest ~ N(0, 1/fan_in)."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        if key.endswith("codebook_used"):
            state[key] = torch.zeros(shape)  # indices of recently used codes, 0 until training fills it
        elif len(shape) == 1:
            base = 0.0 if key.endswith("bias") else 1.0
            state[key] = base + 0.1 * torch.randn(shape, generator=gen)
        else:
            state[key] = torch.randn(shape, generator=gen) / math.sqrt(math.prod(shape[1:]))
    return state


def _adamw_state(tensors: dict[str, torch.Tensor], weight_decay: float, lr: float) -> dict:
    """creat_optimizer's AdamW (decay on >= 2-dim tensors) after one step: a real optimizer state_dict."""
    params = {k: torch.nn.Parameter(v.clone()) for k, v in tensors.items() if v.is_floating_point()}
    groups = [{"params": [p for p in params.values() if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params.values() if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))
    for p in params.values():
        p.grad = torch.randn_like(p) * 1e-3
    optimizer.step()
    return optimizer.state_dict()


def gpt_training_args(image_size: int) -> argparse.Namespace:
    """train_t2i.py's argparse arguments as the checkpoint stores them (a representative subset)."""
    return argparse.Namespace(
        data_path="/data", t5_feat_path="/data/t5", cloud_save_path="/ckpt", no_local_save=False,
        vq_model="VQ-16", vq_ckpt="vq_ds16_t2i.pt", codebook_size=16384, codebook_embed_dim=8,
        gpt_model="GPT-XL", gpt_ckpt=None, gpt_type="t2i", vocab_size=16384, cls_token_num=120, dropout_p=0.1,
        token_dropout_p=0.1, drop_path=0.0, no_compile=False, results_dir="results", dataset="t2i",
        image_size=image_size, downsample_size=16, num_classes=1000, epochs=40, lr=1e-4, weight_decay=5e-2,
        beta1=0.9, beta2=0.95, max_grad_norm=1.0, global_batch_size=256, global_seed=0, num_workers=24,
        log_every=100, ckpt_every=5000, gradient_accumulation_steps=1, mixed_precision="bf16",
    )


def write_gpt_checkpoint(path: Path, args: dict, *, image_size: int, seed: int = 0,
                         training_state: bool = True) -> dict[str, torch.Tensor]:
    """A t2i_XL_stage*.pt-style file for `args` (see the module docstring). Returns ckpt["model"]."""
    model = random_state(gpt_shapes(args), seed)
    ckpt = {"model": model}
    if training_state:
        ckpt |= {"optimizer": _adamw_state(model, 5e-2, 1e-4), "steps": 400_000, "args": gpt_training_args(image_size)}
    torch.save(ckpt, path)
    return model


def _patchgan_state(seed: int) -> dict[str, torch.Tensor]:
    """discriminator_patchgan.py NLayerDiscriminator's keys (ndf shrunk to 8, 3 layers, BatchNorm)."""
    gen, ndf, state = torch.Generator().manual_seed(seed), 8, {}
    state["main.0.weight"], state["main.0.bias"] = torch.randn(ndf, 3, 4, 4, generator=gen), torch.zeros(ndf)
    cin, index = ndf, 2
    for mult in (2, 4, 8):
        state[f"main.{index}.weight"] = torch.randn(ndf * mult, cin, 4, 4, generator=gen)  # conv, no bias
        bn = f"main.{index + 1}"
        state |= {f"{bn}.weight": torch.ones(ndf * mult), f"{bn}.bias": torch.zeros(ndf * mult),
                  f"{bn}.running_mean": torch.zeros(ndf * mult), f"{bn}.running_var": torch.ones(ndf * mult),
                  f"{bn}.num_batches_tracked": torch.tensor(1000)}
        cin, index = ndf * mult, index + 3
    state[f"main.{index}.weight"], state[f"main.{index}.bias"] = torch.randn(1, cin, 4, 4, generator=gen), torch.zeros(1)
    return state


def write_vq_checkpoint(path: Path, args: dict, *, ch: int, seed: int = 1) -> dict[str, torch.Tensor]:
    """A vq_ds16_t2i.pt-style file (vq_train.py's dict). Returns ckpt["model"]."""
    model = random_state(vq_shapes(args, ch=ch), seed)
    # a trained codebook: rows of assorted norms (the original l2-normalises them in its lookup)
    gen = torch.Generator().manual_seed(seed + 1)
    codebook = model["quantize.embedding.weight"]
    model["quantize.embedding.weight"] = codebook * (0.5 + 3 * torch.rand(codebook.shape[0], 1, generator=gen))
    discriminator = _patchgan_state(seed)
    torch.save({
        "model": model,
        "optimizer": _adamw_state(model, 0.0, 1e-4),
        "discriminator": discriminator,
        "optimizer_disc": _adamw_state(discriminator, 0.0, 1e-4),
        "steps": 100_000,
        "args": argparse.Namespace(vq_model="VQ-16", codebook_size=args["codebook_size"],
                                   codebook_embed_dim=args["codebook_embed_dim"], image_size=256, ema=False,
                                   mixed_precision="bf16", lr=1e-4, disc_type="patchgan"),
    }, path)
    return model


def t5_pieces() -> list[tuple[str, float]]:
    """A tiny unigram vocabulary in T5's order: <pad> 0, </s> 1, <unk> 2, then pieces (word pieces first)."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("▁" + w, -2.0 - 0.1 * i) for i, w in enumerate(TINY_WORDS)]
    pieces += [("▁", -5.0)]
    pieces += [(c, -8.0) for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,*'-"]
    return pieces


def _spiece_model(pieces: list[tuple[str, float]]) -> bytes:
    """spiece.model: a sentencepiece ModelProto (unigram) holding `pieces`."""
    from transformers.utils import sentencepiece_model_pb2_new as sp

    proto = sp.ModelProto()
    proto.trainer_spec.model_type = sp.TrainerSpec.UNIGRAM
    proto.trainer_spec.vocab_size = len(pieces)
    proto.trainer_spec.pad_id, proto.trainer_spec.eos_id, proto.trainer_spec.unk_id = 0, 1, 2
    proto.trainer_spec.bos_id = -1
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = True
    kinds = {"<pad>": sp.ModelProto.SentencePiece.CONTROL, "</s>": sp.ModelProto.SentencePiece.CONTROL,
             "<unk>": sp.ModelProto.SentencePiece.UNKNOWN}
    for piece, score in pieces:
        entry = proto.pieces.add()
        entry.piece, entry.score = piece, score
        entry.type = kinds.get(piece, sp.ModelProto.SentencePiece.NORMAL)
    return proto.SerializeToString()


def write_flan_t5(folder: Path, config: dict, *, seed: int = 2) -> Path:
    """A google/flan-t5-xl-style folder: config.json, T5ForConditionalGeneration weights as safetensors
    shards with an index (float32), and the tokenizer files."""
    from transformers import T5Config, T5ForConditionalGeneration, T5Tokenizer

    folder.mkdir(parents=True)
    fields = {k: v for k, v in config.items() if k not in ("architectures", "model_type", "transformers_version",
                                                             "torch_dtype")}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = T5ForConditionalGeneration(T5Config(**fields))
    model.save_pretrained(folder, max_shard_size="200KB")  # small shards: two or more, with an index
    for stale in ("generation_config.json",):  # the release's own fields follow
        (folder / stale).unlink(missing_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    pieces = t5_pieces()
    tokenizer = T5Tokenizer(vocab=pieces, extra_ids=T5_EXTRA_IDS)
    tokenizer.backend_tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "spiece.model").write_bytes(_spiece_model(pieces))
    extra = [f"<extra_id_{i}>" for i in range(T5_EXTRA_IDS)]
    special = {"additional_special_tokens": extra, "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        special | {"extra_ids": T5_EXTRA_IDS, "model_max_length": 512, "name_or_path": "google/t5-v1_1-xl",
                   "sp_model_kwargs": {}, "tokenizer_class": "T5Tokenizer"}, indent=2) + "\n")
    return folder


def build_release(root: Path, *, training_state: bool = True) -> dict[str, Path]:
    """The tiny release in `root`: both GPT files, the VQ file, and flan-t5-xl/ (sizes: TINY_*)."""
    root.mkdir(parents=True, exist_ok=True)
    paths = {name: root / name for name in ("t2i_XL_stage1_256.pt", "t2i_XL_stage2_512.pt", "vq_ds16_t2i.pt")}
    for seed, (name, args) in enumerate(zip(IMAGE_SIZE, (TINY_GPT_STAGE1, TINY_GPT_STAGE2))):
        write_gpt_checkpoint(paths[name], args, image_size=TINY_IMAGE_SIZE[name], seed=seed,
                             training_state=training_state)
    write_vq_checkpoint(paths["vq_ds16_t2i.pt"], TINY_VQ, ch=TINY_VQ_CH)
    paths["flan-t5-xl"] = write_flan_t5(root / "flan-t5-xl", TINY_T5)
    return paths
