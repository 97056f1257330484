"""The built-in tiny Lumina-mGPT student ("tiny-lumina-mgpt"): random weights in the real layout.

A 2-layer Chameleon decoder whose vocabulary puts every special token Lumina-mGPT uses at its id in
Chameleon's real vocabulary (`_tiny_vocabulary`), an x16 Chameleon VQ, and a VQ decoder folder made
the way `proxytune convert lumina-mgpt` makes a real one. It loads through `lumina.backend.load` like any
checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch

from proxytune.backends import vqgan
from proxytune.backends.students.lumina.backend import IMAGE_END, IMAGE_START, image_token_name
from proxytune.backends.students import meta as student_meta
from proxytune.backends.students.meta import StudentMeta

TINY_SIZE = 128
TINY_PROMPT_LEN = 160  # characters: the template alone is about 70


def _tiny_vocabulary(codes: int) -> dict[str, int]:
    """Names and ids laid out as in Chameleon's real vocabulary, up to the last reserved size token.

    <s> 0, <pad> 1, </s> 2, <unk> 3; image tokens from 4 (the real 8192 fill 4..8195; the tiny's
    `codes` take the first ids and placeholders the rest); <eoss> 8196, <racm3:break> 8197; then
    <reservedNNNNN> at id NNNNN + 4 (the end of turn <reserved08706> at 8710, the row end at 8803, size
    tokens from 8804), with <reserved08707> renamed <image> as transformers' conversion does.
    """
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({image_token_name(c): 4 + c for c in range(codes)})
    vocab.update({f"<tiny-unused-{i}>": i for i in range(4 + codes, 8196)})
    vocab.update({IMAGE_END: 8196, IMAGE_START: 8197})
    for i in range(8198, 9004):  # through <reserved08999>: size tokens up to 6,368 px
        name = f"<reserved{i - 4:05d}>"
        vocab["<image>" if name == "<reserved08707>" else name] = i
    return vocab


def build(folder: Path) -> None:
    """128 px images, an x16 Chameleon VQ (8 x 8 codes, 256 entries), 2-layer Chameleon decoder.

    The vocabulary is Chameleon's layout (`_tiny_vocabulary`) plus byte characters for text, so every
    special token has its real id. The VQ decoder folder is made the way a real one is: a taming-layout
    VQGAN (Chameleon's encoder and codebook from the checkpoint, a random decoder) converted by
    `vqgan.convert_state_dict`."""
    from diffusers import VQModel
    from transformers import AutoTokenizer, ChameleonConfig, ChameleonForConditionalGeneration, ChameleonVQVAEConfig

    from proxytune.backends.tokenizer import write_char_bpe_tokenizer

    codes = 256
    entries = _tiny_vocabulary(codes)
    special = [name for name in entries if name.startswith("<") and not name.startswith("<tiny-unused")]
    write_char_bpe_tokenizer(folder, entries, special=special, bos="<s>", eos="</s>", pad="<pad>", unk="<unk>",
                             model_max_length=TINY_PROMPT_LEN)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    vocab = dict(tokenizer.get_vocab())
    config = ChameleonConfig(
        vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=512, pad_token_id=1, bos_token_id=0, eos_token_id=2,
        vocabulary_map=vocab, initializer_range=0.125,  # room for a LoRA to move the logits (see tiny-llamagen)
        vq_config=ChameleonVQVAEConfig(embed_dim=8, num_embeddings=codes, latent_channels=32, resolution=TINY_SIZE,
                                       base_channels=32, channel_multiplier=[1, 1, 2, 2, 2], num_res_blocks=1,
                                       attn_resolutions=[]),
    )
    torch.manual_seed(0)
    model = ChameleonForConditionalGeneration(config)
    model.save_pretrained(folder, safe_serialization=True)
    decoder_only = VQModel(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 5,
                           up_block_types=("UpDecoderBlock2D",) * 5, block_out_channels=(32, 32, 64, 64, 64),
                           layers_per_block=1, latent_channels=32, vq_embed_dim=8, num_vq_embeddings=codes)
    taming = {k: v for k, v in vqgan.to_original_state_dict(decoder_only, "taming").items() if k.startswith("decoder.")}
    taming.update(model.model.vqmodel.state_dict())  # transformers keeps taming's names for the rest
    decoder = vqgan.build_vqmodel(*vqgan.convert_state_dict(taming, "taming", image_size=TINY_SIZE,
                                                            label="tiny Chameleon VQGAN"))
    decoder.save_pretrained(folder / "vq_decoder")
    student_meta.write(folder, StudentMeta.parse({"backend": "lumina-mgpt", "image_size": TINY_SIZE,
                                                  "vq_decoder": "vq_decoder", "prompt_len": TINY_PROMPT_LEN}))
