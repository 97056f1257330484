"""Janus-Pro as released (issue 26): deepseek-ai/Janus-Pro-1B / -7B (`multi_modality`, bf16 `.bin` shards)
converted by `proxytune convert janus`, and transformers' layout (deepseek-community), loaded in bf16 as
a user's load would, through codes, a LoRA step, sampling and decoding; the conversion checked against
the original's own computation, and the full-size layouts on the meta device."""

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from conftest import make_params, tiny_spec
from proxytune.backends import students
from proxytune.backends.students.janus import convert as janus_convert
from proxytune.backends.students.janus import CONVERT_FIX as JANUS_CONVERT_FIX
from proxytune.errors import ProxytuneError
from releases import janus as release


@pytest.fixture(scope="session")
def janus_folders(tmp_path_factory):
    """The tiny releases, built once: the multi_modality one (two .bin shards), its conversion, and the
    transformers layout."""
    root = tmp_path_factory.mktemp("janus-release")
    original = release.write_multi_modality(root / "Janus-Pro-7B", shards=2)
    janus_convert.convert_release(str(original), root / "converted")
    return {"original": original, "converted": root / "converted",
            "transformers": release.write_transformers_layout(root / "Janus-Pro-community")}


# -- the full-size layouts, without weights ------------------------------------------------------------


@pytest.mark.parametrize("size, params", [("1B", (2.08e9, 2.10e9)), ("7B", (7.41e9, 7.43e9))])
def test_full_size_release_maps_onto_transformers_janus_key_for_key(size, params):
    """Every tensor of Janus-Pro-{size} (the original's module rules at the release's sizes) converts to
    exactly the keys and shapes transformers' JanusForConditionalGeneration has at full size."""
    from transformers import JanusForConditionalGeneration, JanusVisionConfig, JanusVQVAEConfig

    config = release.full_config(size)
    shapes = release.release_shapes(config)
    # the totals the hub lists (2.09B, 7.42B): a check of the reconstructed sizes
    assert params[0] < sum(math.prod(s) for k, s in shapes.items() if "codebook_used" not in k) < params[1]
    with torch.device("meta"):
        converted = janus_convert.convert_state_dict({k: torch.empty(s) for k, s in shapes.items()})
        kwargs = janus_convert.janus_config_kwargs(config, shapes, image_token_id=100581)
        model = JanusForConditionalGeneration(janus_convert.build_config(kwargs))
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in converted.items()} == expected
    # the sizes read from the tensors are transformers' defaults, which are Janus-Pro's SigLIP-L and VQ-16
    vision, vq = JanusVisionConfig(), JanusVQVAEConfig()
    got_vision, got_vq = model.config.vision_config, model.config.vq_config
    for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "image_size", "patch_size", "mlp_ratio"):
        assert getattr(got_vision, name) == getattr(vision, name), name
    for name in ("base_channels", "num_res_blocks", "latent_channels", "embed_dim", "num_embeddings"):
        assert getattr(got_vq, name) == getattr(vq, name), name
    assert list(got_vq.channel_multiplier) == list(vq.channel_multiplier) and got_vq.num_patches == 24
    assert not model.config.tie_word_embeddings  # the original's lm_head is its own tensor


