"""Lumina-mGPT-7B-512/768/1024 as released (tests/releases/lumina.py): the folder loads (its q/k norms
of shape (model_parallel_size, head_dim) applied per head as the original does), gives the original's
logits, runs every stage in its declared bfloat16, refuses a broken checkpoint in one line, and its
full-size layout is what proxytune's loader expects."""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from proxytune.backends import students, vqgan

from proxytune.backends.students.lumina import weights as lumina_weights
from proxytune.errors import ProxytuneError
from releases import lumina as release


def convert(folder, vq_folder, out):
    from click.testing import CliRunner

    from proxytune.cli import main

    result = CliRunner().invoke(main, ["convert", "lumina-mgpt", str(folder), str(out), "--vqgan",
                                       str(vq_folder / "vqgan.ckpt"), "--image-size", str(release.TINY_IMAGE_SIZE)])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="session")
def chameleon_tokenizer(tmp_path_factory):
    return release.build_chameleon_tokenizer(tmp_path_factory.mktemp("chameleon") / "tokenizer")


@pytest.fixture(scope="session")
def released(tmp_path_factory, chameleon_tokenizer):
    """(release folder, its float32 weights before the bf16 cast, the converted student folder)."""
    root = tmp_path_factory.mktemp("lumina-release")
    weights = release.build(root / "Lumina-mGPT-7B-768", "768")
    return root / "Lumina-mGPT-7B-768", weights, convert(root / "Lumina-mGPT-7B-768", chameleon_tokenizer, root / "student")


