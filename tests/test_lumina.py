"""The Lumina-mGPT student backend (tiny Chameleon): image logits unmasked, Lumina's row-end layout,
a VQ decoder sharing the codebook, training by behaviour, adapter round trip, KV cache."""

import pytest
import torch

from proxytune.backends import students

from proxytune.backends.students.lumina import backend as lumina
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


def test_tiny_vqgan_folder_encodes_like_the_chameleon_encoder(photos):
    """The tiny's VQ folder is built as real ones are (a taming VQGAN through vqgan.convert_state_dict):
    its diffusers encoder gives the codes transformers' Chameleon encoder gives."""
    from PIL import Image

    bundle = students.load_student("tiny-lumina-mgpt")
    images = [Image.open(p) for p in sorted((photos / "dog").iterdir())[:2]]
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
                                       "--vqgan", str(tmp_path / "vqgan.ckpt"), "--image-size", "128"])
    assert result.exit_code == 0, result.output
    student = students.load_student(str(tmp_path / "student"))
    assert student.backend == "lumina-mgpt" and student.seq_len == 64
    for name, tensor in student._chameleon.vqmodel.state_dict().items():
        assert torch.equal(tensor, tiny._chameleon.vqmodel.state_dict()[name]), name
    pixels = torch.rand(1, 3, 128, 128) * 2 - 1
    assert torch.equal(student.encode_images(pixels), tiny.encode_images(pixels))

    # a checkpoint that has its own VQ weights must share the VQGAN folder's codebook
    other = dict(full)
    other["model.vqmodel.quantize.embedding.weight"] = full["model.vqmodel.quantize.embedding.weight"] + 1
    tiny.model.save_pretrained(tmp_path / "lumina2", state_dict=other)
    tiny.tokenizer.save_pretrained(tmp_path / "lumina2")
    result = CliRunner().invoke(main, ["convert", "lumina-mgpt", str(tmp_path / "lumina2"), str(tmp_path / "student2"),
                                       "--vqgan", str(tmp_path / "vqgan.ckpt"), "--image-size", "128"])
    assert result.exit_code == 0, result.output
    with pytest.raises(ProxytuneError, match="codebook differs"):
        students.load_student(str(tmp_path / "student2"))


# -- the original's token arithmetic ----------------------------------------------------------------
# Restated for these tests from Alpha-VLLM/Lumina-mGPT (data/item_processor.py, data/convertsation.py,
# inference_solver.py, model/modeling_xllmx_chameleon.py, exps/7B.sh) and transformers' Chameleon
# conversion; nothing here calls proxytune's layout code.
#  - Chameleon's vocabulary: <s> 0, <pad> 1, </s> 2; image tokens are the names starting with IMGIMG
#    (ids 4..8195 in the real one); <eoss> 8196 ends an image, <racm3:break> 8197 starts one;
#    <reservedNNNNN> has id NNNNN + 4 (<reserved08706> 8710 ends a turn, <reserved08799> 8803 ends a
#    row); transformers' conversion renames <reserved08707> (8711) to <image>.
#  - an H x W image is <racm3:break> <reserved{8800 + H/32}> <reserved{8800 + W/32}>, then H/16 rows of
#    W/16 code tokens, each row followed by the row end, then <eoss>; the sampler reads a size as id - 8804.
#  - a prompt turn is <s> + "Generate an image of {W}x{H} according to the following prompt:\n{prompt}"
#    + <reserved08706>; the answer turn is the image + <reserved08706>, and fine-tuning labels every token
#    of the answer (cross-entropy over the whole vocabulary, unmasked image logits) plus a z-loss
#    1e-5 * mean(logsumexp(logits)^2) over the same positions.
#  - CFG: the unconditional branch is the sequence from <racm3:break> on, alone (positions from 0).
BOS, IMAGE_END, IMAGE_START, END_TURN, ROW_END = 0, 8196, 8197, 8710, 8803


def size_id(pixels: int) -> int:
    return 8800 + pixels // 32 + 4


def code_name(code: int) -> str:
    return "IMGIMG" + "".join("ABCDEFGHIJ"[int(d)] for d in str(code)) + "Z"


def original_prompt(bundle, prompt: str) -> list[int]:
    side = bundle.image_size
    text = f"Generate an image of {side}x{side} according to the following prompt:\n{prompt}"
    return [BOS] + bundle.tokenizer.encode(text, add_special_tokens=False) + [END_TURN]