@pytest.mark.parametrize("size", ["1B", "7B"])
def test_full_size_transformers_layout_is_what_the_conversion_writes(size):
    """deepseek-community/Janus-Pro-{size}: the config as transformers' convert_janus_weights_to_hf.py builds
    it (language_config's sizes; the vision and VQ defaults with the aligner/head widths) has the same
    keys and shapes, on the meta device, as proxytune's conversion of the release."""
    from transformers import JanusConfig, JanusForConditionalGeneration, JanusVisionConfig, JanusVQVAEConfig, LlamaConfig

    config = release.full_config(size)
    lang, params = config["language_config"], {p: config[p]["params"] for p in config if p.endswith("_config") and p != "language_config"}
    text = LlamaConfig(**{k: lang[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                               "num_attention_heads", "num_key_value_heads", "max_position_embeddings")})
    vision = JanusVisionConfig(image_size=params["vision_config"]["image_size"],
                               projection_dim=params["aligner_config"]["n_embed"], depth=params["aligner_config"]["depth"])
    vq = JanusVQVAEConfig(embed_dim=params["gen_vision_config"]["n_embed"],
                          num_embeddings=params["gen_vision_config"]["image_token_size"],
                          projection_dim=params["gen_aligner_config"]["n_embed"],
                          image_token_embed_dim=params["gen_head_config"]["image_token_embed"])
    ours = janus_convert.build_config(janus_convert.janus_config_kwargs(config, release.release_shapes(config), image_token_id=1))
    with torch.device("meta"):
        theirs = JanusForConditionalGeneration(JanusConfig(text_config=text, vision_config=vision, vq_config=vq))
        converted = JanusForConditionalGeneration(ours)
    assert {k: v.shape for k, v in converted.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}


# -- the conversion against the original's computation ------------------------------------------------


def _release_weights(folder):
    weights = {}
    for shard in sorted(folder.glob("pytorch_model*.bin")):
        weights.update(torch.load(shard, weights_only=True))
    return {k: v.float() for k, v in weights.items()}


def _mlp_gelu(x, w, prefix, depth=2):
    """projector.MlpProjector "mlp_gelu": layers.0, then GELU + Linear pairs (layers.2, layers.4, ...)."""
    x = F.linear(x, w[f"{prefix}.layers.0.weight"], w[f"{prefix}.layers.0.bias"])
    for d in range(1, depth):
        x = F.linear(F.gelu(x), w[f"{prefix}.layers.{2 * d}.weight"], w[f"{prefix}.layers.{2 * d}.bias"])
    return x


def test_converted_image_logits_equal_the_originals_generation_path(janus_folders):
    """modeling_vlm.py + generation_inference.py: the prompt's token embeddings, then each code through
    gen_embed -> gen_aligner, the language model (a LlamaForCausalLM of language_config), gen_head
    (Linear, GELU, Linear) on the last states: the same logits from the converted folder in float32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    w = _release_weights(janus_folders["original"])
    config = json.loads((janus_folders["original"] / "config.json").read_text())
    lm = LlamaForCausalLM(LlamaConfig(**config["language_config"])).float().eval()
    lm.load_state_dict({k[len("language_model."):]: v for k, v in w.items() if k.startswith("language_model.")})
    bundle = students.load_student(str(janus_folders["converted"]))
    bundle.model.float()
    torch.manual_seed(0)
    codes = torch.randint(0, bundle.codebook_size, (1, bundle.seq_len))
    cond = bundle.encode_prompts(["a photo of S* dog"])
    with torch.no_grad():
        ids = cond[0, 0][cond[0, 1] == 1][None]  # the original encodes one unpadded prompt
        image = _mlp_gelu(F.embedding(codes[:, :-1], w["gen_embed.weight"]), w, "gen_aligner")
        hidden = lm.model(inputs_embeds=torch.cat([lm.get_input_embeddings()(ids), image], 1)).last_hidden_state
        head = F.gelu(F.linear(hidden[:, ids.shape[1] - 1 :], w["gen_head.output_mlp_projector.weight"],
                               w["gen_head.output_mlp_projector.bias"]))
        expected = F.linear(head, w["gen_head.vision_head.weight"], w["gen_head.vision_head.bias"])
        got = bundle.image_logits(cond, codes, torch.zeros(1, dtype=torch.bool))
    assert got.shape == expected.shape == (1, bundle.seq_len, bundle.codebook_size)
    assert (got - expected).abs().max() < 1e-4


def _gn(x, w, key):
    return F.group_norm(x, 32, w[f"{key}.weight"], w[f"{key}.bias"], eps=1e-6)


def _conv(x, w, key, stride=1, padding=1):
    return F.conv2d(x, w[f"{key}.weight"], w[f"{key}.bias"], stride=stride, padding=padding)


def _res(x, w, key):
    h = _conv(F.silu(_gn(x, w, f"{key}.norm1")), w, f"{key}.conv1")
    h = _conv(F.silu(_gn(h, w, f"{key}.norm2")), w, f"{key}.conv2")
    return (_conv(x, w, f"{key}.nin_shortcut", padding=0) if f"{key}.nin_shortcut.weight" in w else x) + h


def _attn(x, w, key):
    h = _gn(x, w, f"{key}.norm")
    q, k, v = (_conv(h, w, f"{key}.{n}", padding=0).flatten(2) for n in "qkv")  # (B, C, HW)
    att = torch.softmax(q.transpose(1, 2) @ k * q.shape[1] ** -0.5, dim=-1)  # (B, HW_q, HW_k)
    out = (v @ att.transpose(1, 2)).view_as(x)
    return x + _conv(out, w, f"{key}.proj_out", padding=0)


def _levels(w, part: str) -> int:
    return 1 + max(int(k.split(".")[2]) for k in w if k.startswith(f"{part}.conv_blocks."))


def _level_blocks(h, w, prefix: str):
    """One level's res blocks, each followed by its attention block where the level has one (vq_model.py)."""
    for r in range(1 + max(int(k.split(".")[4]) for k in w if k.startswith(f"{prefix}.res."))):
        h = _res(h, w, f"{prefix}.res.{r}")
        if f"{prefix}.attn.{r}.q.weight" in w:
            h = _attn(h, w, f"{prefix}.attn.{r}")
    return h


