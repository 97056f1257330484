"""plan with `student.sharding: fsdp`: a 7B direct-full student at its real size (meta configs), per GPU
when sharded over N, and sharding offered where only it fits.

Traces come from the session's cache (PROXYTUNE_HOME, a fresh folder per test session): the arithmetic of
sharding is under test here, not the tracer (tests/test_plan.py traces afresh), and test_docs plans
specs/direct-full-sharded.yaml on the same traces."""

from __future__ import annotations

import yaml

from proxytune.plan.gpus import custom_gpu, find_gpu
from proxytune.plan.stages import plan_spec
from proxytune.spec import load_spec

LUMINA_7B = "Alpha-VLLM/Lumina-mGPT-7B-768"


def _plan(tmp_path, gpu, gpus: int, **student):
    spec = {"name": "full7b", "subjects": [{"name": "dog", "class": "dog", "images": "dreambench:dog"}],
            "student": {"model": LUMINA_7B, "recipe": "direct-full", "steps": 100, "mixed_precision": "bf16", **student},
            "evaluation": {"prompts": "dreambench", "images_per_prompt": 4}, "memory": "manual"}
    path = tmp_path / "full7b.yaml"
    path.write_text(yaml.safe_dump(spec))
    plan = plan_spec(load_spec(path), str(path), tmp_path, gpu, gpus)
    return plan, next(s for s in plan.stages if s.stage == "student")


def test_a_7b_direct_full_fits_four_80gb_cards_only_sharded(tmp_path, photos, monkeypatch):
    monkeypatch.setenv("PROXYTUNE_DREAMBENCH", str(photos))
    h100 = find_gpu("H100-80GB")
    _, whole = _plan(tmp_path, h100, 1)  # batch 8 (the default): every weight, its gradient and AdamW state
    assert not whole.fits
    _, ddp = _plan(tmp_path, h100, 4, processes=4)  # DDP: a whole copy per GPU
    assert not ddp.fits and ddp.peak == whole.peak
    plan, sharded = _plan(tmp_path, h100, 4, processes=4, sharding="fsdp")
    assert sharded.fits and "sharded over 4 GPUs" in sharded.what
    assert sharded.optimizer == whole.optimizer // 4
    assert sharded.activations == whole.activations  # each process's own batch
    # a quarter of the weights and gradients, plus what is gathered whole while it runs (less than the rest)
    for kind in ("weights", "gradients"):
        quarter = getattr(whole, kind) // 4
        assert quarter < getattr(sharded, kind) < quarter + getattr(whole, kind) // 4, kind
    assert not any("no sharding" in note for note in plan.notes)


def test_sharding_is_suggested_where_only_it_fits(tmp_path, photos, monkeypatch):
    monkeypatch.setenv("PROXYTUNE_DREAMBENCH", str(photos))
    card = custom_gpu(24.0)
    # batch 1 and bf16 already: on one 24 GB card nothing the spec offers fits ...
    plan, alone = _plan(tmp_path, card, 1, batch_size=1)
    assert not alone.fits and "student" not in plan.suggestions
    assert "none yet" not in alone.suggestion and "student.sharding: fsdp" in alone.suggestion
    # ... on four, sharding over all of them does (8-bit AdamW is never proposed with it: the spec refuses both)
    plan, four = _plan(tmp_path, card, 4, batch_size=1)
    suggestion = plan.suggestions["student"]
    assert suggestion.changes == {"sharding": "fsdp", "processes": 4}
    assert suggestion.estimate.fits and four.suggestion.startswith("student.sharding: fsdp, student.processes: 4")
    # a spec that asks for more processes than plan was given GPUs is told so
    plan, _ = _plan(tmp_path, card, 1, batch_size=1, processes=4, sharding="fsdp")
    assert any("needs that many GPUs (plan --gpus 4)" in note for note in plan.notes)
