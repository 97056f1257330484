"""Training on accelerate: fp16 scales the loss (GradScaler) and the scale survives a checkpoint,
gradient accumulation gives the update of the larger batch with `steps` counting optimiser updates, and
checkpoints (accelerate's save_state) are written crash-safe: a half-written or old-layout one is never loaded.

accelerate makes no GradScaler for fp16 on CPU, so `training.accelerator` supplies one there; these tests
run that CPU scaler through the same `accelerator.backward` / `clip_grad_norm_` / prepared-optimizer path
a GPU run takes.
"""

import shutil

import numpy as np
import pytest
import torch

from conftest import make_params, record_step_gradients, tiny_spec
from proxytune.errors import ProxytuneError
from proxytune.stages.student import StudentTrainer
from proxytune.stages.teacher import TeacherTrainer
from test_student import fake_proxy_set


def teacher_for(project, **teacher):
    recipe = TeacherTrainer(make_params(project, tiny_spec(teacher={"checkpoint_every": 100, **teacher})))
    recipe.setup()
    return recipe


def student_for(project, **student):
    params = make_params(project, tiny_spec(student={"checkpoint_every": 100, **student}))
    if not params.out("proxy").exists():
        fake_proxy_set(params, 4)
    recipe = StudentTrainer(params)
    recipe.setup()
    return recipe


def assert_same_update_gradient(accumulated: list[torch.Tensor], big: list[torch.Tensor]) -> None:
    """The first optimiser step's gradients agree to float32 rounding.

    Both runs start from the same weights and see the same examples, so the gradients are the same sum of
    per-example terms taken in another order (2 x 2 against 4). Reordering a float32 sum changes it by at most
    about n * 2**-24 of the summed magnitudes; with n a few hundred terms per entry that is under 1e-4 of the
    largest entry, which is the tolerance. Later steps are not compared entry by entry: Adam divides each
    entry by its own running magnitude, so a rounding-sized difference in a near-zero gradient becomes a
    weight difference of the order of the learning rate (issue 31), and from then on the two runs compute at
    different weights. A broken accumulation is far outside the bound: an undivided loss doubles every entry,
    and gradients zeroed between micro-batches keep only the last micro-batch's half.
    """
    assert len(accumulated) == len(big)
    scale = max(g.abs().max().item() for g in big)
    for a, b in zip(accumulated, big):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * scale)


def _record_scaled_losses(recipe) -> list[tuple[float, float]]:
    """(loss as computed, loss as backpropagated) of every backward call."""
    seen, backward = [], recipe.accelerator.backward

    def spy(loss, **kwargs):
        scaler = recipe.accelerator.scaler
        seen.append((loss.item(), (scaler.scale(loss) if scaler is not None else loss).item()))
        backward(loss, **kwargs)

    recipe.accelerator.backward = spy
    return seen


def test_fp16_teacher_scales_its_loss_and_checkpoints_the_scale(project):
    plain = teacher_for(project, steps=2, max_grad_norm=1e6)
    plain.checkpoint_dir = plain.checkpoint_dir.with_name("plain")
    assert plain.accelerator.scaler is None
    plain.train()

    fp16 = teacher_for(project, steps=2, max_grad_norm=1e6, mixed_precision="fp16")
    scaler = fp16.accelerator.scaler
    assert scaler is not None and scaler.is_enabled() and scaler.get_scale() == 65536.0
    seen = _record_scaled_losses(fp16)
    fp16.train()
    # the loss was multiplied by the scale before backward ...
    assert len(seen) == 2 and all(np.isclose(scaled, 65536.0 * loss, rtol=1e-3) for loss, scaled in seen)
    # ... and the gradients divided by it before clipping: the norms are the fp32 run's, not 65536 x
    np.testing.assert_allclose(fp16.progress.series["grad_norm"], plain.progress.series["grad_norm"], rtol=0.1)
    assert all(p.dtype == torch.float32 for p in fp16.trainable)  # LoRA weights stay fp32

    scaler.update(new_scale=1024.0)  # a scale a long run might have reached
    fp16.save_checkpoint()
    saved = torch.load(fp16.checkpoint_dir / "checkpoint-2" / "scaler.pt", weights_only=True)  # accelerate's file
    assert saved["scale"] == 1024.0
    resumed = teacher_for(project, steps=2, max_grad_norm=1e6, mixed_precision="fp16")
    assert resumed.progress.step == 2
    assert resumed.accelerator.scaler.state_dict() == scaler.state_dict()


def test_fp16_student_scales_its_loss_and_resumes_the_scale(project):
    recipe = student_for(project, steps=4, batch_size=2, checkpoint_every=2, mixed_precision="fp16")
    seen = _record_scaled_losses(recipe)
    recipe.spec.steps = 2
    recipe.train()
    assert len(seen) == 2 and all(np.isclose(scaled, recipe.accelerator.scaler.get_scale() * loss, rtol=1e-3)
                                  for loss, scaled in seen)
    recipe.accelerator.scaler.update(new_scale=512.0)
    recipe.save_checkpoint()
    resumed = student_for(project, steps=4, batch_size=2, checkpoint_every=2, mixed_precision="fp16")
    assert resumed.progress.step == 2 and resumed.accelerator.scaler.get_scale() == 512.0
    resumed.train()
    assert resumed.progress.step == 4 and all(np.isfinite(resumed.progress.losses))