def _original_codes(w, pixels):
    """vq_model.py: Encoder (conv_blocks, asymmetric-pad downsampling, mid 0/1/2), quant_conv, then the
    VectorQuantizer with codebook_l2_norm: nearest l2-normalised entry to the l2-normalised latent."""
    p = "gen_vision_model."
    w = {k[len(p):]: v for k, v in w.items() if k.startswith(p)}
    h = _conv(pixels, w, "encoder.conv_in")
    levels = _levels(w, "encoder")
    for level in range(levels):
        h = _level_blocks(h, w, f"encoder.conv_blocks.{level}")
        if level != levels - 1:
            h = _conv(F.pad(h, (0, 1, 0, 1)), w, f"encoder.conv_blocks.{level}.downsample.conv", stride=2, padding=0)
    h = _res(_attn(_res(h, w, "encoder.mid.0"), w, "encoder.mid.1"), w, "encoder.mid.2")
    h = _conv(F.silu(_gn(h, w, "encoder.norm_out")), w, "encoder.conv_out")
    z = _conv(h, w, "quant_conv", padding=0).permute(0, 2, 3, 1).flatten(1, 2)  # (B, L, D)
    z, codebook = F.normalize(z, dim=-1), F.normalize(w["quantize.embedding.weight"], dim=-1)
    distance = (z**2).sum(-1, keepdim=True) + (codebook**2).sum(-1) - 2 * z @ codebook.T
    return distance.argmin(-1)


def _original_decode(w, codes):
    """vq_model.py decode_code: the l2-normalised codebook entries, post_quant_conv, the Decoder (conv_blocks[0]
    the deepest level, nearest-neighbour upsampling + conv), as a (B, S, S, 3) uint8 array as generation_inference.py
    writes it."""
    p = "gen_vision_model."
    w = {k[len(p):]: v for k, v in w.items() if k.startswith(p)}
    grid = int(codes.shape[1] ** 0.5)
    z = F.normalize(w["quantize.embedding.weight"], dim=-1)[codes].view(len(codes), grid, grid, -1).permute(0, 3, 1, 2)
    h = _conv(_conv(z, w, "post_quant_conv", padding=0), w, "decoder.conv_in")
    h = _res(_attn(_res(h, w, "decoder.mid.0"), w, "decoder.mid.1"), w, "decoder.mid.2")
    levels = _levels(w, "decoder")
    for level in range(levels):
        h = _level_blocks(h, w, f"decoder.conv_blocks.{level}")
        if level != levels - 1:
            h = _conv(F.interpolate(h, scale_factor=2.0, mode="nearest"), w, f"decoder.conv_blocks.{level}.upsample.conv")
    h = _conv(F.silu(_gn(h, w, "decoder.norm_out")), w, "decoder.conv_out")
    return ((h.clamp(-1, 1) + 1) * 127.5).permute(0, 2, 3, 1)  # before the cast to uint8


