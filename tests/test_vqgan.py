"""Original VQGAN tokenizers (LlamaGen VQ-16, Chameleon's taming VQGAN) converted to diffusers
VQModels: a tiny random checkpoint in each original key layout, converted, encodes to the same codes
and decodes to the same pixels as an in-test computation of the original math; transformers' own
Chameleon VQ encoder agrees too; a wrong level order or a raw (un-normalised) LlamaGen codebook is
caught; bad checkpoints get one-line errors."""

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from proxytune.backends import vqgan
from proxytune.errors import ProxytuneError

# the two originals' names for the same modules
NAMES = {
    "llamagen": {"down": "conv_blocks.{}", "up": "conv_blocks.{}", "res": "res.{}", "mid": ("mid.0", "mid.1", "mid.2")},
    "taming": {"down": "down.{}", "up": "up.{}", "res": "block.{}", "mid": ("mid.block_1", "mid.attn_1", "mid.block_2")},
}


def up_name(layout, k, n):
    """The decoder level that runs k-th: LlamaGen lists them in run order, taming by resolution."""
    return NAMES[layout]["up"].format(n - 1 - k if layout == "taming" else k)


# -----------------------------------------------------------------------------
# a random original checkpoint


def original_state(layout, *, ch=32, ch_mult=(1, 2), layers=1, z=32, embed=4, codes=64,
                   enc_attn=(False, True), dec_attn=(True, False), seed=0):
    """Random weights under the original key names; conv weights ~ N(0, 1/fan_in) so activations stay O(1)."""
    g = torch.Generator().manual_seed(seed)
    names, n, sd = NAMES[layout], len(ch_mult), {}

    def conv(key, cin, cout, k=3):
        sd[f"{key}.weight"] = torch.randn(cout, cin, k, k, generator=g) / math.sqrt(cin * k * k)
        sd[f"{key}.bias"] = torch.randn(cout, generator=g) * 0.1

    def norm(key, c):
        sd[f"{key}.weight"] = 1 + 0.1 * torch.randn(c, generator=g)
        sd[f"{key}.bias"] = 0.1 * torch.randn(c, generator=g)

    def res(key, cin, cout):
        norm(f"{key}.norm1", cin), conv(f"{key}.conv1", cin, cout), norm(f"{key}.norm2", cout), conv(f"{key}.conv2", cout, cout)
        if cin != cout:
            conv(f"{key}.nin_shortcut", cin, cout, 1)

    def attn(key, c):
        norm(f"{key}.norm", c)
        for p in ("q", "k", "v", "proj_out"):
            conv(f"{key}.{p}", c, c, 1)

    def mid(part, c):
        res(f"{part}.{names['mid'][0]}", c, c), attn(f"{part}.{names['mid'][1]}", c), res(f"{part}.{names['mid'][2]}", c, c)

    conv("encoder.conv_in", 3, ch)
    cin = ch
    for i, m in enumerate(ch_mult):
        level = f"encoder.{names['down'].format(i)}"
        for j in range(layers):
            res(f"{level}.{names['res'].format(j)}", cin, ch * m)
            cin = ch * m
            if enc_attn[i]:
                attn(f"{level}.attn.{j}", cin)
        if i < n - 1:
            conv(f"{level}.downsample.conv", cin, cin)
    mid("encoder", cin)
    norm("encoder.norm_out", cin), conv("encoder.conv_out", cin, z)
    conv("quant_conv", z, embed, 1), conv("post_quant_conv", embed, z, 1)
    sd["quantize.embedding.weight"] = torch.randn(codes, embed, generator=g) * torch.rand(codes, 1, generator=g) * 3
    conv("decoder.conv_in", z, cin)
    mid("decoder", cin)
    for k in range(n):
        level = f"decoder.{up_name(layout, k, n)}"
        for j in range(layers + 1):
            res(f"{level}.{names['res'].format(j)}", cin, ch * ch_mult[n - 1 - k])
            cin = ch * ch_mult[n - 1 - k]
            if dec_attn[k]:
                attn(f"{level}.attn.{j}", cin)
        if k < n - 1:
            conv(f"{level}.upsample.conv", cin, cin)
    norm("decoder.norm_out", cin), conv("decoder.conv_out", cin, 3)
    if layout == "llamagen":
        sd["quantize.codebook_used"] = torch.zeros(65536)  # training state the converter must skip
    return sd


# -----------------------------------------------------------------------------
# the original math, written from the papers' code structure (not via diffusers)