# -- the original's forward, restated from Lumina-mGPT's model/chameleon/modeling_chameleon.py -------
# RMSNorm (fp32 statistics, eps rms_norm_eps) -> q, k, v projections -> per head: LayerNorm over
# head_dim without affine (eps 1e-5), then ChameleonLayerNorm's own weight/bias, row r of the stored
# (model_parallel_size, head_dim) serving heads r * n .. (r + 1) * n - 1 (n = heads / mp; the key
# heads for k_norm) -> rotate-half RoPE (base rope_theta, positions 0..T-1; the converter permuted
# q/k for it) -> causal softmax attention, key heads repeated per query group -> o_proj -> residual ->
# RMSNorm -> down(silu(gate) * up) -> residual; final RMSNorm; lm_head.
def original_logits(state: dict, config: dict, ids: list[int]) -> torch.Tensor:
    h, heads, kv = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]
    d, mp, eps = h // heads, config["model_parallel_size"], config["rms_norm_eps"]
    T = len(ids)

    def rms(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    def head_norm(x, w, b, n_heads):  # x (T, n_heads, d); w, b (mp, d)
        per_head = n_heads // mp
        rows = [r // per_head for r in range(n_heads)]  # the shard each head belongs to
        return F.layer_norm(x, (d,), eps=1e-5) * w[rows] + b[rows]

    inv_freq = 1.0 / config["rope_theta"] ** (torch.arange(0, d, 2).float() / d)
    angles = torch.arange(T).float()[:, None] * inv_freq[None]  # (T, d/2)
    cos, sin = torch.cat([angles, angles], -1).cos()[:, None], torch.cat([angles, angles], -1).sin()[:, None]

    def rope(x):
        half = torch.cat([-x[..., d // 2:], x[..., : d // 2]], -1)
        return x * cos + half * sin

    x = state["model.embed_tokens.weight"][ids]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        a = rms(x, state[p + "input_layernorm.weight"])
        q = (a @ state[p + "self_attn.q_proj.weight"].T).view(T, heads, d)
        k = (a @ state[p + "self_attn.k_proj.weight"].T).view(T, kv, d)
        v = (a @ state[p + "self_attn.v_proj.weight"].T).view(T, kv, d)
        q = rope(head_norm(q, state[p + "self_attn.q_norm.weight"], state[p + "self_attn.q_norm.bias"], heads))
        k = rope(head_norm(k, state[p + "self_attn.k_norm.weight"], state[p + "self_attn.k_norm.bias"], kv))
        k, v = k.repeat_interleave(heads // kv, dim=1), v.repeat_interleave(heads // kv, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / d**0.5
        attn = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        x = x + torch.einsum("hqk,khd->qhd", attn, v).reshape(T, h) @ state[p + "self_attn.o_proj.weight"].T
        m = rms(x, state[p + "post_attention_layernorm.weight"])
        gate, up = m @ state[p + "mlp.gate_proj.weight"].T, m @ state[p + "mlp.up_proj.weight"].T
        x = x + (F.silu(gate) * up) @ state[p + "mlp.down_proj.weight"].T
    return rms(x, state["model.norm.weight"]) @ state["lm_head.weight"].T


def stored_state(folder) -> dict:
    """The release's tensors as stored (bf16), upcast to float32."""
    from safetensors.torch import load_file

    state = {}
    for shard in sorted(folder.glob("model-*.safetensors")):
        state.update({k: v.float() for k, v in load_file(shard).items()})
    return state


def proxytune_logits(bundle, ids: list[int]) -> torch.Tensor:
    """Full-vocabulary logits of the loaded student (lm_head unmasked), float32."""
    with torch.no_grad():
        hidden = bundle._chameleon(input_ids=torch.tensor([ids])).last_hidden_state[0]
    return hidden @ bundle.model.lm_head.weight.T


# -- the folder ------------------------------------------------------------------------------------
def test_the_fixture_is_laid_out_as_the_release(released):
    from safetensors import safe_open

    folder, weights, _ = released
    config = json.loads((folder / "config.json").read_text())
    assert (config["model_type"], config["architectures"], config["torch_dtype"]) == \
        ("chameleon", ["ChameleonXLLMXForConditionalGeneration"], "bfloat16")
    assert config["model_parallel_size"] == 1 and config["swin_norm"] is False and "z_loss_weight" in config
    assert config["vq_config"]["n_embed"] == config["vq_config"]["num_embeddings"] == 256  # both names, as converted
    assert json.loads((folder / "generation_config.json").read_text())["transformers_version"] == "4.43.3"
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (folder / name).is_file()
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    assert sorted(set(index.values())) == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert set(index) == set(weights) and not any("vqmodel" in k for k in index)
    with safe_open(folder / index["model.layers.0.self_attn.q_norm.bias"], framework="pt") as f:
        bias = f.get_tensor("model.layers.0.self_attn.q_norm.bias")
    assert bias.shape == (1, 16) and bias.dtype == torch.bfloat16


def test_the_released_layout_loads_in_bf16_with_the_norms_repeated_per_head(released):
    folder, weights, student = released
    bundle = students.load_student(str(student))
    assert bundle.model.dtype == torch.bfloat16  # as the config declares
    assert bundle._chameleon.vqmodel.quantize.embedding.weight.dtype == torch.float32  # the original's VQ runs fp32
    for key in ("q_norm.weight", "k_norm.bias"):
        loaded = bundle._chameleon.layers[1].self_attn.get_parameter(key)
        assert loaded.shape == (4, 16)
        assert torch.equal(loaded, weights[f"model.layers.1.self_attn.{key}"].to(torch.bfloat16).expand(4, 16))


@pytest.mark.parametrize("mp, kv_heads", [(1, 4), (2, 2)])  # the 7B releases; a sharded, grouped-query variant
def test_the_released_checkpoint_gives_the_originals_logits(tmp_path, released, chameleon_tokenizer, mp, kv_heads):
    folder = released[0]
    if mp != 1:
        folder = tmp_path / "sharded"
        release.build(folder, "768", seed=1, model_parallel_size=mp, num_key_value_heads=kv_heads)
    student = released[2] if mp == 1 else convert(folder, chameleon_tokenizer, tmp_path / "student")
    bundle = students.load_student(str(student))
    bundle.model.float()  # this comparison is in float32: the bf16 weights upcast on both sides
    config = json.loads((folder / "config.json").read_text())
    ids = [0, 9100, 9101, 9102, 8710, 8197, 8808, 8808, 4, 5, 6, 8803, 7]
    expected = original_logits(stored_state(folder), config, ids)
    torch.testing.assert_close(proxytune_logits(bundle, ids), expected, atol=1e-4, rtol=1e-4)


# -- broken checkpoints ----------------------------------------------------------------------------
def broken_copy(released, tmp_path, chameleon_tokenizer, damage) -> str:
    folder = tmp_path / "broken"
    shutil.copytree(released[0], folder)
    student = convert(folder, chameleon_tokenizer, tmp_path / "student")
    damage(folder)  # after converting: the student folder names these weights, which break later
    return str(student)


def rewrite_tensor(folder, key, value):
    from safetensors.torch import load_file, save_file

    shard = folder / json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"][key]
    tensors = load_file(shard)
    if value is None:
        del tensors[key]
    else:
        tensors[key] = value
    save_file(tensors, shard, metadata={"format": "pt"})


@pytest.mark.parametrize("damage, message", [
    (lambda f: rewrite_tensor(f, "model.layers.1.self_attn.k_norm.weight", torch.ones(2, 16, dtype=torch.bfloat16)),
     r"checkpoint key model\.layers\.1\.self_attn\.k_norm\.weight has shape \(2, 16\), the model expects \(4, 16\)"),
    (lambda f: rewrite_tensor(f, "model.layers.0.mlp.up_proj.weight", torch.ones(128, 32, dtype=torch.bfloat16)),
     r"checkpoint key model\.layers\.0\.mlp\.up_proj\.weight has shape \(128, 32\)"),
    (lambda f: (f / "model-00002-of-00002.safetensors").unlink(), r"cannot load the Lumina-mGPT checkpoint .*broken"),
    (lambda f: (f / "config.json").write_text("{not json"), r"cannot load the Lumina-mGPT checkpoint .*broken"),
    (lambda f: rewrite_tensor(f, "model.layers.1.mlp.down_proj.weight", None), r"lacks model\.layers\.1\.mlp\.down_proj"),
])
def test_a_broken_checkpoint_is_refused_in_one_line_naming_it(released, tmp_path, chameleon_tokenizer, damage, message):
    student = broken_copy(released, tmp_path, chameleon_tokenizer, damage)
    with pytest.raises(ProxytuneError, match=message) as err:
        students.load_student(student)
    assert "\n" not in str(err.value)


def test_convert_reads_the_config_and_refuses_an_unsupported_layout_before_writing(released, tmp_path, chameleon_tokenizer):
    from click.testing import CliRunner

    from proxytune.backends.students.lumina import layout as lumina_layout
    from proxytune.cli import main

    config = json.loads((released[0] / "config.json").read_text())
    assert lumina_layout.config_problem(config) is None
    assert lumina_layout.config_problem(release.full_config("1024")) is None
    folder = tmp_path / "odd"
    shutil.copytree(released[0], folder)
    (folder / "config.json").write_text(json.dumps({**config, "model_parallel_size": 3}))
    result = CliRunner().invoke(main, ["convert", "lumina-mgpt", str(folder), str(tmp_path / "student"), "--vqgan",
                                       str(chameleon_tokenizer / "vqgan.ckpt"), "--image-size", "128"])
    assert result.exit_code == 2 and "config.json: model_parallel_size 3" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "student").exists()


# -- every stage in bf16 ---------------------------------------------------------------------------
def test_every_student_stage_runs_the_release_in_bf16(project, released):
    """codes stage -> student stage (LoRA steps) -> sampling -> decoding, on the folder loaded as a user's
    load does (bfloat16, as declared)."""
    from conftest import make_params, tiny_spec
    from proxytune.stages.student import StudentTrainer
    from test_student import fake_proxy_set

    params = make_params(project, tiny_spec(student={"model": str(released[2]), "steps": 2, "batch_size": 2,
                                                     "learning_rate": 1e-2, "checkpoint_every": 2,
                                                     "lora": {"rank": 4, "alpha": 4}}))
    fake_proxy_set(params, 2)  # the codes stage's encoding: float pixels into the bf16-loaded checkpoint
    trainer = StudentTrainer(params)
    trainer.setup()
    assert trainer.bundle.model.base_model.model.dtype == torch.bfloat16
    assert trainer.codes.shape == (2, 64) and len(trainer.codes.unique()) > 4
    lora = {n: p.detach().clone() for n, p in trainer.bundle.model.named_parameters() if "lora_B" in n}
    assert lora and all(p.dtype == torch.float32 for p in lora.values())
    trainer.train()
    assert all(torch.isfinite(torch.tensor(trainer.progress.losses)))
    assert min(trainer.progress.series["z_loss"]) > 0
    now = dict(trainer.bundle.model.named_parameters())
    assert all(not torch.equal(now[n].detach(), before) for n, before in lora.items())

    bundle = trainer.bundle
    bundle.model.eval()
    codes = bundle.generate(["a S* dog"], [0], cfg_scale=3.0, top_k=20)
    assert codes.shape == (1, 64) and codes.max() < bundle.codebook_size
    image = bundle.decode_codes(codes)[0]
    assert image.size == (128, 128) and len(set(image.getdata())) > 1


# -- full size, on the meta device ------------------------------------------------------------------
@pytest.mark.parametrize("name", release.RELEASES)
def test_the_full_size_release_is_what_the_loader_expects(name):
    """Lumina-mGPT-7B-{512,768,1024} at full size: every released key is a key of transformers'
    Chameleon; the only shape differences are the q/k norms, which `lumina_weights.expand_qk_norms` accepts and
    turns into the model's shapes; the model's only keys the release lacks are the VQ encoder's, which
    the loader fills from the converted VQGAN (Chameleon's vqgan.ckpt at full size)."""
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration

    config = release.full_config(name)
    with torch.device("meta"):
        model = ChameleonForConditionalGeneration(ChameleonConfig(**config))
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = release.release_shapes(config)
    assert len(theirs) == 3 + 32 * 13 and theirs["model.layers.31.self_attn.k_norm.bias"] == (1, 128)
    assert set(theirs) <= set(ours)
    assert {k for k in set(ours) - set(theirs) if not k.startswith("model.vqmodel.")} == set()
    mismatched = [(k, theirs[k], ours[k]) for k in theirs if theirs[k] != ours[k]]
    assert {k.split(".", 3)[3] for k, _, _ in mismatched} == {f"self_attn.{n}_norm.{p}" for n in "qk"
                                                                for p in ("weight", "bias")}
    lumina_weights.expand_qk_norms(model, mismatched, lambda key: torch.empty(theirs[key], device="meta"), name)
    assert ours["model.layers.0.self_attn.q_norm.weight"] == (32, 128)

    # the VQ encoder the loader fills: Chameleon's full-size vqgan.ckpt through `convert lumina-mgpt`'s
    # conversion, back to taming names as `lumina.load` does, is exactly transformers' vqmodel
    taming = {k: torch.empty(s, device="meta") for k, s in release.vqgan_shapes(release.FULL_VQ).items()}
    vq_config, vq_state = vqgan.convert_state_dict(taming, "taming", image_size=int(name), label="vqgan.ckpt")
    filled = vqgan.to_original_state_dict(vqgan.build_vqmodel(vq_config, vq_state), "taming")
    assert {k: tuple(v.shape) for k, v in filled.items() if not k.startswith("decoder.")} == \
        {k.removeprefix("model.vqmodel."): s for k, s in ours.items() if k.startswith("model.vqmodel.")}


# -- StyleAR's released weights (tests/releases/stylear.py), on the Lumina-mGPT-7B-768 release -------
def test_stylears_full_size_lora_and_resampler_are_what_the_converter_expects():
    """At full size on the meta device: StyleAR's LoRA keys (rank 4 on q/k/v/o, down_proj, lm_head of
    all 32 layers), through `lora_to_peft`, are exactly the keys and shapes peft creates on the
    7B Chameleon with the converter's targets; image_proj.pth's keys and shapes are the resampler's."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration

    from proxytune.backends.stylear import style_tokens, stylear_convert
    from releases import stylear

    config = release.full_config("768")
    shapes = stylear.lora_shapes(config)
    assert len(shapes) == 2 * (5 * stylear.NUM_LAYERS + 1) and shapes["lm_head.lm_head_lora.B"] == (4, 65536)
    peft_state, rank = stylear_convert.lora_to_peft({k: torch.empty(s, device="meta") for k, s in shapes.items()})
    with torch.device("meta"):
        model = ChameleonForConditionalGeneration(ChameleonConfig(**config))
        lora = LoraConfig(r=rank, lora_alpha=rank, target_modules=stylear_convert.LORA_TARGETS)
        expected = get_peft_model_state_dict(get_peft_model(model, lora), save_embedding_layers=False)
    assert {k: tuple(v.shape) for k, v in peft_state.items()} == \
        {f"base_model.model.{k.removeprefix('base_model.model.')}": tuple(v.shape) for k, v in expected.items()}
    with torch.device("meta"):
        resampler = style_tokens.StyleResampler(style_tokens.STYLEAR_RESAMPLER)
    theirs = stylear.resampler_shapes(style_tokens.STYLEAR_RESAMPLER)
    assert {k: tuple(v.shape) for k, v in stylear_convert.resampler_to_original(resampler).items()} == theirs


def test_a_bf16_stylear_release_converts_and_its_lora_runs_on_the_bf16_release(released, tmp_path):
    from peft import PeftModel

    from proxytune.backends.stylear import stylear_convert, style_tokens
    from releases import stylear

    bundle = students.load_student(str(released[2]))
    small = style_tokens.ResamplerConfig(dim=32, depth=1, dim_head=8, heads=2, num_queries=4, embedding_dim=20,
                                         output_dim=bundle.model.config.hidden_size)
    lora = stylear.lora_state(bundle.model, seed=5)
    folder = stylear.build(tmp_path / "stylear_models", lora, stylear.resampler_state(small), dtype=torch.bfloat16)
    meta = stylear_convert.convert_released(folder, tmp_path / "style", base_model=str(released[0]), dim_head=8)
    assert meta["lora_rank"] == 4 and meta["lora_modules"] == 2 * 5 + 1
    cond, codes = bundle.encode_prompts(["a S* dog"]), torch.randint(0, 256, (1, 64))
    keep = torch.zeros(1, dtype=torch.bool)
    with torch.no_grad():
        base = bundle.image_logits(cond, codes, keep).float()
        bundle.model = PeftModel.from_pretrained(bundle.model, str(tmp_path / "style" / "adapter"))
        styled = bundle.image_logits(cond, codes, keep).float()
    assert torch.isfinite(styled).all() and (styled - base).abs().max() > 1e-2
