"""The built-in tiny LlamaGen student ("tiny-llamagen"): random weights in proxytune's LlamaGen layout.

It loads through `backend.load` like a converted checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch

from proxytune.backends.students import meta as student_meta
from proxytune.backends.students.llamagen.model import LlamaGenStudent, LlamaGenStudentConfig
from proxytune.backends.students.meta import StudentMeta
from proxytune.backends.tokenizer import EOS_ID, char_vocab_size, write_char_clip_tokenizer

TINY_COND_LEN = 32


def build(folder: Path) -> None:
    """64 px images, x4 VQ (16x16 = 256 codes, 512 entries), 2-layer Llama, 2-layer T5 encoder."""
    from diffusers import VQModel
    from transformers import T5Config, T5EncoderModel

    student_config = LlamaGenStudentConfig(
        codebook_size=512,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        cond_len=TINY_COND_LEN,
        text_dim=32,
        grid_size=16,
        # LoRA leaves lm_head frozen, so its scale bounds the logits: at 0.02 they stay under ~1.3
        # and fine-tuning cannot lower the loss much; 1/sqrt(hidden) leaves room.
        initializer_range=0.125,
    )
    text_config = T5Config(
        vocab_size=char_vocab_size(),
        d_model=32,
        d_kv=16,
        d_ff=64,
        num_layers=2,
        num_heads=2,
        pad_token_id=EOS_ID,
        eos_token_id=EOS_ID,
        decoder_start_token_id=EOS_ID,
    )
    with torch.random.fork_rng(devices=[]):  # a fixed seed without disturbing the caller's RNG
        torch.manual_seed(0)
        LlamaGenStudent(student_config).save_pretrained(folder / "transformer")
        VQModel(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            block_out_channels=(32, 64, 64),
            layers_per_block=1,
            latent_channels=8,
            vq_embed_dim=8,
            num_vq_embeddings=512,
            norm_num_groups=16,
            sample_size=64,
        ).save_pretrained(folder / "vqvae")
        T5EncoderModel(text_config).save_pretrained(folder / "text_encoder")
    write_char_clip_tokenizer(folder / "tokenizer", model_max_length=TINY_COND_LEN)
    student_meta.write(folder, StudentMeta(backend="llamagen", image_size=64))
