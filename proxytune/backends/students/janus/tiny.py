"""The built-in tiny Janus-Pro student ("tiny-janus"): random weights in transformers' Janus layout.

It loads through `backend.load` like any converted checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch

from proxytune.backends.students import meta as student_meta
from proxytune.backends.students.janus.backend import IMAGE_START, PAD, TINY_PROMPT_LEN
from proxytune.backends.students.meta import StudentMeta


def build(folder: Path) -> None:
    """64 px images, an x8 VQ (8 x 8 = 64 codes, 256 entries), 2-layer Llama, a minimal vision tower.

    The tokenizer is character-level with the real one's special names (BOS, EOS and pad of DeepSeek's
    tokenizer, the image start/end tags) and its behaviour: BOS first, nothing appended."""
    from transformers import AutoTokenizer, JanusConfig, JanusForConditionalGeneration, JanusVQVAEConfig, JanusVisionConfig, LlamaConfig

    from proxytune.backends.tokenizer import write_char_bpe_tokenizer

    bos, eos = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
    names = [bos, eos, PAD, IMAGE_START, "<end_of_image>", "<|User|>", "<|Assistant|>"]
    write_char_bpe_tokenizer(folder, {name: i for i, name in enumerate(names)}, special=names, bos=bos, eos=eos,
                             pad=PAD, model_max_length=TINY_PROMPT_LEN)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    hidden = 64
    config = JanusConfig(
        text_config=LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                                pad_token_id=tokenizer.pad_token_id, initializer_range=0.125),
        # JanusConfig sets the VQ grid from the vision tower (image_size / patch_size = 8)
        vision_config=JanusVisionConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=128,
                                        patch_size=16, projection_dim=hidden, depth=1, num_image_tokens=64),
        # A frozen head at the usual 0.02 init bounds the logits near uniform, and a LoRA could not
        # move them; 1/sqrt(width) leaves room (as tiny-llamagen does).
        vq_config=JanusVQVAEConfig(embed_dim=8, num_embeddings=256, latent_channels=32, base_channels=32,
                                   channel_multiplier=[1, 1, 2, 2], num_res_blocks=1, num_patches=8,
                                   projection_dim=hidden, image_token_embed_dim=hidden, num_hidden_layers=2,
                                   initializer_range=0.125),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_START),
    )
    torch.manual_seed(0)
    JanusForConditionalGeneration(config).save_pretrained(folder, safe_serialization=True)
    student_meta.write(folder, StudentMeta(backend="janus", image_size=64, prompt_len=TINY_PROMPT_LEN))