def reference(sd, layout, pixels, *, l2):
    names = NAMES[layout]
    gn = lambda key, x: F.group_norm(x, 32, sd[f"{key}.weight"], sd[f"{key}.bias"], eps=1e-6)  # noqa: E731
    conv = lambda key, x, pad=1, stride=1: F.conv2d(x, sd[f"{key}.weight"], sd[f"{key}.bias"], stride, pad)  # noqa: E731

    def res(key, x):
        h = conv(f"{key}.conv1", F.silu(gn(f"{key}.norm1", x)))
        h = conv(f"{key}.conv2", F.silu(gn(f"{key}.norm2", h)))
        return (conv(f"{key}.nin_shortcut", x, 0) if f"{key}.nin_shortcut.weight" in sd else x) + h

    def attn(key, x):
        b, c, hh, ww = x.shape
        h = gn(f"{key}.norm", x)
        q, k, v = (conv(f"{key}.{p}", h, 0).reshape(b, c, hh * ww) for p in "qkv")
        w = torch.softmax(q.transpose(1, 2) @ k * c**-0.5, dim=2)  # (b, query, key)
        return x + conv(f"{key}.proj_out", (v @ w.transpose(1, 2)).reshape(b, c, hh, ww), 0)

    def levels(part, fmt_of, count, x, resample):
        n = len(count)
        for i in range(n):
            level = f"{part}.{fmt_of(i)}"
            for j in range(count[i]):
                x = res(f"{level}.{names['res'].format(j)}", x)
                if f"{level}.attn.{j}.q.weight" in sd:
                    x = attn(f"{level}.attn.{j}", x)
            if i < n - 1:
                x = resample(level, x)
        return x

    def mid(part, x):
        return res(f"{part}.{names['mid'][2]}", attn(f"{part}.{names['mid'][1]}", res(f"{part}.{names['mid'][0]}", x)))

    n = len({k.split(".")[2] for k in sd if k.startswith(f"encoder.{names['down'].format('')}")})
    layers = len({k.split(".")[4] for k in sd if k.startswith(f"encoder.{names['down'].format(0)}.{names['res'].format('')}")})
    h = conv("encoder.conv_in", pixels)
    h = levels("encoder", names["down"].format, [layers] * n, h,
               lambda level, x: conv(f"{level}.downsample.conv", F.pad(x, (0, 1, 0, 1)), 0, 2))
    h = conv("encoder.conv_out", F.silu(gn("encoder.norm_out", mid("encoder", h))))
    latents = conv("quant_conv", h, 0)  # (B, D, g, g)
    flat = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
    book = sd["quantize.embedding.weight"]
    if l2:
        book = F.normalize(book, dim=-1)
        codes = (F.normalize(flat, dim=-1) @ book.T).argmax(1)  # cosine
    else:
        codes = torch.cdist(flat, book).argmin(1)
    quant = book[codes].reshape(latents.shape[0], latents.shape[2], latents.shape[3], -1).permute(0, 3, 1, 2)
    h = conv("decoder.conv_in", conv("post_quant_conv", quant, 0))
    h = levels("decoder", lambda k: up_name(layout, k, n), [layers + 1] * n, mid("decoder", h),
               lambda level, x: conv(f"{level}.upsample.conv", F.interpolate(x, scale_factor=2.0, mode="nearest")))
    pixels_out = conv("decoder.conv_out", F.silu(gn("decoder.norm_out", h)))
    return latents, codes.reshape(latents.shape[0], -1), pixels_out


def diffusers_round_trip(model, pixels):
    with torch.no_grad():
        latents = model.encode(pixels).latents
        _, _, (_, _, codes) = model.quantize(latents)
        codes = codes.reshape(pixels.shape[0], -1)
        g = latents.shape[-1]
        quant = model.quantize.get_codebook_entry(codes.reshape(-1), (pixels.shape[0], g, g, latents.shape[1]))
        return latents, codes, model.decode(quant, force_not_quantize=True).sample


PIXELS = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(5)) * 2 - 1


@pytest.mark.parametrize("layout", ["llamagen", "taming"])
def test_converted_tokenizer_matches_the_original_math(layout):
    sd = original_state(layout)
    config, state = vqgan.convert_state_dict(sd, layout, image_size=32)
    assert config["down_block_types"] == ("DownEncoderBlock2D", "AttnDownEncoderBlock2D")
    assert config["up_block_types"] == ("AttnUpDecoderBlock2D", "UpDecoderBlock2D")
    assert (config["block_out_channels"], config["num_vq_embeddings"], config["vq_embed_dim"]) == ((32, 64), 64, 4)
    model = vqgan.build_vqmodel(config, state)
    want_latents, want_codes, want_pixels = reference(sd, layout, PIXELS, l2=layout == "llamagen")
    latents, codes, pixels = diffusers_round_trip(model, PIXELS)
    assert len(want_codes.unique()) > 4  # a non-degenerate test: several codes in use
    torch.testing.assert_close(latents, want_latents, atol=1e-4, rtol=0)
    assert torch.equal(codes, want_codes)
    torch.testing.assert_close(pixels, want_pixels, atol=1e-4, rtol=0)