def test_converted_vq_codes_and_images_equal_the_originals(janus_folders):
    """The codes stage's encoding and the sampler's decoding of the converted VQ, in float32, against the
    original's VQ-16 forward written from vq_model.py."""
    import numpy as np

    w = _release_weights(janus_folders["original"])
    bundle = students.load_student(str(janus_folders["converted"]))
    bundle.model.float()
    torch.manual_seed(0)
    pixels = torch.rand(2, 3, bundle.image_size, bundle.image_size) * 2 - 1
    with torch.no_grad():
        expected = _original_codes(w, pixels)
        decoded = _original_decode(w, expected)
    assert expected.shape == (2, bundle.seq_len) and len(expected.unique()) > 4
    assert torch.equal(bundle.encode_images(pixels), expected)
    images = np.stack([np.asarray(image) for image in bundle.decode_codes(expected)]).astype(np.float32)
    assert images.shape == (2, bundle.image_size, bundle.image_size, 3) and images.std() > 1
    assert np.abs(images - decoded.numpy()).max() <= 0.5 + 1e-3  # the same values, rounded to uint8


# -- every stage in the release's dtype (bf16), through the stage code --------------------------------


@pytest.mark.parametrize("layout", ["converted", "transformers"])
def test_bf16_release_runs_codes_a_lora_step_sampling_and_decoding(project, janus_folders, layout):
    from test_student import fake_proxy_set

    from proxytune.stages.sampling import StudentSampler
    from proxytune.stages.student import StudentTrainer

    folder = str(janus_folders[layout])
    params = make_params(project, tiny_spec(student={"model": folder, "steps": 1, "batch_size": 2,
                                                     "learning_rate": 1e-2, "checkpoint_every": 100}))
    fake_proxy_set(params, 2)  # runs the codes stage's encoding on the bf16 VQ
    trainer = StudentTrainer(params)
    trainer.setup()
    assert trainer.bundle.model.base_model.model.lm_head.weight.dtype == torch.bfloat16  # as config.json declares
    assert trainer.codes.shape == (2, 16)
    lora = {n: p.detach().clone() for n, p in trainer.bundle.model.named_parameters() if p.requires_grad}
    assert lora and all(p.dtype == torch.float32 for p in lora.values())
    trainer.train()
    assert math.isfinite(trainer.progress.losses[-1])
    after = dict(trainer.bundle.model.named_parameters())
    assert any(not torch.equal(after[n], p) for n, p in lora.items())
    images = StudentSampler(params, tuned=False, bundle=trainer.bundle)(["a S* dog"], [0])
    assert images[0].size == (64, 64)


# -- what a user meets first ---------------------------------------------------------------------------


def test_released_layout_as_student_is_refused_with_the_convert_command(janus_folders):
    ref = str(janus_folders["original"])
    with pytest.raises(ProxytuneError) as err:
        students.load_student(ref)
    assert str(err.value) == f"student model {ref!r}: config.json: {JANUS_CONVERT_FIX.format(src=ref)}"
    assert f"proxytune convert janus {ref} OUT" in str(err.value) and "\n" not in str(err.value)


