"""The Janus-Pro student backend (tiny JanusForConditionalGeneration): the original's cosine
quantizer, LoRA on the language model only, training by behaviour, adapter round trip, KV cache."""

import torch
import torch.nn.functional as F

from proxytune.backends import janus, students
from conftest import add_lora


def test_prompts_are_left_padded():
    bundle = students.load_student("tiny-janus")
    cond = bundle.encode_prompts(["a S* dog", "a much longer prompt about a S* dog on a beach"])
    assert cond.shape == (2, 2, janus.TINY_PROMPT_LEN) and cond[0, 1].sum() < cond[1, 1].sum()  # left padding


def test_quantizer_is_cosine_as_the_original_not_transformers_euclidean():
    bundle = students.load_student("tiny-janus")
    vq = bundle._janus.vqmodel
    with torch.no_grad():  # codebook rows of very different norms: Euclidean and cosine nearest disagree
        vq.quantize.embedding.weight.mul_(torch.linspace(0.05, 20, vq.config.num_embeddings)[:, None])
    pixels = torch.rand(2, 3, 64, 64) * 2 - 1
    ours = bundle.encode_images(pixels)
    with torch.no_grad():
        z = vq.quant_conv(vq.encoder(pixels))
        _, _, euclidean = vq.quantize(z)
        flat = z.permute(0, 2, 3, 1).reshape(2, 64, -1)
        expected = (F.normalize(flat, dim=-1) @ F.normalize(vq.quantize.embedding.weight, dim=-1).T).argmax(-1)
    assert torch.equal(ours, expected)
    assert not torch.equal(ours.flatten(), euclidean.flatten())


def test_uncond_prompt_pads_the_content_but_keeps_the_ends():
    bundle = students.load_student("tiny-janus")
    cond = bundle.encode_prompts(["a S* dog"])
    ids, mask = cond[:, 0], cond[:, 1]
    uncond = bundle._uncond(ids, mask)
    real = mask[0].nonzero().flatten()
    pad = bundle.tokenizer.pad_token_id
    assert uncond[0, real[0]] == ids[0, real[0]] and uncond[0, -1] == ids[0, -1]  # first token, image start
    assert torch.all(uncond[0, real[1:-1]] == pad) and torch.equal(uncond[0, : real[0]], ids[0, : real[0]])


def test_lora_lands_on_the_language_model_only():
    bundle = students.load_student("tiny-janus")
    add_lora(bundle)
    adapted = [n for n, _ in bundle.model.named_parameters() if "lora_A" in n]
    assert adapted and all(".language_model.layers." in n for n in adapted)
    assert not any("vision" in n or "vqmodel" in n for n in adapted)
    assert len({n.split(".lora_A")[0].rsplit(".", 1)[-1] for n in adapted}) == 7  # q k v o gate up down