def original_answer(bundle, codes: list[int]) -> list[int]:
    vocab = bundle._chameleon.config.vocabulary_map
    side = bundle.image_size // 16  # codes per row and rows
    ids = [IMAGE_START, size_id(bundle.image_size), size_id(bundle.image_size)]
    for r in range(side):
        ids += [vocab[code_name(c)] for c in codes[r * side : (r + 1) * side]] + [ROW_END]
    return ids + [IMAGE_END, END_TURN]


def full_logits(bundle, ids: list[int]) -> torch.Tensor:
    """(T, V) next-token logits of one unpadded sequence over the whole vocabulary, unmasked."""
    with torch.no_grad():
        hidden = bundle._chameleon(input_ids=torch.tensor([ids])).last_hidden_state[0]
    return hidden @ bundle.model.lm_head.weight.T


def code_logits_at_codes(bundle, ids: list[int], first_image_index: int) -> torch.Tensor:
    """(L, K): logits over the codebook's tokens (code order) at every position predicting a code."""
    vocab = bundle._chameleon.config.vocabulary_map
    code_ids = torch.tensor([vocab[code_name(c)] for c in range(bundle.codebook_size)])
    logits = full_logits(bundle, ids)
    is_code = {int(i) for i in code_ids}
    at = [i - 1 for i in range(first_image_index, len(ids)) if ids[i] in is_code]
    return logits[at][:, code_ids]


def test_tiny_vocabulary_puts_chameleons_special_tokens_at_their_real_ids():
    bundle = students.load_student("tiny-lumina-mgpt")
    vocab = bundle._chameleon.config.vocabulary_map
    assert (vocab["<s>"], vocab["<pad>"], vocab["</s>"]) == (0, 1, 2)
    assert (vocab["<eoss>"], vocab["<racm3:break>"], vocab["<image>"]) == (IMAGE_END, IMAGE_START, 8711)
    assert "<reserved08707>" not in vocab  # renamed to <image> by transformers' conversion
    for n in (8706, 8796, 8799, 8800, 8804, 8816, 8824, 8832, 8848):
        assert vocab[f"<reserved{n:05d}>"] == n + 4
    image_ids = sorted(v for k, v in vocab.items() if k.startswith("IMGIMG"))
    assert image_ids == list(range(4, 4 + bundle.codebook_size))  # the start of the real 4..8195
    # the tokenizer agrees with the model's map, and treats the reserved tokens as single special tokens
    assert bundle.tokenizer.convert_tokens_to_ids(["<reserved08706>", "<racm3:break>", "<s>"]) == [END_TURN, IMAGE_START, BOS]


def test_size_tokens_are_pixels_over_32_and_decode_to_the_code_grid():
    assert lumina.size_token(768) == "<reserved08824>" and lumina.size_token(512) == "<reserved08816>"
    assert lumina.size_token(1024) == "<reserved08832>"
    bundle = students.load_student("tiny-lumina-mgpt")
    assert bundle.image_size == 128 and bundle.grid == 8  # a x16 VQ, as Chameleon's
    h, w = bundle.image_prefix[1:].tolist()
    assert h == w == size_id(128)
    assert 2 * (h - 8804) == bundle.grid  # the original sampler's decoding of the size


def test_prompt_is_the_originals_template_between_bos_and_the_end_of_turn():
    bundle = students.load_student("tiny-lumina-mgpt")
    cond = bundle.encode_prompts(["a S* dog", "a S* dog on the beach"])
    for row, prompt in zip(cond, ["a S* dog", "a S* dog on the beach"]):
        ids, mask = row
        assert ids[mask == 1].tolist() == original_prompt(bundle, prompt)
        assert torch.all(mask[: int((mask == 0).sum())] == 0)  # left padding


