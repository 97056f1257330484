"""DreamBooth extras of the teacher recipe, proved by behaviour: prior preservation with cached,
seeded class images; min-SNR weighting; text-encoder LoRA round trip; validation grids; gradient
checkpointing; clear errors for what cannot run here."""

import numpy as np
import pytest
import torch

from conftest import make_params, tiny_spec
from proxytune.backends.teachers import diffusion
from proxytune.errors import ProxytuneError
from proxytune.stages.teacher import TeacherTrainer


def recipe_for(project, **teacher):
    recipe = TeacherTrainer(make_params(project, tiny_spec(teacher=teacher)))
    recipe.setup()
    return recipe


PRIOR = {"enabled": True, "num_class_images": 3, "num_inference_steps": 2, "prior_loss_weight": 0.5}


def test_prior_preservation_generates_class_images_once_and_trains_on_both(project):
    recipe = recipe_for(project, steps=4, prior_preservation=PRIOR)
    folders = list((project / ".proxytune/class_images").iterdir())
    assert len(folders) == 1 and len(list(folders[0].glob("*.png"))) == 3
    digests = {p.name: p.read_bytes() for p in folders[0].glob("*.png")}
    assert recipe.class_mean.shape[0] == 3
    recipe.train()
    series = recipe.progress.series
    assert all(p > 0 for p in series["prior_loss"])
    np.testing.assert_allclose(series["loss"], np.add(series["instance_loss"], np.multiply(0.5, series["prior_loss"])),
                               rtol=1e-5)

    # Same settings: the cached images are reused byte for byte (seeded, so they would be equal anyway;
    # a deleted image is regenerated identically).
    (folders[0] / "00001.png").unlink()
    recipe_for(project, steps=4, prior_preservation=PRIOR)
    assert {p.name: p.read_bytes() for p in folders[0].glob("*.png")} == digests
    # A changed class prompt is another cache entry.
    recipe_for(project, steps=4, prior_preservation={**PRIOR, "class_prompt": "a photo of a {class}"})
    assert len(list((project / ".proxytune/class_images").iterdir())) == 2


def test_min_snr_weights_down_easy_timesteps_only(project):
    recipe = recipe_for(project, steps=1, min_snr_gamma=5.0)
    latents = diffusion.normalize_latents(recipe.pipe.vae, recipe.latent_mean[:1, 0]).repeat(64, 1, 1, 1)
    _, timesteps, _, weight = recipe._noisy_and_target(latents)
    from diffusers.training_utils import compute_snr

    snr = compute_snr(recipe.noise_scheduler, timesteps)
    assert torch.all(weight <= 1 + 1e-6)
    assert torch.allclose(weight[snr < 5], torch.ones_like(weight[snr < 5]))
    assert torch.allclose(weight[snr >= 5], 5 / snr[snr >= 5])
    assert (snr >= 5).any() and (snr < 5).any()


def test_text_encoder_lora_round_trips_through_load_lora_weights(project, tmp_path):
    recipe = recipe_for(project, steps=6, learning_rate=1e-2, train_text_encoder=True)
    recipe.train()
    folder = tmp_path / "adapter"
    diffusion.save_lora(recipe.pipe, folder, text_encoder=True)
    from safetensors.torch import load_file

    keys = load_file(folder / diffusion.LORA_WEIGHT_NAME).keys()
    assert any(k.startswith("text_encoder.") for k in keys) and any(k.startswith("unet.") for k in keys)
    kwargs = dict(steps=3, guidance=4.0, size=64)
    in_memory = diffusion.generate(recipe.pipe, ["a S* dog"], [3], **kwargs)[0]
    reloaded = diffusion.generate(diffusion.load_pipeline_with_lora("tiny-sd", folder, fuse=False), ["a S* dog"], [3], **kwargs)[0]
    assert np.abs(np.asarray(in_memory, dtype=int) - np.asarray(reloaded, dtype=int)).max() <= 1
    # without its text-encoder half, the adapter gives other images: the text LoRA was saved and used
    unet_only = tmp_path / "unet-only"
    diffusion.save_lora(recipe.pipe, unet_only)
    other = diffusion.generate(diffusion.load_pipeline_with_lora("tiny-sd", unet_only, fuse=False), ["a S* dog"], [3], **kwargs)[0]
    assert np.abs(np.asarray(in_memory, dtype=int) - np.asarray(other, dtype=int)).max() > 2


