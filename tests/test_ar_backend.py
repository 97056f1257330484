"""AR student backend proved by behaviour: a deterministic tiny build, VQ round trips, LoRA that
learns and reloads exactly, and a KV-cached sampler that matches full recomputation."""

import hashlib

import numpy as np
import pytest
import torch
from PIL import Image

from proxytune import builtins
from proxytune.backends.students.llamagen import backend as llamagen
from proxytune.errors import ProxytuneError

PROMPT = "a photo of sks dog"


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A tiny-model cache of this module's own."""
    with pytest.MonkeyPatch.context() as mp:
        root = tmp_path_factory.mktemp("ar-home")
        mp.setenv("PROXYTUNE_HOME", str(root))
        yield root


@pytest.fixture(scope="module")
def bundle(home):
    """The frozen base student; tests must not wrap or train it."""
    return llamagen.load_student("tiny-llamagen")


def picture(seed: int = 0) -> Image.Image:
    """A 64 px RGB test picture: smooth waves plus a little fixed noise."""
    y, x = np.mgrid[0:64, 0:64] / 63.0
    rng = np.random.default_rng(seed)
    rgb = np.stack([np.sin(7 * x + seed), np.cos(5 * y), np.sin(4 * (x + y))], axis=-1)
    rgb = (rgb + 1) * 127.5 + rng.normal(0, 20, rgb.shape)
    return Image.fromarray(rgb.clip(0, 255).astype(np.uint8))


def file_hashes(folder):
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# -----------------------------------------------------------------------------
# building and loading


def test_tiny_build_is_deterministic(tmp_path, monkeypatch):
    folders = []
    for name in ("a", "b"):
        monkeypatch.setenv("PROXYTUNE_HOME", str(tmp_path / name))
        folders.append(builtins.model("tiny-llamagen").build())
    first, second = (file_hashes(f) for f in folders)
    assert folders[0] != folders[1]
    assert sum(name.endswith(".safetensors") for name in first) == 3  # transformer, vqvae, text_encoder
    assert first == second


def test_save_and_load_round_trip_exactly(bundle, tmp_path):
    from proxytune.backends.students.llamagen import model as llamagen_model

    assert type(bundle.model) is llamagen_model.LlamaGenStudent  # the tiny student is the faithful 2D-RoPE port
    bundle.model.save_pretrained(tmp_path)
    again = llamagen_model.LlamaGenStudent.from_pretrained(tmp_path).eval()
    before, after = bundle.model.state_dict(), again.state_dict()
    assert "uncond_embedding" in after and after["uncond_embedding"].abs().sum() > 0
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    text = torch.randn(2, bundle.config.cond_len, bundle.config.text_dim)
    codes = torch.randint(0, bundle.config.codebook_size, (2, bundle.config.seq_len))
    drop = torch.tensor([False, True])
    with torch.no_grad():
        assert torch.equal(bundle.model(text, codes, drop_cond=drop), again(text, codes, drop_cond=drop))


def test_auto_model_builds_the_class_a_saved_transformer_names(tmp_path):
    """llamagen_model registers both student configs with transformers' Auto classes: a saved
    transformer/ loads through AutoModel as the class its model_type names (1D or 2D RoPE)."""
    from transformers import AutoModel

    from proxytune.backends.students.llamagen import model as lm

    sizes = dict(codebook_size=16, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                 cond_len=4, text_dim=8, grid_size=2)
    for config_class, model_class in ((lm.ARStudentConfig, lm.ARStudent), (lm.LlamaGenStudentConfig, lm.LlamaGenStudent)):
        model_class(config_class(**sizes)).save_pretrained(tmp_path / model_class.__name__)
        assert type(AutoModel.from_pretrained(tmp_path / model_class.__name__)) is model_class


def test_loaded_student_is_frozen_and_sized(bundle):
    assert bundle.random_init and bundle.image_size == 64
    assert not any(p.requires_grad for m in (bundle.model, bundle.vq, bundle.text_encoder) for p in m.parameters())
    assert not bundle.model.training


