"""The toy world: rendering, captions and prompts, tokenizer, subjects, pretraining resume, shipped models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from proxytune.toyworld import oracle as oracle_lib
from proxytune.toyworld import pretrain, pretrain_encoders, pretrain_generators, world
from proxytune.toyworld.subjects import HELD_OUT, SUBJECTS, distinctive, reference_images, toy_prompts


def test_render_is_a_function_of_attributes_and_layout():
    rng = np.random.default_rng(3)
    attrs = world.sample_attributes(rng)
    layout = world.sample_layout(rng, attrs)
    a, b = world.render(attrs, layout), world.render(attrs, layout)
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    other = world.render(world.Attributes(*attrs.identity(), scene="night" if attrs.scene != "night" else "snow"), layout)
    assert np.abs(a.astype(int) - other.astype(int)).mean() > 10  # the scene changes the picture


def test_world_samples_are_deterministic_and_exclude_held_out_subjects():
    images, samples = world.sample_world(600, seed=5, exclude=HELD_OUT)
    again, _ = world.sample_world(600, seed=5, exclude=HELD_OUT)
    assert np.array_equal(images, again)
    assert not {s.attrs.identity() for s in samples} & HELD_OUT
    # without the exclusion a subject's look is an ordinary combination the sampler can draw
    rng = np.random.default_rng(0)
    drawn = {world.sample_attributes(rng).identity() for _ in range(20000)}
    assert drawn & HELD_OUT


def test_full_captions_parse_back_to_every_attribute():
    rng = np.random.default_rng(11)
    for _ in range(300):
        attrs = world.sample_attributes(rng)
        asked = world.parse_prompt(world.caption(attrs))
        expected = {"cls": attrs.cls, "colour": attrs.colour}
        if attrs.pattern != "plain":
            expected |= {"pattern": attrs.pattern, "pattern_colour": attrs.pattern_colour}
        if attrs.scene != "studio":
            expected["scene"] = attrs.scene
        if attrs.accessory != "none":
            expected["accessory"] = attrs.accessory
        assert asked == expected


def test_toy_prompts_ask_what_dreambench_prompts_ask():
    prompts = toy_prompts("sks", "box")
    assert len(prompts) == len(set(prompts)) == 25
    asked = [world.parse_prompt(p) for p in prompts]
    assert all(a["cls"] == "box" for a in asked)
    assert sum("scene" in a for a in asked) == 15 and sum("accessory" in a for a in asked) == 12
    assert sum("colour" in a for a in asked) == 6
    box = SUBJECTS["stripy-box"]
    assert distinctive(box, "a sks box on the beach") == {"cls": "box", "colour": "yellow", "pattern": "stripes",
                                                          "pattern_colour": "black"}
    assert "colour" not in distinctive(box, "a purple sks box")


def test_tokenizer_gives_world_words_one_token_and_spells_identifiers(tmp_path):
    from transformers import CLIPTokenizer

    from proxytune.toyworld.tokenizer import write_toy_tokenizer

    tok = CLIPTokenizer.from_pretrained(write_toy_tokenizer(tmp_path))
    for word in world.VOCABULARY:
        assert len(tok(word, add_special_tokens=False).input_ids) == 1, word
    ids = tok("a sks box", add_special_tokens=False).input_ids
    assert tok.convert_ids_to_tokens(ids) == ["a</w>", "s", "k", "s</w>", "box</w>"]


def test_subject_references_differ_in_scene_place_and_size_but_show_the_subject():
    for subject in SUBJECTS.values():
        refs = reference_images(subject)
        assert len(refs) == 5
        assert len({r.tobytes() for r in refs}) == 5
    # the photo shoot is deterministic
    assert all(np.array_equal(a, b) for a, b in zip(reference_images(SUBJECTS["dotty-ball"]),
                                                     reference_images(SUBJECTS["dotty-ball"])))


def _tiny_config(steps: int) -> pretrain.PretrainConfig:
    cfg = pretrain.PretrainConfig(num_images=64, checkpoint_every=2, threads=1, jobs=1, eval_samples=16)
    cfg.recipes["oracle"] = pretrain.Recipe(steps=steps, batch_size=8, lr=1e-3, warmup=1)
    return cfg


def test_pretraining_resumes_to_the_same_weights(tmp_path, monkeypatch):
    """A run killed after a checkpoint and resumed ends with the weights of an uninterrupted run."""
    _small_fresh_renders(monkeypatch)
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    pretrain.pretrain(whole, _tiny_config(5), ["oracle"])

    real_update = pretrain.Loop.update
    calls = {"n": 0}

    def crash_on_fourth(self, loss):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt("killed")
        real_update(self, loss)

    monkeypatch.setattr(pretrain.Loop, "update", crash_on_fourth)
    with pytest.raises(KeyboardInterrupt):
        pretrain.pretrain(broken, _tiny_config(5), ["oracle"])
    assert (broken / "checkpoints" / "oracle.pt").exists() and not (broken / "oracle" / "done.json").exists()
    monkeypatch.setattr(pretrain.Loop, "update", real_update)
    pretrain.pretrain(broken, _tiny_config(5), ["oracle"])

    a, b = oracle_lib.load(whole / "oracle"), oracle_lib.load(broken / "oracle")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


def _small_fresh_renders(monkeypatch) -> None:
    """Quality measures on 16 fresh renders instead of eval_samples (every recipe module that measures)."""
    for module in (pretrain_encoders, pretrain_generators):
        monkeypatch.setattr(module, "fresh_renders", lambda n, seed: world_small(seed))


def world_small(seed: int):
    images, samples = world.sample_world(16, seed + 10_000, full_captions=True)
    return images, [s.attrs for s in samples]


def test_two_lanes_train_in_parallel_and_a_missing_dependency_is_named(tmp_path):
    """jobs=2 runs the lanes as two processes (the config travels in config.json); a model whose
    inputs are neither pretrained nor requested is refused before anything trains."""
    from proxytune.errors import ProxytuneError

    cfg = _tiny_config(3)
    cfg.jobs = 2
    cfg.recipes["clip"] = pretrain.Recipe(steps=2, batch_size=4, lr=1e-3, warmup=1)
    spent = pretrain.pretrain(tmp_path, cfg, ["oracle", "clip"])
    assert set(spent) == {"oracle", "clip"} and all(s > 0 for s in spent.values())
    for name, steps in (("oracle", 3), ("clip", 2)):
        assert json.loads((tmp_path / name / "done.json").read_text())["steps"] == steps
    with pytest.raises(ProxytuneError, match="--only sd: needs vae"):
        pretrain.pretrain(tmp_path, cfg, ["sd"])
    assert not (tmp_path / "checkpoints" / "sd.pt").exists()


def test_sd_pretraining_trains_its_text_encoder_only_when_asked(tmp_path, monkeypatch):
    """With text_lr_scale > 0 the SD text encoder (toy-clip's text tower at the start) learns with
    the UNet; with 0 it is saved as toy-clip's tower, bit for bit."""
    from transformers import CLIPModel, CLIPTextModel

    _small_fresh_renders(monkeypatch)
    monkeypatch.setattr(pretrain_encoders, "clip_retrieval", lambda folder, seed, n=256: 0.0)
    cfg = _tiny_config(2)
    for name in ("clip", "vae"):
        cfg.recipes[name] = pretrain.Recipe(steps=2, batch_size=4, lr=1e-3, warmup=1)
    pretrain.pretrain(tmp_path / "base", cfg, ["oracle", "clip", "vae"])
    tower = CLIPModel.from_pretrained(tmp_path / "base" / "clip").text_model.state_dict()

    def sd_text_encoder(scale: float) -> dict:
        out = tmp_path / f"scale{scale}"
        import shutil

        shutil.copytree(tmp_path / "base", out)
        cfg.recipes["sd"] = pretrain.Recipe(steps=2, batch_size=4, lr=1e-3, warmup=1, text_lr_scale=scale,
                                            min_snr_gamma=5.0)
        pretrain.pretrain(out, cfg, ["sd"])
        te = CLIPTextModel.from_pretrained(out / "sd" / "text_encoder")
        return getattr(te, "text_model", te).state_dict()

    frozen, trained = sd_text_encoder(0.0), sd_text_encoder(0.5)
    assert all(torch.equal(frozen[k], tower[k]) for k in tower)
    assert any(not torch.equal(trained[k], tower[k]) for k in tower)


def test_vq_and_llamagen_pretraining_use_the_configured_codebook(tmp_path, monkeypatch):
    """vq_codes sizes the VQ's codebook and the student's code vocabulary alike: the finished
    toy-llamagen folder loads through the student loader and samples codes of that codebook only."""
    from proxytune.backends.students.llamagen import backend as llamagen

    _small_fresh_renders(monkeypatch)
    cfg = _tiny_config(2)
    cfg.vq_codes = 32
    cfg.recipes["vq"] = pretrain.Recipe(steps=2, batch_size=4, lr=1e-3, warmup=1)
    cfg.recipes["llamagen"] = pretrain.Recipe(steps=2, batch_size=4, lr=1e-3, warmup=1)
    pretrain.pretrain(tmp_path, cfg, ["oracle", "vq", "llamagen"])
    bundle = llamagen.load_student(str(tmp_path / "llamagen"))
    assert bundle.model.config.codebook_size == 32
    assert bundle.vq.config.num_vq_embeddings == 32
    codes = bundle.generate(["a red box"], [0], cfg_scale=3.0, top_k=None, temperature=1.0)
    assert codes.shape == (1, 64) and int(codes.max()) < 32
