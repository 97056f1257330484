"""The LlamaGen port proved against the original math: a random checkpoint in the ORIGINAL key
layout and shapes (120-row null caption), converted onto transformers Llama with 2D RoPE, gives the
logits that LlamaGen's own formulation computes here with plain torch ops: fused wqkv, interleaved
complex RoPE, zeroed caption slots, captions LEFT-padded into the slots with the pad slots hidden
from every position but themselves, in the conditional and in the CFG-null branch. Wrong
permutations, the 1D RoPE and a missing pad mask are caught; checkpoint files round-trip; the
converter reads the architecture from the checkpoint."""

import argparse
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from proxytune.backends.students.llamagen import convert as llamagen_convert

from proxytune.backends.students.llamagen import model as llamagen_model
from proxytune.errors import ProxytuneError

TOL = 1e-4
SHORT, LONG = 11, 40  # caption tokens of the two test prompts (the original's slots: 120)


@pytest.fixture(scope="module")
def config():
    return llamagen_model.llamagen_t2i_tiny()


def original_checkpoint(config, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under the key names and shapes gpt.py's rules give (`releases.llamagen.gpt_shapes`:
    the null caption always has 120 rows) for the tiny config; norms near 1 but not 1."""
    from releases import llamagen as release

    args = {**release.TINY_GPT_STAGE1, "multiple_of": 32}  # llamagen_t2i_tiny: FFN rounded to 32, not 256
    assert (config.hidden_size, config.num_hidden_layers, config.codebook_size, config.text_dim) == (64, 2, 64, 32)
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in release.gpt_shapes(args).items():
        if len(shape) == 1:  # RMSNorm weights
            state[key] = 1.0 + 0.2 * torch.randn(shape, generator=gen)
        else:  # (out, in) projections, embeddings and the null caption
            state[key] = torch.randn(shape, generator=gen) / math.sqrt(shape[-1])
    assert state["cls_embedding.uncond_embedding"].shape == (120, config.text_dim)
    return state


def left_padded(features: list[torch.Tensor], slots: int) -> torch.Tensor:
    """What the original's dataset and sampler hand the GPT: each caption's (n, Dt) T5 features in
    the LAST n of `slots` rows, zeros before them."""
    out = torch.zeros(len(features), slots, features[0].shape[-1])
    for row, f in enumerate(features):
        out[row, slots - len(f) :] = f
    return out


def inputs(config, seed: int = 1):
    """Caption features of an 11-token and a 40-token caption (left-padded), their token counts, codes."""
    gen = torch.Generator().manual_seed(seed)
    lengths = [SHORT, LONG]
    text = left_padded([torch.randn(n, config.text_dim, generator=gen) for n in lengths], config.cond_len)
    codes = torch.randint(0, config.codebook_size, (2, config.seq_len), generator=gen)
    return text, torch.tensor(lengths), codes


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


def original_attention_mask(lengths: torch.Tensor, cond_len: int, total: int) -> torch.Tensor:
    """(B, T, T) bool, as the original's dataset builds it for training and its sampler for the KV
    cache: causal; the caption columns of the pad slots (the first C - n) switched off for every
    query; then the diagonal switched back on (a pad slot sees itself)."""
    emb_mask = torch.arange(cond_len)[None, :] >= (cond_len - lengths)[:, None]  # (B, C): True on tokens
    mask = torch.ones(total, total, dtype=torch.bool).tril().repeat(len(lengths), 1, 1)
    mask[:, :, :cond_len] &= emb_mask[:, None, :]
    return mask | torch.eye(total, dtype=torch.bool)


def original_logits(sd, config, text, lengths, codes, drop) -> torch.Tensor:
    """LlamaGen T2I GPT teacher-forced logits (B, L, V) from its own state dict, in eval mode.

    Args:
        text: (B, C, Dt) left-padded caption features; lengths: (B,) their token counts.
        drop: (B,) bool: the CFG-null branch (its caption is the null embedding, its mask the caption's).
    """
    H, n = config.hidden_size, config.num_attention_heads
    d, C, eps = H // n, config.cond_len, config.rms_norm_eps
    # caption: the first C rows of the 120-row null caption where dropped, then fc1 -> tanh-GELU -> fc2
    null = sd["cls_embedding.uncond_embedding"][:C]
    cap = torch.where(drop[:, None, None], null, text)
    cap = F.gelu(cap @ sd["cls_embedding.cap_proj.fc1.weight"].T, approximate="tanh")
    cap = cap @ sd["cls_embedding.cap_proj.fc2.weight"].T
    x = torch.cat([cap, sd["tok_embeddings.weight"][codes[:, :-1]]], dim=1)  # (B, T, H)
    B, T, _ = x.shape
    freqs_cis = original_freqs_cis(config.grid_size, d, config.rope_theta, C)[:T]
    allowed = original_attention_mask(lengths, C, T)[:, None]  # (B, 1, T, T)
    for i in range(config.num_hidden_layers):
        p = f"layers.{i}."
        h = rms_norm(x, sd[p + "attention_norm.weight"], eps)
        q, k, v = (h @ sd[p + "attention.wqkv.weight"].T).split(H, dim=-1)
        q = rotate_interleaved(q.view(B, T, n, d), freqs_cis).transpose(1, 2)  # (B, n, T, d)
        k = rotate_interleaved(k.view(B, T, n, d), freqs_cis).transpose(1, 2)
        v = v.view(B, T, n, d).transpose(1, 2)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(d)  # (B, n, T, T)
        attn = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1) @ v
        x = x + attn.transpose(1, 2).reshape(B, T, H) @ sd[p + "attention.wo.weight"].T
        h = rms_norm(x, sd[p + "ffn_norm.weight"], eps)
        ffn = F.silu(h @ sd[p + "feed_forward.w1.weight"].T) * (h @ sd[p + "feed_forward.w3.weight"].T)
        x = x + ffn @ sd[p + "feed_forward.w2.weight"].T
    x = rms_norm(x, sd["norm.weight"], eps)
    return (x @ sd["output.weight"].T)[:, C - 1 :]  # caption slots before the last predict nothing


def original_greedy_cfg(sd, config, text, lengths, cfg_scale: float) -> torch.Tensor:
    """The original sampler's choices at temperature -> 0: [cond; null] batch, null masked like its
    caption, logits = uncond + s (cond - uncond), argmax; recomputed from scratch every step."""
    B, L = len(text), config.seq_len
    codes = torch.zeros(B, L, dtype=torch.long)
    both = torch.cat([text, text]), torch.cat([lengths, lengths])
    drop = torch.tensor([False] * B + [True] * B)
    for t in range(L):
        logits = original_logits(sd, config, *both, torch.cat([codes, codes]), drop)[:, t]
        cond, uncond = logits.chunk(2)
        codes[:, t] = (uncond + cfg_scale * (cond - uncond)).argmax(-1)
    return codes


# -----------------------------------------------------------------------------
# helpers

BRANCHES = {"conditional": torch.tensor([False, False]), "cfg-null": torch.tensor([True, True])}


def student_from(state, config, cls=llamagen_model.LlamaGenStudent):
    model = cls(config).eval()
    model.load_state_dict(state, strict=True)
    return model


@torch.no_grad()
def logits_of(model, text, codes, drop) -> torch.Tensor:
    return model(text, codes, drop_cond=drop)


@pytest.fixture(scope="module")
def case(config):
    """The original checkpoint, its conversion, the inputs and the original logits of both CFG branches."""
    original = original_checkpoint(config)
    text, lengths, codes = inputs(config)
    with torch.no_grad():
        expected = {b: original_logits(original, config, text, lengths, codes, drop) for b, drop in BRANCHES.items()}
    return original, llamagen_convert.convert_state_dict(original, config), (text, lengths, codes), expected


def per_half_permutation(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Interleaved -> rotate-half within the row half and the column half of each head separately."""
    out_dim, in_dim = weight.shape
    d = out_dim // num_heads
    halves = weight.reshape(num_heads, 2, d // 4, 2, in_dim)  # head, axis, pair, member
    return halves.transpose(2, 3).reshape(out_dim, in_dim)


# -----------------------------------------------------------------------------
# tests


@pytest.mark.parametrize("branch", BRANCHES)
def test_short_captions_give_the_original_logits(config, case, branch):
    """An 11-token and a 40-token caption in the original's 120 slots, conditional and CFG-null."""
    original, converted, (text, lengths, codes), expected = case
    assert expected[branch].shape == (2, config.seq_len, config.codebook_size)
    model = student_from(converted, config)
    assert isinstance(model, llamagen_model.ARStudent)
    got = logits_of(model, text, codes, BRANCHES[branch])
    err = (got - expected[branch]).abs().max().item()
    assert err < TOL, err
    assert expected[branch].std() > 0.5  # logits of a non-degenerate model, not a trivially small number
    # the pad mask matters: the original without it (every slot visible) is far from what it computes
    unmasked = original_logits(original, config, text, torch.full_like(lengths, config.cond_len), codes,
                               BRANCHES[branch])
    assert (unmasked - expected[branch]).abs().max() > 0.1


def test_the_null_branch_is_masked_like_its_caption(config, case):
    """The CFG-null rows differ by caption length only through the mask (their features are the same)."""
    _, converted, (text, lengths, codes), expected = case
    model = student_from(converted, config)
    same_codes = codes[:1].expand(2, -1)
    null = logits_of(model, text, same_codes, BRANCHES["cfg-null"])
    assert not torch.allclose(null[0], null[1], atol=1e-2)  # 11 vs 40 visible null slots, same codes
    # only which slots are padding is read from the caption: other non-zero features change nothing
    other = torch.where(text != 0, torch.ones_like(text), text)
    assert torch.equal(logits_of(model, other, same_codes, BRANCHES["cfg-null"]), null)
    # and the caption really matters: the conditional branch differs from the null one
    assert not torch.allclose(expected["conditional"], expected["cfg-null"], atol=1e-2)


@pytest.mark.parametrize("wrong", ["no permutation", "per-half permutation", "1D RoPE"])
def test_wrong_ports_are_caught(config, case, wrong):
    original, converted, (text, lengths, codes), expected = case
    state, cls = dict(converted), llamagen_model.LlamaGenStudent
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
        cls = llamagen_model.ARStudent
    got = logits_of(student_from(state, config, cls), text, codes, BRANCHES["conditional"])
    err = (got - expected["conditional"]).abs().max().item()
    assert err > 1000 * TOL, (wrong, err)


def test_caption_slots_get_exactly_zero_q_and_k(config):
    model = llamagen_model.LlamaGenStudent(config)
    C, T, d = config.cond_len, config.cond_len + config.seq_len, llamagen_model.head_dim(config)
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


@pytest.mark.parametrize("branch", BRANCHES)
def test_kv_cache_equals_full_pass(config, case, branch):
    _, converted, (text, _, codes), _ = case
    model = student_from(converted, config)
    drop = BRANCHES[branch]
    full = logits_of(model, text, codes, drop)
    cache = DynamicCache()
    with torch.no_grad():
        steps = [
            model(text, codes[:, : t + 1], drop_cond=drop, past_key_values=cache, use_cache=True)[:, -1]
            for t in range(config.seq_len)
        ]
    torch.testing.assert_close(torch.stack(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_eager_attention_gives_the_same_logits(config, case):
    """The pad mask is built for SDPA (bool) and for eager attention (additive) alike."""
    _, converted, (text, _, codes), expected = case
    model = student_from(converted, config)
    model.set_attn_implementation("eager")
    got = logits_of(model, text, codes, BRANCHES["cfg-null"])
    assert (got - expected["cfg-null"]).abs().max().item() < TOL


def test_original_shaped_checkpoint_with_fewer_caption_slots(config):
    """The original allocates 120 null-caption rows whatever cls_token_num is and reads the first
    cls_token_num: a checkpoint trained with 8 slots converts (shapes read from it) and matches."""
    original = original_checkpoint(config, seed=3)
    short = llamagen_convert.config_from_state_dict(original, grid_size=config.grid_size, cond_len=8, num_heads=4)
    assert (short.hidden_size, short.codebook_size, short.text_dim) == (64, 64, 32)
    assert (short.num_hidden_layers, short.intermediate_size, short.cond_len) == (2, config.intermediate_size, 8)
    model = student_from(llamagen_convert.convert_state_dict(original, short), short)
    assert model.uncond_embedding.shape == (8, 32)
    gen = torch.Generator().manual_seed(4)
    text = torch.randn(2, 8, 32, generator=gen)  # captions filling all 8 slots
    codes = torch.randint(0, 64, (2, short.seq_len), generator=gen)
    for drop in BRANCHES.values():
        expected = original_logits(original, short, text, torch.tensor([8, 8]), codes, drop)
        assert (logits_of(model, text, codes, drop) - expected).abs().max().item() < TOL


def test_checkpoint_files_round_trip(config, case, tmp_path):
    original, converted, (text, _, codes), expected = case
    drop = BRANCHES["conditional"]
    reference = logits_of(student_from(converted, config), text, codes, drop)
    training_ckpt = {"model": original, "steps": 7, "args": argparse.Namespace(gpt_model="GPT-XL", lr=1e-4)}
    torch.save(training_ckpt, tmp_path / "wrapped.pt")
    torch.save(original, tmp_path / "bare.pt")
    from safetensors.torch import save_file

    save_file(original, tmp_path / "bare.safetensors")
    for name in ("wrapped.pt", "bare.pt", "bare.safetensors"):
        model = llamagen_convert.load_original_checkpoint(tmp_path / name, config)
        assert not model.training
        assert torch.equal(logits_of(model, text, codes, drop), reference), name
    # without a config, the architecture comes from the checkpoint (heads given: 64 is no original width)
    inferred = llamagen_convert.load_original_checkpoint(tmp_path / "bare.pt", grid_size=config.grid_size, num_heads=4)
    assert torch.equal(logits_of(inferred, text, codes, drop), reference)
    # a saved port reloads as itself, 2D RoPE included
    model.save_pretrained(tmp_path / "port")
    again = llamagen_model.LlamaGenStudent.from_pretrained(tmp_path / "port").eval()
    assert again.config.model_type == "proxytune_llamagen"
    assert torch.equal(logits_of(again, text, codes, drop), reference)
    half = llamagen_convert.load_original_checkpoint(tmp_path / "bare.pt", config, dtype=torch.bfloat16)
    assert half.lm_head.weight.dtype == torch.bfloat16


def test_bad_checkpoints_are_clear_errors(config, case, tmp_path):
    original = case[0]
    without = {k: v for k, v in original.items() if k != "norm.weight"}
    with pytest.raises(ProxytuneError, match=r"missing keys norm\.weight"):
        llamagen_convert.convert_state_dict(without, config)
    with pytest.raises(ProxytuneError, match=r"unexpected keys extra\.bias"):
        llamagen_convert.convert_state_dict({**original, "extra.bias": torch.zeros(1)}, config)
    wide = {**original, "output.weight": torch.zeros(config.codebook_size + 1, config.hidden_size)}
    with pytest.raises(ProxytuneError, match=r"output\.weight has shape \(65, 64\)"):
        llamagen_convert.convert_state_dict(wide, config)
    few = {**original, "cls_embedding.uncond_embedding": torch.zeros(100, config.text_dim)}
    with pytest.raises(ProxytuneError, match=r"uncond_embedding has shape \(100, 32\), config expects \(>= 120, 32\)"):
        llamagen_convert.convert_state_dict(few, config)
    with pytest.raises(ProxytuneError, match="100 rows, fewer than the 120 caption slots"):
        llamagen_convert.config_from_state_dict(few, grid_size=4, num_heads=4)
    with pytest.raises(ProxytuneError, match="width 64 is none of the original GPT presets"):
        llamagen_convert.config_from_state_dict(original, grid_size=4)
    with pytest.raises(ProxytuneError, match=r"missing key tok_embeddings\.weight"):
        llamagen_convert.config_from_state_dict({"norm.weight": torch.ones(3)}, grid_size=4)
    torch.save({"model": original, "hook": ProxytuneError("pickled code")}, tmp_path / "unsafe.pt")
    with pytest.raises(ProxytuneError, match="weights only"):
        llamagen_convert.load_original_checkpoint(tmp_path / "unsafe.pt", config)
    with pytest.raises(ProxytuneError, match="no such file"):
        llamagen_convert.load_original_checkpoint(tmp_path / "absent.pt", config)


@pytest.mark.parametrize("release_args", ["GPT_XL_STAGE1_256", "GPT_XL_STAGE2_512"])
def test_xl_preset_maps_every_key_at_full_size(release_args):
    """Shapes only, on the meta device (no memory, no random init): every tensor the released
    t2i_XL_stage1_256.pt / t2i_XL_stage2_512.pt holds (gpt.py's rules, `releases.llamagen.gpt_shapes`)
    is what the converter expects, the architecture read from them is the XL preset, and the
    conversion fills every tensor of the full-size student. The two files hold the same tensors; they
    differ in block_size only, which is the student's 2D RoPE table: equal to gpt.py's
    precompute_freqs_cis_2d for a 16 x 16 or 32 x 32 grid, in rotate-half order."""
    from releases import llamagen as release

    args = getattr(release, release_args)
    grid = math.isqrt(args["block_size"])
    config = llamagen_model.llamagen_t2i_xl(grid_size=grid)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (1280, 36, 20)
    assert (config.intermediate_size, config.cond_len, config.text_dim, config.seq_len) == (3584, 120, 2048, grid**2)
    released = release.gpt_shapes(args)
    assert released == llamagen_convert.original_shapes(config)
    assert len(released) == 6 + 7 * 36
    assert 770e6 < sum(math.prod(s) for s in released.values()) < 780e6  # "775M" GPT-XL
    original = {k: torch.empty(s, device="meta") for k, s in released.items()}
    assert llamagen_convert.config_from_state_dict(original, grid_size=grid).to_dict() == config.to_dict()
    with torch.device("meta"):
        model = llamagen_model.LlamaGenStudent(config)
    converted = llamagen_convert.convert_state_dict(original, config)
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in model.state_dict().items()}
    model.load_state_dict(converted, strict=True, assign=True)
    cos, sin = llamagen_model.rope_2d_tables(config)
    assert cos.shape == sin.shape == (120 + grid**2, 64)
    freqs = original_freqs_cis(grid, 64, args["rope_base"], args["cls_token_num"])  # (120 + g^2, 32) complex
    for table, part in ((cos, freqs.real), (sin, freqs.imag)):
        torch.testing.assert_close(table[120:, :32], part[120:])
        torch.testing.assert_close(table[120:, 32:], part[120:])


def test_vq16_and_flan_t5_xl_map_every_key_at_full_size():
    """vq_ds16_t2i.pt's tensors (vq_model.py's rules) convert onto a diffusers VQModel with exactly its
    keys and shapes (x16, 16384 codes of 8, 72M parameters); flan-t5-xl's T5ForConditionalGeneration
    holds every tensor T5EncoderModel loads, at the width the GPT's caption projector takes."""
    from diffusers import VQModel
    from transformers import T5Config, T5EncoderModel, T5ForConditionalGeneration

    from proxytune.backends import vqgan
    from releases import llamagen as release

    shapes = release.vq_shapes(release.VQ_16)
    assert 71e6 < sum(math.prod(s) for k, s in shapes.items() if "codebook_used" not in k) < 73e6  # "72M"
    original = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    config, state = vqgan.convert_state_dict(original, "llamagen", image_size=256, label="VQ-16")
    assert tuple(config["block_out_channels"]) == (128, 128, 256, 256, 512)
    assert (config["num_vq_embeddings"], config["vq_embed_dim"]) == (16384, 8)
    with torch.device("meta"):
        vq = VQModel(**config)
    assert {k: tuple(v.shape) for k, v in state.items()} == {k: tuple(v.shape) for k, v in vq.state_dict().items()}

    fields = {k: v for k, v in release.FLAN_T5_XL.items() if k not in ("architectures", "model_type", "torch_dtype",
                                                                        "transformers_version")}
    with torch.device("meta"):
        released = T5ForConditionalGeneration(T5Config(**fields)).state_dict()
        encoder = T5EncoderModel(T5Config(**fields)).state_dict()
    assert all(k in released and released[k].shape == v.shape for k, v in encoder.items())
    assert encoder["shared.weight"].shape == (32128, release.GPT_XL_STAGE1_256["caption_dim"])
    assert 1.15e9 < sum(v.numel() for k, v in encoder.items() if k != "encoder.embed_tokens.weight") < 1.3e9


def test_dropout_is_the_originals(config, case):
    """Token, attention-output and FFN-output dropout, in train mode only; none on attention weights."""
    _, converted, (text, _, codes), expected = case
    model = student_from(converted, config)
    drop = BRANCHES["conditional"]
    model.set_dropout(0.1)
    assert model.config.dropout == 0.1 and model.backbone.config.attention_dropout == 0.0
    assert (logits_of(model, text, codes, drop) - expected["conditional"]).abs().max() < TOL  # eval: none
    calls = []
    real = F.dropout

    def counting(x, p=0.5, training=True, inplace=False):
        calls.append((tuple(x.shape), p, training))
        return real(x, p, training, inplace)

    model.train()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.nn.functional, "dropout", counting)
        with torch.no_grad():
            trained = model(text, codes, drop_cond=drop)
    T, H = config.cond_len + config.seq_len - 1, config.hidden_size
    # the embeddings [caption; codes], then each layer's attention output and FFN output
    assert calls == [((2, T, H), 0.1, True)] * (1 + 2 * config.num_hidden_layers)
    assert not torch.allclose(trained, expected["conditional"], atol=1e-3)
    model.set_dropout(0.0)
    assert torch.equal(logits_of(model, text, codes, drop), logits_of(model.eval(), text, codes, drop))


def tiny_text_encoder(folder, config):
    """A 1-layer T5 encoder of the caption width and the char-level tokenizer, as a text encoder folder."""
    from transformers import T5Config, T5EncoderModel

    from proxytune.backends.tokenizer import EOS_ID, char_vocab_size, write_char_clip_tokenizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        T5EncoderModel(T5Config(vocab_size=char_vocab_size(), d_model=config.text_dim, d_kv=8, d_ff=32, num_layers=1,
                                num_heads=2, pad_token_id=EOS_ID, eos_token_id=EOS_ID)).save_pretrained(folder)
    write_char_clip_tokenizer(folder, model_max_length=config.cond_len)
    return folder


def test_original_checkpoint_becomes_a_student_folder_that_prompts_as_the_original(config, case, tmp_path,
                                                                                  monkeypatch):
    """`proxytune convert llamagen` on an original-shaped checkpoint: architecture read from it, the VQ
    converted from its original file, T5 named by an absolute path even when given relative. The
    folder loads from another directory, and a prompt goes in as the original's: cleaned, an
    11-token caption left-padded and masked, same logits in both CFG branches, same greedy CFG codes."""
    from test_vqgan import original_state

    from proxytune.backends import students
    from proxytune.backends.captions import clean_caption

    original = case[0]
    work = tmp_path / "work"
    work.mkdir()
    torch.save({"model": original}, work / "t2i.pt")
    vq = original_state("llamagen", ch_mult=(1, 1, 2), enc_attn=(False, False, True), dec_attn=(True, False, False),
                        embed=8, codes=config.codebook_size)  # x4: a 4 x 4 grid at 16 px
    torch.save({"model": vq}, work / "vq_ds16_t2i.pt")
    tiny_text_encoder(work / "t5", config)

    from click.testing import CliRunner

    from proxytune.cli import main

    monkeypatch.chdir(work)
    args = ["convert", "llamagen", "t2i.pt", "student", "--vq", "vq_ds16_t2i.pt", "--text-encoder", "t5",
            "--image-size", "16"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and "width 64 is none of the original GPT presets" in result.output
    assert len(result.output.strip().splitlines()) == 1
    result = CliRunner().invoke(main, [*args, "--heads", "4"])
    assert result.exit_code == 0, result.output
    assert not any(p.name.startswith(".") for p in work.iterdir())  # no scratch left behind
    monkeypatch.chdir(tmp_path)  # the folder names its T5 by an absolute path: it loads from anywhere
    bundle = students.load_student(str(work / "student"))
    assert bundle.backend == "llamagen" and type(bundle.model) is llamagen_model.LlamaGenStudent
    assert bundle.seq_len == 16 and bundle.image_size == 16 and bundle.config.cond_len == 120
    assert bundle.vq.config.up_block_types[0] == "AttnUpDecoderBlock2D"  # LlamaGen's attending levels kept

    prompt = "A S* Puppies"  # cleaned "a s puppies": 9 character tokens + start + end = 11 tokens
    assert clean_caption(prompt) == "a s puppies"
    cond = bundle.encode_prompts([prompt])
    # independently: the T5 features of the cleaned caption alone, in the last 11 of 120 slots
    ids = bundle.tokenizer(["a s puppies"], return_tensors="pt").input_ids
    assert ids.shape == (1, SHORT)
    with torch.no_grad():
        alone = bundle.text_encoder(input_ids=ids).last_hidden_state[0]
    torch.testing.assert_close(cond, left_padded([alone], 120), atol=1e-5, rtol=1e-5)
    codes = torch.randint(0, config.codebook_size, (1, 16), generator=torch.Generator().manual_seed(5))
    lengths = torch.tensor([SHORT])
    for drop in (torch.tensor([False]), torch.tensor([True])):
        with torch.no_grad():
            expected = original_logits(original, config, cond, lengths, codes, drop)
            got = bundle.image_logits(cond, codes, drop)
        assert (got - expected).abs().max().item() < TOL
    sampled = bundle.generate([prompt], [0], cfg_scale=4.0, temperature=0)
    with torch.no_grad():
        assert torch.equal(sampled, original_greedy_cfg(original, config, cond, lengths, 4.0))
    assert bundle.decode_codes(sampled)[0].size == (16, 16)
    again = CliRunner().invoke(main, ["convert", "llamagen", str(work / "t2i.pt"), str(work / "student"),
                                      "--vq", str(work / "vq_ds16_t2i.pt"), "--heads", "4"])
    assert again.exit_code == 2 and "already exists" in again.output
    missing = CliRunner().invoke(main, ["convert", "llamagen", str(work / "t2i.pt"), str(tmp_path / "other"),
                                        "--vq", str(work / "vq_ds16_t2i.pt"), "--heads", "4", "--text-encoder", "./nope"])
    assert missing.exit_code == 2 and "'./nope': not a folder" in missing.output