def test_wrong_decoder_level_order_and_raw_codebook_are_caught():
    sd = original_state("llamagen")
    _, want_codes, want_pixels = reference(sd, "llamagen", PIXELS, l2=True)
    # the same weights read with taming's by-resolution decoder order: a different network
    swapped = vqgan.Layout(**{**vqgan.LAYOUTS["llamagen"].__dict__, "up_by_resolution": True})
    with pytest.raises(ProxytuneError):  # the level shapes no longer line up ...
        vqgan.convert_state_dict(sd, swapped, image_size=32)
    # ... and cosine vs Euclidean lookup over the raw codebook really differ on this checkpoint
    raw = vqgan.Layout(**{**vqgan.LAYOUTS["llamagen"].__dict__, "l2_codebook": False})
    model = vqgan.build_vqmodel(*vqgan.convert_state_dict(sd, raw, image_size=32))
    _, codes, _ = diffusers_round_trip(model, PIXELS)
    assert not torch.equal(codes, want_codes)


def test_chameleon_encoder_in_transformers_gives_the_same_codes():
    """transformers' ChameleonVQVAE (an independent implementation of the same encoder) agrees with
    the diffusers VQModel converted from its weights plus a taming-layout decoder."""
    from transformers import ChameleonVQVAEConfig
    from transformers.models.chameleon.modeling_chameleon import ChameleonVQVAE

    config = ChameleonVQVAEConfig(embed_dim=4, num_embeddings=64, latent_channels=32, resolution=32, base_channels=32,
                                  channel_multiplier=[1, 2], num_res_blocks=1, attn_resolutions=[16])
    sd = original_state("taming", enc_attn=(False, True))
    chameleon = ChameleonVQVAE(config).eval()
    # transformers names every tensor but the decoder exactly as taming does: a strict load proves it
    chameleon.load_state_dict({k: v for k, v in sd.items() if not k.startswith("decoder.")}, strict=True)
    model = vqgan.build_vqmodel(*vqgan.convert_state_dict(sd, "taming", image_size=32))
    with torch.no_grad():
        encoded = chameleon.encode(PIXELS)
        latents, codes, _ = diffusers_round_trip(model, PIXELS)
        want = encoded.image_tokens
        torch.testing.assert_close(model.encoder(PIXELS), encoded.last_hidden_state, atol=1e-4, rtol=0)
    assert model.config.down_block_types == ("DownEncoderBlock2D", "AttnDownEncoderBlock2D")
    assert torch.equal(codes.reshape(-1), want.reshape(-1))
    assert len(codes.unique()) > 4


def test_inverse_conversion_round_trips():
    sd = original_state("taming")
    model = vqgan.build_vqmodel(*vqgan.convert_state_dict(sd, "taming", image_size=32))
    back = vqgan.to_original_state_dict(model, "taming")
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_bad_checkpoints_get_one_line_errors(tmp_path):
    sd = original_state("llamagen")
    with pytest.raises(ProxytuneError, match="not a taming VQGAN layout"):
        vqgan.convert_state_dict(sd, "taming", image_size=32)
    extra = {**sd, "encoder.conv_blocks.0.res.0.extra.weight": torch.zeros(1)}
    with pytest.raises(ProxytuneError, match="unexpected keys.*extra.weight"):
        vqgan.convert_state_dict(extra, "llamagen", image_size=32)
    missing = {k: v for k, v in sd.items() if k != "decoder.conv_blocks.1.res.1.conv2.bias"}
    with pytest.raises(ProxytuneError, match="missing 'decoder.conv_blocks.1.res.1.conv2.bias'"):
        vqgan.convert_state_dict(missing, "llamagen", image_size=32)


def test_cli_converts_a_file_and_the_folder_loads(tmp_path):
    from diffusers import VQModel

    sd = original_state("llamagen")
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "vq_ds16_t2i.safetensors")
    out = tmp_path / "vq"
    cmd = [sys.executable, "-m", "proxytune.cli", "convert", "vqgan", str(tmp_path / "vq_ds16_t2i.safetensors"), str(out),
           "--layout", "llamagen", "--image-size", "32"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    model = VQModel.from_pretrained(out).eval()
    _, want_codes, want_pixels = reference(sd, "llamagen", PIXELS, l2=True)
    _, codes, pixels = diffusers_round_trip(model, PIXELS)
    assert torch.equal(codes, want_codes)
    torch.testing.assert_close(pixels, want_pixels, atol=1e-4, rtol=0)
    again = subprocess.run(cmd, capture_output=True, text=True)  # the folder exists now
    assert again.returncode == 2 and "already exists" in again.stderr and "Traceback" not in again.stderr
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    broken = subprocess.run(cmd[:5] + [str(tmp_path / "broken.pt"), str(tmp_path / "vq2")] + cmd[7:],
                            capture_output=True, text=True)
    assert broken.returncode == 2 and "broken.pt" in broken.stderr and len(broken.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "vq2").exists()
