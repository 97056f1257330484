"""The Janus-Pro student backend (tiny JanusForConditionalGeneration): the original's cosine
quantizer, LoRA on the language model only, training by behaviour, adapter round trip, KV cache."""

import torch
import torch.nn.functional as F

from proxytune.backends import students

from proxytune.backends.students.janus import backend as janus
from conftest import add_lora


def test_prompts_are_left_padded():
    bundle = students.load_student("tiny-janus")
    cond = bundle.encode_prompts(["a S* dog", "a much longer prompt about a S* dog on a beach"])
    assert cond.shape == (2, 2, janus.TINY_PROMPT_LEN) and cond[0, 1].sum() < cond[1, 1].sum()  # left padding


def test_a_prompt_longer_than_the_context_keeps_its_image_start_token():
    bundle = students.load_student("tiny-janus")
    cond = bundle.encode_prompts(["a " * 200 + "dog"])
    assert cond[0, 1].all() and cond[0, 0, -1] == bundle.image_start_id  # cut at its start, not its end


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


# The original (deepseek-ai/Janus, generation_inference.py and janus/models/processing_vlm.py): the
# prompt "<|User|>: {prompt}\n\n<|Assistant|>:" + "<begin_of_image>" is encoded by the tokenizer, which
# puts its BOS first and nothing after <begin_of_image>; the CFG row is that list with every token but
# the first and the last replaced by the id of "<｜▁pad▁｜>" in the tokenizer's vocabulary.
PAD = "<\uff5c\u2581pad\u2581\uff5c>"


def test_prompt_is_bos_then_the_chat_text_then_the_image_start_token_and_nothing_after():
    bundle = students.load_student("tiny-janus")
    tok = bundle.tokenizer
    cond = bundle.encode_prompts(["a S* dog"])
    real = cond[0, 0][cond[0, 1] == 1].tolist()
    text = janus.PROMPT_FORMAT.format(prompt="a S* dog")
    assert real == [tok.bos_token_id] + tok.encode(text, add_special_tokens=False) + [tok.convert_tokens_to_ids("<begin_of_image>")]
    assert tok.eos_token_id not in real


def test_uncond_prompt_pads_the_content_with_the_vocabularys_pad_token():
    bundle = students.load_student("tiny-janus")
    pad = bundle.tokenizer.get_vocab()[PAD]
    bundle.tokenizer.pad_token = bundle.tokenizer.eos_token  # the lookup is by name, as the original's
    cond = bundle.encode_prompts(["a S* dog"])
    ids, mask = cond[:, 0], cond[:, 1]
    real = ids[0][mask[0] == 1].tolist()
    uncond = bundle._uncond(ids, mask)
    assert uncond[0][mask[0] == 1].tolist() == [real[0]] + [pad] * (len(real) - 2) + [real[-1]]
    assert torch.equal(uncond[0][mask[0] == 0], ids[0][mask[0] == 0])  # padding untouched (and masked)


def test_lora_lands_on_the_language_model_only():
    bundle = students.load_student("tiny-janus")
    add_lora(bundle)
    adapted = [n for n, _ in bundle.model.named_parameters() if "lora_A" in n]
    assert adapted and all(".language_model.layers." in n for n in adapted)
    assert not any("vision" in n or "vqmodel" in n for n in adapted)
    assert len({n.split(".lora_A")[0].rsplit(".", 1)[-1] for n in adapted}) == 7  # q k v o gate up down


def test_janus_samples_without_top_k_by_default():
    bundle = students.load_student("tiny-janus")
    codes = bundle.generate(["a S* dog"], [0], cfg_scale=5.0, top_k=None)
    assert codes.shape == (1, 64) and int(codes.max()) < bundle.codebook_size


def test_conditions_not_ending_with_the_image_start_are_refused():
    """A codes stage output of an older proxytune (the tiny's end token after the image start) must not
    train or sample silently."""
    import pytest

    from proxytune.errors import ProxytuneError

    bundle = students.load_student("tiny-janus")
    cond = bundle.encode_prompts(["a S* dog"])
    stale = torch.roll(cond, 1, dims=-1)
    with pytest.raises(ProxytuneError, match="run the codes stage again"):
        bundle.image_logits(stale, torch.zeros(1, bundle.seq_len, dtype=torch.long), torch.zeros(1, dtype=torch.bool))
