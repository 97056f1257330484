"""Student recipes (the paper's baselines) and the VAR-style regularisers, proved by behaviour."""

import numpy as np
import torch

from conftest import make_params, tiny_spec
from proxytune.stages.student import StudentTrainer
from proxytune.stages.student_setup import augmented_references, position_weights
from test_student import fake_proxy_set


def recipe_for(project, proxies: int = 0, **student):
    params = make_params(project, tiny_spec(student={"steps": 10, "batch_size": 4, "checkpoint_every": 100, **student}))
    if proxies and not params.out("proxy").exists():
        fake_proxy_set(params, proxies)
    r = StudentTrainer(params)
    r.setup()
    return r


def test_direct_lora_trains_on_the_references_with_the_instance_prompt(project, photos):
    r = recipe_for(project, recipe="direct-lora", learning_rate=1e-2, steps=30)
    assert r.proxy is None and len(r.codes) == len(list((photos / "dog").iterdir()))
    assert r.conds.shape[0] == 1  # one prompt: "a S* dog"
    r.train()
    assert np.mean(r.progress.losses[-5:]) < np.mean(r.progress.losses[:5])


def test_proxy_size_sweep_takes_the_first_n(project):
    r = recipe_for(project, proxies=4, num_proxy_images=3)
    assert len(r.codes) == 3


def test_augmentation_is_seeded_geometric_and_sized(project, photos):
    from PIL import Image

    base = [Image.open(p).convert("RGB").resize((96, 96)) for p in sorted((photos / "dog").iterdir())[:2]]
    a = augmented_references(base, 6, 64, torch.Generator().manual_seed(0))
    b = augmented_references(base, 6, 64, torch.Generator().manual_seed(0))
    c = augmented_references(base, 6, 64, torch.Generator().manual_seed(1))
    assert [im.size for im in a] == [(64, 64)] * 6
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))
    assert not all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, c))
    # every copy differs from a plain resize of its source (flip, rotation or crop was applied)
    plain = [im.resize((64, 64)) for im in base]
    assert all(np.abs(np.asarray(x, dtype=int) - np.asarray(plain[i % 2], dtype=int)).mean() > 1 for i, x in enumerate(a))
    r = recipe_for(project, recipe="augment", augment_copies=12)
    assert len(r.codes) == 12


def test_direct_full_finetunes_every_weight_and_reloads_to_identical_logits(project, tmp_path):
    r = recipe_for(project, recipe="direct-full", steps=3, learning_rate=1e-3)
    total = sum(p.numel() for p in r.bundle.model.parameters())
    assert sum(p.numel() for p in r.trainable) == total
    r.train()
    weights = r._save_weights(tmp_path)
    from safetensors.torch import load_file

    from proxytune.backends import students

    fresh = students.load_student("tiny-llamagen")
    cond, codes = r.conds[:1], r.codes[:1]
    keep = torch.zeros(1, dtype=torch.bool)
    before = fresh.image_logits(cond, codes, keep)
    fresh.model.load_state_dict(load_file(weights))
    with torch.no_grad():
        assert torch.equal(fresh.image_logits(cond, codes, keep), r.bundle.image_logits(cond, codes, keep))
        assert not torch.allclose(before, fresh.image_logits(cond, codes, keep))


def test_selective_layer_tuning_puts_lora_only_where_asked(project):
    r = recipe_for(project, proxies=2, lora={"rank": 4, "alpha": 4, "groups": ["mlp"], "layers": [1]})
    adapted = {name.rsplit(".lora_A", 1)[0] for name, _ in r.bundle.model.named_parameters() if ".lora_A" in name}
    assert adapted and all(".layers.1." in name for name in adapted)
    assert {name.rsplit(".", 1)[-1] for name in adapted} == {"gate_proj", "up_proj", "down_proj"}


def test_position_weighting_favours_early_tokens_and_keeps_the_mean():
    w = position_weights(256, 2.0)
    assert torch.isclose(w.mean(), torch.tensor(1.0)) and torch.all(w[1:] < w[:-1])
    assert torch.equal(position_weights(256, 0.0), torch.ones(256))