def test_student_accumulation_matches_the_larger_batch(project):
    """Batch 2 x 2 accumulated makes the update of batch 4: one training image and no dropout, so both
    see the same data, and the first update's gradients and every step's loss and gradient norm agree."""
    same = {"num_proxy_images": 1, "cfg_dropout": 0.0, "dropout": 0.0, "steps": 3, "learning_rate": 1e-2}
    big = student_for(project, batch_size=4, **same)
    big.checkpoint_dir = big.checkpoint_dir.with_name("big")
    big_grads = record_step_gradients(big)
    big.train()
    accumulated = student_for(project, batch_size=2, gradient_accumulation_steps=2, **same)
    accumulated_grads = record_step_gradients(accumulated)
    calls = []
    micro = accumulated._micro_batch_loss
    accumulated._micro_batch_loss = lambda: calls.append(1) or micro()
    accumulated.train()

    assert accumulated.progress.step == 3 and len(accumulated.progress.losses) == 3  # steps = optimiser updates
    assert len(calls) == 6  # two micro-batches each
    np.testing.assert_allclose(accumulated.progress.losses, big.progress.losses, rtol=1e-5)
    np.testing.assert_allclose(accumulated.progress.series["grad_norm"], big.progress.series["grad_norm"], rtol=1e-4)
    assert len(accumulated_grads) == len(big_grads) == 3
    assert_same_update_gradient(accumulated_grads[0], big_grads[0])


def test_teacher_accumulation_counts_optimiser_steps(project):
    recipe = teacher_for(project, steps=2, gradient_accumulation_steps=3, lr_warmup_steps=4)
    draws = []
    latents = recipe._latents
    recipe._latents = lambda *a: draws.append(1) or latents(*a)
    recipe.train()
    assert recipe.progress.step == 2 and len(recipe.progress.losses) == 2
    assert len(draws) == 6  # three micro-batches per optimiser step
    assert recipe.lr_scheduler.last_epoch == 2  # the schedule advanced once per update
    assert recipe.progress.series["lr"] == [0.0, 1e-3 / 4]


def test_teacher_accumulation_matches_the_larger_batch(project):
    """Batch 2 x 2 accumulated makes the update of batch 4 when both see the same latents, noise and
    times (drawn here from a fixed pool, row by row, instead of the recipe's generator)."""
    def fixed_draws(recipe):
        g = torch.Generator().manual_seed(5)
        shape = recipe.latent_mean.shape[2:]
        pool = {"latents": torch.randn(4, *shape, generator=g), "noise": torch.randn(4, *shape, generator=g),
                "t": torch.tensor([100, 400, 700, 900])}
        at = {"row": 0}

        def latents(mean, std, count):
            start = at["row"] % 4
            at["row"] += count
            return pool["latents"][start : start + count], torch.zeros(count, 2, dtype=torch.long)

        def noisy_and_target(batch):
            rows = slice((at["row"] - len(batch)) % 4, (at["row"] - len(batch)) % 4 + len(batch))
            noise, t = pool["noise"][rows], pool["t"][rows]
            return recipe.noise_scheduler.add_noise(batch, noise, t), t, noise, torch.ones(len(batch))

        recipe._latents, recipe._noisy_and_target = latents, noisy_and_target

    same = {"steps": 3, "learning_rate": 1e-2, "random_flip": False}
    big = teacher_for(project, batch_size=4, **same)
    big.checkpoint_dir = big.checkpoint_dir.with_name("big")
    fixed_draws(big)
    big_grads = record_step_gradients(big)
    big.train()
    accumulated = teacher_for(project, batch_size=2, gradient_accumulation_steps=2, **same)
    fixed_draws(accumulated)
    accumulated_grads = record_step_gradients(accumulated)
    accumulated.train()

    assert accumulated.progress.step == 3 and len(accumulated.progress.losses) == 3
    np.testing.assert_allclose(accumulated.progress.losses, big.progress.losses, rtol=1e-5)
    np.testing.assert_allclose(accumulated.progress.series["grad_norm"], big.progress.series["grad_norm"], rtol=1e-4)
    assert len(accumulated_grads) == len(big_grads) == 3
    assert_same_update_gradient(accumulated_grads[0], big_grads[0])


def test_a_half_written_or_old_layout_checkpoint_is_never_loaded(project, capsys):
    first = teacher_for(project, steps=2, checkpoint_every=1)
    first.train()  # checkpoint-1 written (the last step saves none)
    folder = first.checkpoint_dir
    assert sorted(p.name for p in folder.iterdir() if "checkpoint" in p.name) == ["checkpoint-1"]
    assert (folder / "checkpoint-1" / "trained.safetensors").exists()  # the LoRA weights, not the whole UNet
    assert not (folder / "checkpoint-1" / "model.safetensors").exists()

    # a save killed half-way leaves its staging folder: never loaded, replaced by the next save
    partial = folder / ".checkpoint-2.partial"
    partial.mkdir()
    (partial / "optimizer.bin").write_bytes(b"cut short")
    resumed = teacher_for(project, steps=2, checkpoint_every=1)
    assert resumed.progress.step == 1
    resumed.train()
    resumed.save_checkpoint()
    assert sorted(p.name for p in folder.iterdir() if "checkpoint" in p.name) == ["checkpoint-2"]  # the older one pruned once this was in place

    # a folder in the layout before accelerate (state.pt beside lora.safetensors): training starts over, and says so
    shutil.rmtree(folder / "checkpoint-2")
    (folder / "state.pt").write_bytes(b"old layout")
    (folder / "lora.safetensors").write_bytes(b"old layout")
    capsys.readouterr()
    fresh = teacher_for(project, steps=2, checkpoint_every=1)
    assert fresh.progress.step == 0
    assert "older layout (state.pt); not resumed, training starts over" in capsys.readouterr().out

    # a checkpoint folder that does not load is a one-line error naming it, not a traceback
    (folder / "checkpoint-5").mkdir()
    (folder / "checkpoint-5" / "trained.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ProxytuneError, match=r"checkpoint-5: cannot resume from it .*; delete the folder to start over$"):
        teacher_for(project, steps=2, checkpoint_every=1)