def test_unknown_student_names_it():
    with pytest.raises(ProxytuneError, match="nonsense-model"):
        llamagen.load_student("nonsense-model")


def test_incomplete_local_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ProxytuneError, match="transformer"):
        llamagen.load_student(str(tmp_path))


# -----------------------------------------------------------------------------
# tokenizers


def test_images_to_codes_and_back(bundle):
    pixels = bundle.images_to_pixels([picture(0), picture(1).resize((80, 80))])
    assert pixels.shape == (2, 3, 64, 64) and pixels.min() >= -1 and pixels.max() <= 1
    codes = bundle.encode_images(pixels)
    assert codes.shape == (2, 256) and codes.dtype == torch.long
    assert 0 <= codes.min() and codes.max() < bundle.config.codebook_size
    assert torch.equal(codes, bundle.encode_images(pixels))
    images = bundle.decode_codes(codes)
    assert [(im.mode, im.size) for im in images] == [("RGB", (64, 64))] * 2
    again = bundle.encode_images(bundle.images_to_pixels(images))
    assert again.shape == (2, 256) and again.dtype == torch.long


def test_prompt_features_are_left_padded_with_zero_pads(bundle):
    """As the original LlamaGen: tokens in the last slots, in order; the slots before them zero."""
    prompts = ["a dog", "a much longer prompt about a dog, far past the thirty-two slots"]
    feats = bundle.encode_prompts(prompts)
    assert feats.shape == (2, 32, 32)
    # the pad token is EOS too, so only the mask tells padding from text
    mask = bundle.tokenizer(prompts, padding="max_length", max_length=32, truncation=True, padding_side="left").attention_mask
    mask = torch.tensor(mask, dtype=torch.bool)
    assert 0 < mask[0].sum() < 32 and mask[1].all() and not mask[0, 0] and mask[0, -1]
    nonzero = feats.abs().sum(-1) > 0  # (2, 32)
    assert torch.equal(nonzero, mask)
    # the short prompt's features are its right-padded encoding's, moved to the end
    right = bundle.tokenizer(prompts[:1], padding="max_length", max_length=32, return_tensors="pt")
    n = int(right.attention_mask.sum())
    with torch.no_grad():
        plain = bundle.text_encoder(**right).last_hidden_state[0, :n]
    torch.testing.assert_close(feats[0, -n:], plain)


def test_right_padded_conditions_are_refused(bundle):
    """A cond in the old layout (tokens first, zero pads after: a codes output of an older proxytune)."""
    cond = bundle.encode_prompts(["a dog"])
    n = int((cond.abs().sum(-1) > 0).sum())
    old = torch.zeros_like(cond)
    old[:, :n] = cond[:, -n:]
    codes = torch.zeros(1, bundle.seq_len, dtype=torch.long)
    with pytest.raises(ProxytuneError, match="not left-padded.*dvc repro --force --single-item codes@"):
        bundle.image_logits(old, codes, torch.tensor([False]))
    assert bundle.image_logits(cond, codes, torch.tensor([True])).shape == (1, bundle.seq_len, bundle.codebook_size)


def test_caption_features_carry_gradients_into_the_text_encoder(bundle):
    """The API for training the text encoder jointly: encode_prompts is caption_features under no_grad."""
    encoder = bundle.text_encoder
    encoder.requires_grad_(True)
    try:
        cond = bundle.caption_features(["a sks dog", "a cat"])
        codes = torch.randint(0, bundle.codebook_size, (2, bundle.seq_len), generator=torch.Generator().manual_seed(0))
        loss = bundle.loss(cond, codes, cfg_dropout=0.5, generator=torch.Generator().manual_seed(0))
        loss.backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in encoder.parameters())
        assert not bundle.encode_prompts(["a sks dog"]).requires_grad
        torch.testing.assert_close(bundle.encode_prompts(["a sks dog", "a cat"]), cond.detach(), atol=1e-5, rtol=1e-5)
    finally:
        encoder.requires_grad_(False)
        encoder.zero_grad(set_to_none=True)


# -----------------------------------------------------------------------------
# training


