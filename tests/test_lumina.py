"""The Lumina-mGPT student backend (tiny Chameleon): image logits unmasked, Lumina's row-end layout,
a VQ decoder sharing the codebook, training by behaviour, adapter round trip, KV cache."""

import pytest
import torch

from proxytune.backends import lumina, students
from proxytune.errors import ProxytuneError
from conftest import add_lora


def test_the_vq_decoder_shares_the_chameleon_codebook():
    bundle = students.load_student("tiny-lumina-mgpt")
    # the decoder shares the Chameleon quantizer's codebook
    assert torch.equal(bundle.decoder.quantize.embedding.weight, bundle._chameleon.vqmodel.quantize.embedding.weight)


def test_layout_has_a_row_end_after_every_row_and_names_image_tokens_as_chameleon():
    bundle = students.load_student("tiny-lumina-mgpt")
    assert lumina.image_token_name(0) == "IMGIMGAZ" and lumina.image_token_name(409) == "IMGIMGEAJZ"
    mapping = bundle._chameleon.vocabulary_mapping  # transformers' own decoding of the names
    assert [mapping.bpe2img[int(i)] for i in bundle.image_bpe[:12]] == list(range(12))
    codes = torch.arange(64).view(1, 64)
    body = bundle._body(codes)[0]
    assert body.shape == (72,) and all(body[j] == bundle.row_end for j in range(8, 72, 9))
    assert [mapping.bpe2img[int(t)] for j, t in enumerate(body) if j % 9 != 8] == list(range(64))


def test_image_logits_are_unmasked_where_transformers_masks_them():
    bundle = students.load_student("tiny-lumina-mgpt")
    cond = bundle.encode_prompts(["a S* dog"])
    codes = torch.randint(0, 256, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = bundle.image_logits(cond, codes, torch.zeros(1, dtype=torch.bool))
        prefix, mask = bundle._prefix(cond, torch.zeros(1, dtype=torch.bool))
        theirs = bundle.model(input_ids=prefix, attention_mask=mask).logits[0, -1]
    assert torch.all(theirs[bundle.image_bpe] == torch.finfo(theirs.dtype).min)  # what a plain forward gives
    assert ours.shape == (1, 64, 256) and torch.isfinite(ours).all() and ours.std() > 0.1
    # position 0 of ours is the same state: the lm_head rows of the image tokens, unmasked
    direct = bundle._chameleon(input_ids=prefix, attention_mask=mask).last_hidden_state[0, -1] @ \
        bundle.model.lm_head.weight[bundle.image_bpe].T
    torch.testing.assert_close(ours[0, 0], direct, atol=1e-5, rtol=1e-5)


def test_lora_lands_on_the_decoder_layers_only():
    bundle = students.load_student("tiny-lumina-mgpt")
    add_lora(bundle)
    adapted = [n for n, _ in bundle.model.named_parameters() if "lora_A" in n]
    assert adapted and all(".layers." in n and "vqmodel" not in n for n in adapted)


def test_tiny_vqgan_folder_encodes_like_the_chameleon_encoder(dreambench):
    """The tiny's VQ folder is built as real ones are (a taming VQGAN through vqgan.convert_state_dict):
    its diffusers encoder gives the codes transformers' Chameleon encoder gives."""
    from PIL import Image

    bundle = students.load_student("tiny-lumina-mgpt")
    images = [Image.open(p) for p in sorted((dreambench / "dog").iterdir())[:2]]
    pixels = bundle.images_to_pixels(images)
    with torch.no_grad():
        _, _, (_, _, indices) = bundle.decoder.quantize(bundle.decoder.encode(pixels).latents)
    codes = bundle.encode_images(pixels)
    assert len(codes.unique()) > 4
    assert torch.equal(indices.view(2, -1), codes)


def test_convert_lumina_fills_the_missing_vq_encoder_and_refuses_another_codebook(tmp_path):
    """Released Lumina-mGPT checkpoints carry no Chameleon VQ weights: `proxytune convert lumina-mgpt`
    with Chameleon's vqgan.ckpt gives a student whose encoder comes from the VQGAN."""
    from click.testing import CliRunner

    from proxytune.backends import vqgan
    from proxytune.cli import main

    tiny = students.load_student("tiny-lumina-mgpt")
    full = tiny.model.state_dict()
    tiny.model.save_pretrained(tmp_path / "lumina", state_dict={k: v for k, v in full.items() if ".vqmodel." not in k})
    tiny.tokenizer.save_pretrained(tmp_path / "lumina")
    torch.save({"state_dict": vqgan.to_original_state_dict(tiny.decoder, "taming")}, tmp_path / "vqgan.ckpt")

    result = CliRunner().invoke(main, ["convert", "lumina-mgpt", str(tmp_path / "lumina"), str(tmp_path / "student"),
                                       "--vqgan", str(tmp_path / "vqgan.ckpt"), "--image-size", "64"])
    assert result.exit_code == 0, result.output
    student = students.load_student(str(tmp_path / "student"))
    assert student.backend == "lumina-mgpt" and student.seq_len == 64
    for name, tensor in student._chameleon.vqmodel.state_dict().items():
        assert torch.equal(tensor, tiny._chameleon.vqmodel.state_dict()[name]), name
    pixels = torch.rand(1, 3, 64, 64) * 2 - 1
    assert torch.equal(student.encode_images(pixels), tiny.encode_images(pixels))

    # a checkpoint that has its own VQ weights must share the VQGAN folder's codebook
    other = dict(full)
    other["model.vqmodel.quantize.embedding.weight"] = full["model.vqmodel.quantize.embedding.weight"] + 1
    tiny.model.save_pretrained(tmp_path / "lumina2", state_dict=other)
    tiny.tokenizer.save_pretrained(tmp_path / "lumina2")
    result = CliRunner().invoke(main, ["convert", "lumina-mgpt", str(tmp_path / "lumina2"), str(tmp_path / "student2"),
                                       "--vqgan", str(tmp_path / "vqgan.ckpt"), "--image-size", "64"])
    assert result.exit_code == 0, result.output
    with pytest.raises(ProxytuneError, match="codebook differs"):
        students.load_student(str(tmp_path / "student2"))
