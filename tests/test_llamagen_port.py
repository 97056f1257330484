"""The LlamaGen port proved against the original math: a random checkpoint in the ORIGINAL key
layout, converted onto transformers Llama with 2D RoPE, gives the logits that LlamaGen's own
formulation (fused wqkv, interleaved complex RoPE, zeroed caption slots) computes here with
plain torch ops; wrong permutations and the 1D RoPE are caught; checkpoint files round-trip."""

import argparse
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from proxytune.backends import ar, llamagen
from proxytune.errors import ProxytuneError

TOL = 1e-4


@pytest.fixture(scope="module")
def config():
    return llamagen.llamagen_t2i_tiny()


def original_checkpoint(config, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors of the right shapes under LlamaGen's key names; norms near 1 but not 1."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in llamagen.original_shapes(config).items():
        if len(shape) == 1:  # RMSNorm weights
            state[key] = 1.0 + 0.2 * torch.randn(shape, generator=gen)
        elif key == "cls_embedding.uncond_embedding":
            state[key] = torch.randn(shape, generator=gen) / math.sqrt(shape[1])
        else:  # (out, in) projections and embeddings
            state[key] = torch.randn(shape, generator=gen) / math.sqrt(shape[-1])
    return state


def inputs(config, batch: int = 2, seed: int = 1):
    """Caption features with trailing pads zeroed, codes, and a CFG drop on the second row."""
    gen = torch.Generator().manual_seed(seed)
    text = torch.randn(batch, config.cond_len, config.text_dim, generator=gen)
    text[0, config.cond_len // 2 :] = 0  # a short caption: pad features are zero
    codes = torch.randint(0, config.codebook_size, (batch, config.seq_len), generator=gen)
    drop = torch.tensor([False, True][:batch])
    return text, codes, drop


# -----------------------------------------------------------------------------
# the original LlamaGen forward, written independently of the port


def original_freqs_cis(grid_size: int, n_elem: int, base: float, cls_token_num: int) -> torch.Tensor:
    """LlamaGen's 2D table as complex numbers: (cls + grid^2, n_elem / 2), zeros for the caption."""
    half_dim = n_elem // 2
    freqs = 1.0 / (base ** (torch.arange(0, half_dim, 2)[: half_dim // 2].float() / half_dim))
    freqs = torch.outer(torch.arange(grid_size), freqs)  # (g, n_elem / 4)
    freqs_grid = torch.cat(
        [freqs[:, None, :].expand(-1, grid_size, -1), freqs[None, :, :].expand(grid_size, -1, -1)], dim=-1
    )  # (g, g, n_elem / 2): rows first, then columns
    cache = torch.stack([freqs_grid.cos(), freqs_grid.sin()], dim=-1).flatten(0, 1)  # (g*g, n_elem / 2, 2)
    cache = torch.cat([torch.zeros(cls_token_num, half_dim, 2), cache])
    return torch.view_as_complex(cache.contiguous())


def rotate_interleaved(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """(B, T, n, d) with pairs (x[2i], x[2i+1]) multiplied by freqs_cis (T, d/2) as complex numbers."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * freqs_cis[None, :, None, :]).flatten(3)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def original_logits(sd, config, text, codes, drop) -> torch.Tensor:
    """LlamaGen T2I GPT teacher-forced logits (B, L, V) from its own state dict."""
    H, n = config.hidden_size, config.num_attention_heads
    d, C, eps = H // n, config.cond_len, config.rms_norm_eps
    # caption: fixed uncond embedding where dropped, then fc1 -> tanh-GELU -> fc2 (no biases)
    cap = torch.where(drop[:, None, None], sd["cls_embedding.uncond_embedding"], text)
    cap = F.gelu(cap @ sd["cls_embedding.cap_proj.fc1.weight"].T, approximate="tanh")
    cap = cap @ sd["cls_embedding.cap_proj.fc2.weight"].T
    x = torch.cat([cap, sd["tok_embeddings.weight"][codes[:, :-1]]], dim=1)  # (B, T, H)
    B, T, _ = x.shape
    freqs_cis = original_freqs_cis(config.grid_size, d, config.rope_theta, C)[:T]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(config.num_hidden_layers):
        p = f"layers.{i}."
        h = rms_norm(x, sd[p + "attention_norm.weight"], eps)
        q, k, v = (h @ sd[p + "attention.wqkv.weight"].T).split(H, dim=-1)
        q = rotate_interleaved(q.view(B, T, n, d), freqs_cis).transpose(1, 2)  # (B, n, T, d)
        k = rotate_interleaved(k.view(B, T, n, d), freqs_cis).transpose(1, 2)
        v = v.view(B, T, n, d).transpose(1, 2)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(d)  # (B, n, T, T)
        attn = scores.masked_fill(~causal, float("-inf")).softmax(dim=-1) @ v
        x = x + attn.transpose(1, 2).reshape(B, T, H) @ sd[p + "attention.wo.weight"].T
        h = rms_norm(x, sd[p + "ffn_norm.weight"], eps)
        ffn = F.silu(h @ sd[p + "feed_forward.w1.weight"].T) * (h @ sd[p + "feed_forward.w3.weight"].T)
        x = x + ffn @ sd[p + "feed_forward.w2.weight"].T
    x = rms_norm(x, sd["norm.weight"], eps)
    return (x @ sd["output.weight"].T)[:, C - 1 :]  # caption slots before the last predict nothing


# -----------------------------------------------------------------------------
# helpers


def student_from(state, config, cls=llamagen.LlamaGenStudent):
    model = cls(config).eval()
    model.load_state_dict(state, strict=True)
    return model


@torch.no_grad()
def logits_of(model, text, codes, drop) -> torch.Tensor:
    return model(text, codes, drop_cond=drop)


@pytest.fixture(scope="module")
def case(config):
    """The original checkpoint, its conversion, the inputs and the original logits."""
    original = original_checkpoint(config)
    text, codes, drop = inputs(config)
    with torch.no_grad():
        expected = original_logits(original, config, text, codes, drop)
    return original, llamagen.convert_state_dict(original, config), (text, codes, drop), expected


def per_half_permutation(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Interleaved -> rotate-half within the row half and the column half of each head separately."""
    out_dim, in_dim = weight.shape
    d = out_dim // num_heads
    halves = weight.reshape(num_heads, 2, d // 4, 2, in_dim)  # head, axis, pair, member
    return halves.transpose(2, 3).reshape(out_dim, in_dim)


# -----------------------------------------------------------------------------
# tests


def test_converted_model_reproduces_the_original_logits(config, case):
    original, converted, (text, codes, drop), expected = case
    assert expected.shape == (2, config.seq_len, config.codebook_size)
    model = student_from(converted, config)
    assert isinstance(model, ar.ARStudent)
    got = logits_of(model, text, codes, drop)
    err = (got - expected).abs().max().item()
    assert err < TOL, err
    assert expected.std() > 0.5  # logits of a non-degenerate model, not a trivially small number
    # the caption really matters: the dropped row differs from the same row with its caption
    assert not torch.allclose(got[1], logits_of(model, text, codes, torch.tensor([False, False]))[1], atol=1e-2)


@pytest.mark.parametrize("wrong", ["no permutation", "per-half permutation", "1D RoPE"])
def test_wrong_ports_are_caught(config, case, wrong):
    original, converted, (text, codes, drop), expected = case
    state, cls = dict(converted), llamagen.LlamaGenStudent
    H, heads = config.hidden_size, config.num_attention_heads
    for i in range(config.num_hidden_layers):
        q, k, _ = original[f"layers.{i}.attention.wqkv.weight"].split(H)
        dst = f"backbone.layers.{i}.self_attn."
        if wrong == "no permutation":
            state[dst + "q_proj.weight"], state[dst + "k_proj.weight"] = q, k
        elif wrong == "per-half permutation":
            state[dst + "q_proj.weight"] = per_half_permutation(q, heads)
            state[dst + "k_proj.weight"] = per_half_permutation(k, heads)
    if wrong == "1D RoPE":  # the right weights on the plain student's 1D rotary embedding
        cls = ar.ARStudent
    err = (logits_of(student_from(state, config, cls), text, codes, drop) - expected).abs().max().item()
    assert err > 1000 * TOL, (wrong, err)


def test_caption_slots_get_exactly_zero_q_and_k(config):
    model = llamagen.LlamaGenStudent(config)
    C, T, d = config.cond_len, config.cond_len + config.seq_len, llamagen.head_dim(config)
    x = torch.zeros(1, T, config.hidden_size)
    cos, sin = model.backbone.rotary_emb(x, torch.arange(T)[None])  # what LlamaModel hands its layers
    q, k = torch.randn(2, 1, config.num_attention_heads, T, d).unbind(0)
    q_rot, k_rot = apply_rotary_pos_emb(q, k, cos, sin)  # transformers' own rotation
    assert torch.equal(q_rot[:, :, :C], torch.zeros_like(q_rot[:, :, :C]))
    assert torch.equal(k_rot[:, :, :C], torch.zeros_like(k_rot[:, :, :C]))
    assert (q_rot[:, :, C:].abs().sum(-1) > 0).all()
    # image positions: a rotation, so norms are kept; the first code is at row 0, column 0
    torch.testing.assert_close(q_rot[:, :, C:].norm(dim=-1), q[:, :, C:].norm(dim=-1))
    torch.testing.assert_close(q_rot[:, :, C], q[:, :, C])


def test_kv_cache_equals_full_pass(config, case):
    _, converted, (text, codes, drop), _ = case
    model = student_from(converted, config)
    full = logits_of(model, text, codes, drop)
    cache = DynamicCache()
    with torch.no_grad():
        steps = [
            model(text, codes[:, : t + 1], drop_cond=drop, past_key_values=cache, use_cache=True)[:, -1]
            for t in range(config.seq_len)
        ]
    torch.testing.assert_close(torch.stack(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_checkpoint_files_round_trip(config, case, tmp_path):
    original, converted, (text, codes, drop), expected = case
    reference = logits_of(student_from(converted, config), text, codes, drop)
    training_ckpt = {"model": original, "steps": 7, "args": argparse.Namespace(gpt_model="GPT-XL", lr=1e-4)}
    torch.save(training_ckpt, tmp_path / "wrapped.pt")
    torch.save(original, tmp_path / "bare.pt")
    from safetensors.torch import save_file

    save_file(original, tmp_path / "bare.safetensors")
    for name in ("wrapped.pt", "bare.pt", "bare.safetensors"):
        model = llamagen.load_original_checkpoint(tmp_path / name, config)
        assert not model.training
        assert torch.equal(logits_of(model, text, codes, drop), reference), name
    # a saved port reloads as itself, 2D RoPE included
    model.save_pretrained(tmp_path / "port")
    again = llamagen.LlamaGenStudent.from_pretrained(tmp_path / "port").eval()
    assert again.config.model_type == "proxytune_llamagen"
    assert torch.equal(logits_of(again, text, codes, drop), reference)
    half = llamagen.load_original_checkpoint(tmp_path / "bare.pt", config, dtype=torch.bfloat16)
    assert half.lm_head.weight.dtype == torch.bfloat16


def test_bad_checkpoints_are_clear_errors(config, case, tmp_path):
    original = case[0]
    without = {k: v for k, v in original.items() if k != "norm.weight"}
    with pytest.raises(ProxytuneError, match=r"missing keys norm\.weight"):
        llamagen.convert_state_dict(without, config)
    with pytest.raises(ProxytuneError, match=r"unexpected keys extra\.bias"):
        llamagen.convert_state_dict({**original, "extra.bias": torch.zeros(1)}, config)
    wide = {**original, "output.weight": torch.zeros(config.codebook_size + 1, config.hidden_size)}
    with pytest.raises(ProxytuneError, match=r"output\.weight has shape \(65, 64\)"):
        llamagen.convert_state_dict(wide, config)
    torch.save({"model": original, "hook": ProxytuneError("pickled code")}, tmp_path / "unsafe.pt")
    with pytest.raises(ProxytuneError, match="weights only"):
        llamagen.load_original_checkpoint(tmp_path / "unsafe.pt", config)
    with pytest.raises(ProxytuneError, match="no such file"):
        llamagen.load_original_checkpoint(tmp_path / "absent.pt", config)


def test_xl_preset_maps_every_key_at_full_size():
    """Shapes only: the real-size conversion on the meta device (no memory, no random init)."""
    config = llamagen.llamagen_t2i_xl()
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (1280, 36, 20)
    assert (config.intermediate_size, config.cond_len, config.text_dim, config.seq_len) == (3584, 120, 2048, 256)
    shapes = llamagen.original_shapes(config)
    assert len(shapes) == 6 + 7 * 36
    assert 770e6 < sum(math.prod(s) for s in shapes.values()) < 780e6  # "775M" GPT-XL
    original = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    with torch.device("meta"):
        model = llamagen.LlamaGenStudent(config)
    model.load_state_dict(llamagen.convert_state_dict(original, config), strict=True, assign=True)
    cos, sin = llamagen.rope_2d_tables(config)
    assert cos.shape == sin.shape == (120 + 256, 64)


def test_original_checkpoint_becomes_a_student_folder_that_trains_and_samples(config, case, tmp_path):
    """`convert_to_student_folder` (and `proxytune convert llamagen`): transformer/ converted, the VQ
    converted from its original checkpoint, T5 named in proxytune_student.json; the folder loads
    through the student dispatcher."""
    from test_vqgan import original_state
    from transformers import T5Config, T5EncoderModel

    from proxytune.backends import students
    from proxytune.backends.tokenizer import EOS_ID, char_vocab_size, write_char_clip_tokenizer

    original, _, (text, codes, drop), expected = case
    torch.save({"model": original}, tmp_path / "t2i.pt")
    vq = original_state("llamagen", ch_mult=(1, 1, 2), enc_attn=(False, False, True), dec_attn=(True, False, False),
                        embed=8, codes=config.codebook_size)  # x4: a 4 x 4 grid at 16 px
    torch.save({"model": vq}, tmp_path / "vq_ds16_t2i.pt")
    T5EncoderModel(T5Config(vocab_size=char_vocab_size(), d_model=config.text_dim, d_kv=8, d_ff=32, num_layers=1,
                            num_heads=2, pad_token_id=EOS_ID, eos_token_id=EOS_ID)).save_pretrained(tmp_path / "t5")
    write_char_clip_tokenizer(tmp_path / "t5", model_max_length=config.cond_len)

    from click.testing import CliRunner

    from proxytune.cli import main

    result = CliRunner().invoke(main, ["convert", "llamagen", str(tmp_path / "t2i.pt"), str(tmp_path / "student"),
                                       "--vq", str(tmp_path / "vq_ds16_t2i.pt"), "--text-encoder", str(tmp_path / "t5"),
                                       "--image-size", "16", "--preset", "tiny"])
    assert result.exit_code == 0, result.output
    bundle = students.load_student(str(tmp_path / "student"))
    assert bundle.backend == "llamagen" and type(bundle.model) is llamagen.LlamaGenStudent
    assert bundle.seq_len == 16 and bundle.image_size == 16
    assert bundle.vq.config.up_block_types[0] == "AttnUpDecoderBlock2D"  # LlamaGen's attending levels kept
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no scratch left behind
    with torch.no_grad():
        torch.testing.assert_close(bundle.model(text, codes, drop_cond=drop), expected, atol=TOL, rtol=TOL)
        sampled = bundle.generate(["a S* dog"], [0], cfg_scale=2.0, top_k=8)
    assert sampled.shape == (1, 16) and bundle.decode_codes(sampled)[0].size == (16, 16)
    again = CliRunner().invoke(main, ["convert", "llamagen", str(tmp_path / "t2i.pt"), str(tmp_path / "student"),
                                      "--vq", str(tmp_path / "vq_ds16_t2i.pt")])
    assert again.exit_code == 2 and "already exists" in again.output + again.stderr