def test_position_weighted_loss_is_the_weighted_cross_entropy(project):
    r = recipe_for(project, proxies=2, regularisers={"position_weighting": 3.0}, cfg_dropout=0.0)
    state = r.generator.get_state()
    index = torch.randint(len(r.codes), (4,), generator=r.generator)
    codes, cond = r.codes[index], r.conds[r.prompt_index[index]]
    with torch.no_grad():
        logits = r.bundle.image_logits(cond, codes, torch.zeros(4, dtype=torch.bool))
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), codes.flatten(), reduction="none").view(4, -1)
    expected = (ce * position_weights(codes.shape[1], 3.0)).mean().item()
    r.generator.set_state(state)
    got = r.train_step()["ce"]
    assert abs(got - expected) < 1e-5


def _kl_to_base(r) -> float:
    with torch.no_grad():
        torch.manual_seed(0)
        r.generator.manual_seed(0)
        return r._distillation(len(r.prior_codes)).item()


def test_prior_distillation_keeps_the_class_prior_closer_to_the_base(project):
    common = dict(proxies=4, steps=25, learning_rate=2e-2, lora={"rank": 8, "alpha": 16})
    plain = recipe_for(project, regularisers={"prior_distillation": 0.0, "prior_samples": 4}, **common)
    plain.checkpoint_dir = plain.checkpoint_dir.with_name("plain")
    # the plain run has no cached class samples: borrow the distilled run's to measure it
    distilled = recipe_for(project, regularisers={"prior_distillation": 5.0, "prior_samples": 4}, **common)
    plain.prior_codes, plain.prior_cond = distilled.prior_codes, distilled.prior_cond
    assert _kl_to_base(distilled) == 0.0  # adapter starts as the identity (lora_B = 0)
    plain.train()
    distilled.train()
    assert max(distilled.progress.series["distill"]) > 0
    assert _kl_to_base(distilled) < 0.5 * _kl_to_base(plain)


def test_bf16_autocast_and_gradient_checkpointing_train(project):
    plain = recipe_for(project, proxies=2, steps=3)
    plain.checkpoint_dir = plain.checkpoint_dir.with_name("plain")
    plain.train()
    checkpointed = recipe_for(project, proxies=2, steps=3, gradient_checkpointing=True)
    checkpointed.train()
    np.testing.assert_allclose(checkpointed.progress.losses, plain.progress.losses, rtol=1e-4)
    bf16 = recipe_for(project, proxies=2, steps=3, mixed_precision="bf16")
    bf16.checkpoint_dir = bf16.checkpoint_dir.with_name("bf16")
    bf16.train()
    assert all(p.dtype == torch.float32 for p in bf16.trainable)  # LoRA weights stay fp32
    np.testing.assert_allclose(bf16.progress.losses, plain.progress.losses, rtol=0.05)


def test_two_data_parallel_processes_train_one_student_and_resume_bit_for_bit(project):
    """`student.processes: 2` runs the stage under accelerate launch with 2 CPU processes (gloo, DDP), here
    with 2 micro-batches per step; a run killed after its step-2 checkpoint resumes in both processes
    (each from its own generator) to the weights of an uninterrupted run."""
    import os
    import re
    import shutil
    import subprocess
    import sys

    params = make_params(project, tiny_spec(student={"steps": 4, "batch_size": 2, "processes": 2, "checkpoint_every": 2,
                                                     "gradient_accumulation_steps": 2}))
    fake_proxy_set(params, 4)
    env = {k: v for k, v in os.environ.items() if k not in ("PROXYTUNE_LAUNCHED", "PROXYTUNE_CRASH_AT")}

    def launch(**extra):
        done = subprocess.run([sys.executable, "-m", "proxytune.cli", "stage", "student", "--params", str(params.path)],
                              cwd=project, env={**env, **extra}, capture_output=True, text=True, timeout=300)
        return done.returncode, done.stdout + done.stderr

    code, log = launch()
    assert code == 0, log[-3000:]
    assert "launching 2 processes" in log and "rank 0" in log and "rank 1" in log
    digests = dict(re.findall(r"rank (\d) final weights sha256 ([0-9a-f]{64})", log))
    assert set(digests) == {"0", "1"} and digests["0"] == digests["1"]
    assert (params.out("student") / "adapter" / "adapter_model.safetensors").exists()

    shutil.rmtree(params.work("student"))
    shutil.rmtree(params.out("student"))
    code, log = launch(PROXYTUNE_CRASH_AT="student:step:2")
    assert code != 0 and "simulated crash at student:step:2" in log, log[-3000:]
    code, log = launch()
    assert code == 0, log[-3000:]
    assert "student: resuming from step 2" in log
    assert dict(re.findall(r"rank (\d) final weights sha256 ([0-9a-f]{64})", log)) == digests