def test_validation_grids_every_n_steps_do_not_move_training(project):
    plain = recipe_for(project, steps=4)
    plain.checkpoint_dir = plain.checkpoint_dir.with_name("plain")
    plain.train()
    validated = recipe_for(project, steps=4, validation_every=2)
    validated.train()
    grids = sorted(p.name for p in (validated.checkpoint_dir / "validation").glob("*.png"))
    assert grids == ["step_000002.png", "step_000004.png"]
    assert validated.progress.series["loss"] == plain.progress.series["loss"]


def test_gradient_checkpointing_gives_the_same_losses(project):
    plain = recipe_for(project, steps=3)
    plain.checkpoint_dir = plain.checkpoint_dir.with_name("plain")
    plain.train()
    checkpointed = recipe_for(project, steps=3, gradient_checkpointing=True)
    checkpointed.train()
    np.testing.assert_allclose(checkpointed.progress.series["loss"], plain.progress.series["loss"], rtol=1e-4)


def test_8bit_adam_without_torchao_is_a_clear_error(project, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torchao.optim", None)  # import fails as if torchao were absent
    with pytest.raises(ProxytuneError, match=r"^teacher.use_8bit_adam: needs torchao, which is not installed "
                                             r"\(pip install 'proxytune\[quantize\]'\)$"):
        recipe_for(project, steps=1, use_8bit_adam=True)


def test_two_data_parallel_processes_train_one_adapter(project):
    """`teacher.processes: 2` runs the stage under accelerate launch with 2 CPU processes (gloo)."""
    import json
    import os
    import subprocess
    import sys

    params = make_params(project, tiny_spec(teacher={"steps": 6, "processes": 2, "checkpoint_every": 3,
                                                     "learning_rate": 1e-2}))
    env = {k: v for k, v in os.environ.items() if k != "PROXYTUNE_LAUNCHED"}
    done = subprocess.run([sys.executable, "-m", "proxytune.cli", "stage", "teacher", "--params", str(params.path)],
                          cwd=project, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    log = done.stdout + done.stderr
    assert "launching 2 processes" in log
    assert "rank 0" in log and "rank 1" in log and "4 references per step in all" in log
    import re

    digests = dict(re.findall(r"rank (\d) final LoRA sha256 ([0-9a-f]{64})", log))
    assert set(digests) == {"0", "1"} and digests["0"] == digests["1"]  # gradients averaged: weights in sync
    record = json.loads((params.out("teacher") / "record.json").read_text())
    assert record["version"] == "1"
    # the adapter both processes trained loads through the pipeline and changes its images
    kwargs = dict(steps=3, guidance=4.0, size=64)
    tuned = diffusion.generate(diffusion.load_pipeline_with_lora("tiny-sd", params.out("teacher") / "adapter"), ["a S* dog"], [1], **kwargs)[0]
    base = diffusion.generate(diffusion.load_pipeline("tiny-sd"), ["a S* dog"], [1], **kwargs)[0]
    assert np.abs(np.asarray(tuned, dtype=int) - np.asarray(base, dtype=int)).max() > 2


def test_random_crop_cuts_a_fresh_window_from_cached_latents(project):
    recipe = recipe_for(project, model="tiny-sdxl", steps=3, random_crop=True)
    h = 64 // recipe.pipe.vae_scale_factor
    assert recipe.margin == 1 and recipe.latent_mean.shape[-1] == h + 2  # encoded once, 4 px larger each side
    corners = set()
    for _ in range(12):
        latents, crops = recipe._latents(recipe.latent_mean, recipe.latent_std, 2)
        assert latents.shape[-2:] == (h, h)
        assert crops.min() >= 0 and crops.max() <= 2 * recipe.pipe.vae_scale_factor
        corners |= {tuple(c) for c in crops.tolist()}
    assert len(corners) > 3  # a fresh window each draw
    # the window is the cached posterior mean at that offset (checked with the noise switched off)
    recipe.latent_std = torch.zeros_like(recipe.latent_std)
    latents, crops = recipe._latents(recipe.latent_mean, recipe.latent_std, 1)
    assert any(torch.allclose(latents[0], diffusion.normalize_latents(recipe.pipe.vae, recipe.latent_mean[i, f, :, y:y + h, x:x + h]))
               for i in range(len(recipe.latent_mean)) for f in (0, 1)
               for y, x in [(int(crops[0, 0]) // 4, int(crops[0, 1]) // 4)])
    recipe.train()
    assert all(np.isfinite(recipe.progress.losses))