def test_any_load_failure_is_one_line_naming_the_checkpoint(janus_folders, tmp_path):
    broken = shutil.copytree(janus_folders["converted"], tmp_path / "broken")
    config = json.loads((broken / "config.json").read_text())
    config["text_config"]["hidden_size"] = 96  # tensors of the wrong size: a size-mismatch error
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ProxytuneError) as err:
        students.load_student(str(broken))
    message = str(err.value)
    assert message.startswith(f"student model {str(broken)!r}: cannot load") and "\n" not in message
    assert "language_model" in message  # names the tensor
    from safetensors.torch import load_file, save_file

    missing = shutil.copytree(janus_folders["converted"], tmp_path / "missing")
    tensors = load_file(missing / "model.safetensors")
    del tensors["model.generation_head.vision_head.bias"]  # transformers alone would re-initialise it silently
    save_file(tensors, missing / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ProxytuneError, match="lacks tensor 'model.generation_head.vision_head.bias'"):
        students.load_student(str(missing))
    truncated = shutil.copytree(janus_folders["converted"], tmp_path / "truncated")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ProxytuneError, match="cannot load the Janus checkpoint"):
        students.load_student(str(truncated))


def test_convert_cli_takes_a_single_file_release_and_is_staged(janus_folders, tmp_path, monkeypatch):
    """The one-file layout (pytorch_model.bin), a hub id in the local cache, the CLI's exit codes, and an
    unknown tensor named."""
    from click.testing import CliRunner

    from proxytune.cli.convert import convert

    single = shutil.copytree(janus_folders["original"], tmp_path / "Janus-Pro-1B",
                             ignore=shutil.ignore_patterns("pytorch_model*"))
    weights = {}
    for shard in sorted(janus_folders["original"].glob("pytorch_model-*.bin")):
        weights.update(torch.load(shard, weights_only=True))
    torch.save(weights, single / "pytorch_model.bin")
    out = tmp_path / "out"
    result = CliRunner().invoke(convert, ["janus", str(single), str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "model.safetensors").exists() and json.loads((out / "config.json").read_text())["model_type"] == "janus"
    result = CliRunner().invoke(convert, ["janus", str(single), str(out)])
    assert result.exit_code == 2 and "already exists" in result.output
    result = CliRunner().invoke(convert, ["janus", str(janus_folders["transformers"]), str(tmp_path / "x")])
    assert result.exit_code == 2 and "already transformers' Janus layout" in result.output
    # a hub id resolves in the local Hugging Face cache only (nothing is downloaded)
    import huggingface_hub.constants

    snapshot = tmp_path / "hub" / "models--deepseek-ai--Janus-Pro-1B"
    shutil.copytree(single, snapshot / "snapshots" / ("a" * 40))
    (snapshot / "refs").mkdir()
    (snapshot / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    result = CliRunner().invoke(convert, ["janus", "deepseek-ai/Janus-Pro-1B", str(tmp_path / "from-hub")])
    assert result.exit_code == 0 and (tmp_path / "from-hub" / "model.safetensors").exists(), result.output
    result = CliRunner().invoke(convert, ["janus", "deepseek-ai/Janus-Pro-7B", str(tmp_path / "z")])
    assert result.exit_code == 2 and "not in the local Hugging Face cache" in result.output
    torch.save({**weights, "gen_head.extra.weight": torch.zeros(1, dtype=torch.bfloat16)}, single / "pytorch_model.bin")
    result = CliRunner().invoke(convert, ["janus", str(single), str(tmp_path / "y")])
    assert result.exit_code == 2 and "'gen_head.extra.weight'" in result.output
    assert not (tmp_path / "y").exists() and not list(tmp_path.glob(".y.staging-*"))


def test_builtin_tiny_janus_runs_in_bf16():
    """proxytune's own tiny, loaded in bf16: float32 pixels used to meet the VQ's bf16 convolutions."""
    bundle = students.load_student("tiny-janus")
    bundle.model.to(torch.bfloat16)
    codes = bundle.encode_images(torch.rand(1, 3, 64, 64) * 2 - 1)
    assert codes.shape == (1, 64) and bundle.decode_codes(codes)[0].size == (64, 64)