def test_training_objective_is_the_originals_over_every_image_part_token():
    bundle = students.load_student("tiny-lumina-mgpt")
    codes = torch.randint(0, bundle.codebook_size, (1, bundle.seq_len), generator=torch.Generator().manual_seed(3))
    prompt = original_prompt(bundle, "a S* dog")
    answer = original_answer(bundle, codes[0].tolist())
    ids = prompt + answer
    logits = full_logits(bundle, ids)[:-1]  # position t predicts token t + 1
    labels = torch.tensor(ids[1:])
    labelled = torch.arange(len(ids) - 1) >= len(prompt) - 1  # every answer token is a label
    expected_ce = torch.nn.functional.cross_entropy(logits[labelled], labels[labelled])
    expected_z = torch.logsumexp(logits[labelled], dim=-1).pow(2).mean()
    cond = bundle.encode_prompts(["a S* dog"])
    with torch.no_grad():
        terms = bundle.sequence_loss(cond, codes, torch.zeros(1, dtype=torch.bool), torch.ones(bundle.seq_len))
    torch.testing.assert_close(terms["ce"], expected_ce, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(terms["z_loss"], expected_z, atol=1e-4, rtol=1e-5)
    assert bundle.z_loss_weight == 1e-5  # exps/7B.sh

    # position weighting scales the code tokens' terms only (size, row-end and end tokens weigh 1)
    weights = torch.linspace(2.0, 0.5, bundle.seq_len)
    per_token = torch.nn.functional.cross_entropy(logits[labelled], labels[labelled], reduction="none")
    vocab = bundle._chameleon.config.vocabulary_map
    code_ids = {vocab[code_name(c)] for c in range(bundle.codebook_size)}
    w, k = torch.ones_like(per_token), 0
    for i, token in enumerate(labels[labelled].tolist()):
        if token in code_ids:
            w[i], k = weights[k], k + 1
    with torch.no_grad():
        weighted = bundle.sequence_loss(cond, codes, torch.zeros(1, dtype=torch.bool), weights)["ce"]
    torch.testing.assert_close(weighted, (w * per_token).mean(), atol=1e-5, rtol=1e-5)

    # a dropped (unconditional) row: the image turn alone, its first token given, every later one a label
    u_logits, u_labels = full_logits(bundle, answer)[:-1], torch.tensor(answer[1:])
    with torch.no_grad():
        dropped = bundle.sequence_loss(cond, codes, torch.ones(1, dtype=torch.bool), torch.ones(bundle.seq_len))
    torch.testing.assert_close(dropped["ce"], torch.nn.functional.cross_entropy(u_logits, u_labels), atol=1e-4, rtol=1e-4)


def test_image_logits_see_the_originals_conditional_and_unconditional_contexts():
    bundle = students.load_student("tiny-lumina-mgpt")
    codes = torch.randint(0, bundle.codebook_size, (1, bundle.seq_len), generator=torch.Generator().manual_seed(4))
    prompt, answer = original_prompt(bundle, "a S* dog"), original_answer(bundle, codes[0].tolist())
    cond = bundle.encode_prompts(["a S* dog"])
    with torch.no_grad():
        ours_c = bundle.image_logits(cond, codes, torch.zeros(1, dtype=torch.bool))[0]
        ours_u = bundle.image_logits(cond, codes, torch.ones(1, dtype=torch.bool))[0]
    torch.testing.assert_close(ours_c, code_logits_at_codes(bundle, prompt + answer, len(prompt)), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours_u, code_logits_at_codes(bundle, answer, 0), atol=1e-4, rtol=1e-4)


def test_guided_greedy_sampling_follows_the_originals_contexts():
    """Greedy decoding with CFG 3 through the KV cache gives the codes an independent loop over the
    original's two contexts gives (row ends forced, logits over the image tokens)."""
    bundle = students.load_student("tiny-lumina-mgpt")
    steps = bundle.grid + 2  # past the first row end
    vocab = bundle._chameleon.config.vocabulary_map
    code_ids = [vocab[code_name(c)] for c in range(bundle.codebook_size)]
    cond_ctx = original_prompt(bundle, "a S* dog") + [IMAGE_START, size_id(128), size_id(128)]
    uncond_ctx = [IMAGE_START, size_id(128), size_id(128)]
    expected = []
    while len(expected) < steps:
        if len(expected) and len(expected) % bundle.grid == 0 and cond_ctx[-1] != ROW_END:
            cond_ctx, uncond_ctx = cond_ctx + [ROW_END], uncond_ctx + [ROW_END]
            continue
        c, u = full_logits(bundle, cond_ctx)[-1, code_ids], full_logits(bundle, uncond_ctx)[-1, code_ids]
        code = int((u + 3.0 * (c - u)).argmax())
        expected.append(code)
        cond_ctx, uncond_ctx = cond_ctx + [code_ids[code]], uncond_ctx + [code_ids[code]]
    sampled = bundle.generate(["a S* dog"], [0], cfg_scale=3.0, temperature=0)
    assert sampled[0, :steps].tolist() == expected


def test_conditions_not_in_the_prompt_turn_layout_are_refused():
    """A codes stage output of an older proxytune (bare prompts) must not train or sample silently."""
    bundle = students.load_student("tiny-lumina-mgpt")
    cond = bundle.encode_prompts(["a S* dog"])
    stale = torch.roll(cond, 1, dims=-1)  # the end of turn is no longer last
    with pytest.raises(ProxytuneError, match="run the codes stage again"):
        bundle.image_logits(stale, torch.zeros(1, bundle.seq_len, dtype=torch.long), torch.zeros(1, dtype=torch.bool))