@pytest.fixture(scope="module")
def tuned(home):
    """A fresh student whose LoRA has overfitted one picture under one prompt."""
    from peft import LoraConfig, get_peft_model

    student = llamagen.load_student("tiny-llamagen")
    codes = student.encode_images(student.images_to_pixels([picture(0)]))  # (1, L)
    text = student.encode_prompts([PROMPT])  # (1, C, Dt)
    config = LoraConfig(r=16, lora_alpha=32, target_modules=llamagen.LORA_TARGET_MODULES)
    student.model = get_peft_model(student.model, config)
    trainable = [p for p in student.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    # Decaying to zero lets the fit settle: at a constant rate it hovers near the greedy boundary and
    # whether all 256 argmaxes come out right depended on the thread count (CPU kernels round by it).
    steps = 150
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)
    generator = torch.Generator().manual_seed(0)
    losses = []
    student.model.train()
    for _ in range(steps):
        loss = student.loss(text, codes, cfg_dropout=0.0, generator=generator)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)  # as the student stage; unclipped lr 1e-2 spikes
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    student.model.eval()
    return student, codes, text, losses


def test_lora_targets_only_the_llama_projections(tuned):
    student = tuned[0]
    adapted = {name for name, module in student.model.named_modules() if hasattr(module, "lora_A")}
    assert len(adapted) == 2 * len(llamagen.LORA_TARGET_MODULES)
    assert all(".backbone.layers." in name for name in adapted)
    trainable = [name for name, p in student.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)


def test_overfitting_one_image_reproduces_it_greedily(tuned):
    student, codes, _, losses = tuned
    assert len(codes.unique()) >= 10  # a non-trivial target
    assert np.mean(losses[-5:]) < 0.15 * losses[0], (losses[0], losses[-5:])
    out = student.generate([PROMPT], [0], cfg_scale=1.0, temperature=0)
    assert torch.equal(out, codes)


def test_saved_adapter_reloads_to_identical_logits(tuned, tmp_path):
    from peft import PeftModel

    student, codes, text, _ = tuned
    student.model.save_pretrained(str(tmp_path / "adapter"))
    fresh = llamagen.load_student("tiny-llamagen")
    drop = torch.tensor([False, True])
    text2, codes2 = text.expand(2, -1, -1), codes.expand(2, -1)
    with torch.no_grad():
        base = fresh.model(text2, codes2, drop_cond=drop)
        fresh.model = PeftModel.from_pretrained(fresh.model, str(tmp_path / "adapter"))
        fresh.model.eval()
        reloaded = fresh.model(text2, codes2, drop_cond=drop)
        trained = student.model(text2, codes2, drop_cond=drop)
    assert torch.equal(reloaded, trained)
    assert not torch.allclose(base, trained, atol=1e-3)  # the adapter really changes the model
    assert torch.equal(fresh.generate([PROMPT], [0], cfg_scale=1.0, temperature=0), codes)


# -----------------------------------------------------------------------------
# sampling


def test_cached_greedy_equals_full_recompute(bundle):
    prompts = ["a red cube", "a blue ball"]
    cached = bundle.generate(prompts, [0, 1], cfg_scale=7.5, temperature=0, use_cache=True)
    full = bundle.generate(prompts, [0, 1], cfg_scale=7.5, temperature=0, use_cache=False)
    assert cached.shape == (2, 256)
    assert torch.equal(cached, full)


def test_sampling_depends_only_on_own_prompt_and_seed(bundle):
    kwargs = dict(cfg_scale=4.0, top_k=50, temperature=1.0)
    pair = bundle.generate(["a red cube", "a blue ball"], [3, 4], **kwargs)
    assert torch.equal(pair, bundle.generate(["a red cube", "a blue ball"], [3, 4], **kwargs))
    assert torch.equal(pair[1:], bundle.generate(["a blue ball"], [4], **kwargs))
    other_seed = bundle.generate(["a red cube"], [5], **kwargs)
    assert not torch.equal(pair[:1], other_seed)
    assert 0 <= pair.min() and pair.max() < bundle.config.codebook_size
