"""Teacher training proved by behaviour, for every diffusers family (tiny variants): the loss falls
when overfitting, the saved LoRA reloads through the family's pipeline to the same images, and an
interrupted run resumes bit for bit."""

import numpy as np
import pytest
import torch

from conftest import copy_images, make_params, tiny_spec
from proxytune.backends.teachers import diffusion
from proxytune.stages.teacher import TeacherTrainer

FAMILIES = {"tiny-sd": "sd", "tiny-sdxl": "sdxl", "tiny-sd3": "sd3", "tiny-flux": "flux"}


def recipe_for(project, **teacher):
    params = make_params(project, tiny_spec(teacher=teacher))
    recipe = TeacherTrainer(params)
    recipe.setup()
    return recipe


def test_family_comes_from_model_index_not_the_name(tmp_path):
    import shutil

    for name, family in FAMILIES.items():
        renamed = tmp_path / f"renamed-{name}"
        shutil.copytree(diffusion.resolve(name), renamed)
        assert diffusion.detect_family(str(renamed)).name == family
    (tmp_path / "other").mkdir()
    (tmp_path / "other/model_index.json").write_text('{"_class_name": "KandinskyPipeline"}')
    with pytest.raises(Exception, match="pipeline KandinskyPipeline is not supported"):
        diffusion.detect_family(str(tmp_path / "other"))


@pytest.mark.parametrize("model", list(FAMILIES))
def test_loss_falls_when_overfitting_one_reference(project, photos, model):
    copy_images(photos / "dog", project / "one", count=1)
    # attention and feed-forward layers: the tiny SDXL/SD3 have few attention layers to adapt
    lora = {"rank": 16, "alpha": 16, "target_modules": ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2",
                                                      "proj_in", "proj_out", "conv1", "conv2", "add_k_proj", "add_v_proj"]}
    spec = tiny_spec(teacher={"model": model, "steps": 150, "batch_size": 4, "learning_rate": 1e-2, "lora": lora,
                              "random_flip": False, "checkpoint_every": 1000})
    spec["subjects"][0]["images"] = "../one"
    recipe = TeacherTrainer(make_params(project, spec))
    recipe.setup()
    assert recipe.family.name == FAMILIES[model]
    # Fixed noise, fixed times: the same batch before and after training isolates learning from noise.
    before = _fixed_batch_loss(recipe)
    recipe.train()
    after = _fixed_batch_loss(recipe)
    first, last = np.mean(recipe.progress.losses[:10]), np.mean(recipe.progress.losses[-10:])
    assert last < 0.5 * first, (first, last)
    assert after < 0.5 * before, (before, after)


@torch.no_grad()
def _fixed_batch_loss(recipe) -> float:
    g = torch.Generator().manual_seed(123)
    latents = diffusion.normalize_latents(recipe.pipe.vae, recipe.latent_mean[:, 0]).repeat(8, 1, 1, 1)
    noise = torch.randn(latents.shape, generator=g)
    if recipe.family.flow_matching:
        sigmas = torch.linspace(0.1, 0.9, 8).view(8, 1, 1, 1)
        noisy, t, target = (1 - sigmas) * latents + sigmas * noise, sigmas.flatten() * 1000, noise - latents
    else:
        t = torch.linspace(50, 950, 8).long()
        noisy, target = recipe.noise_scheduler.add_noise(latents, noise, t), noise
    pred = diffusion.predict(recipe.pipe, noisy, t, recipe._text(8, prior=False), size=recipe.spec.resolution)
    return torch.nn.functional.mse_loss(pred, target).item()


@pytest.mark.parametrize("model", list(FAMILIES))
def test_saved_lora_reloads_through_pipeline_to_same_images(project, tmp_path, model):
    recipe = recipe_for(project, model=model, steps=10, learning_rate=1e-2)
    recipe.train()
    lora = diffusion.lora_state_dict(recipe.denoiser)
    assert any(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k or "lora.up" in k)
    kwargs = dict(steps=4, guidance=4.0, size=64)
    # the trainer dropped its text encoders after caching: it generates from its cached text, as the stage does
    prompts = [recipe.prompt] * 2
    in_memory = diffusion.generate(recipe.pipe, prompts, [7, 8], text=recipe.sample_text, **kwargs)
    folder = tmp_path / "adapter"
    diffusion.save_lora(recipe.pipe, folder)
    reloaded = diffusion.load_pipeline_with_lora(model, folder, fuse=False)
    again = diffusion.generate(reloaded, prompts, [7, 8], **kwargs)
    fused = diffusion.generate(diffusion.load_pipeline_with_lora(model, folder), prompts, [7, 8], **kwargs)
    base = diffusion.generate(diffusion.load_pipeline(model), prompts, [7, 8], **kwargs)
    for a, b, f, c in zip(in_memory, again, fused, base):
        a, b, f, c = (np.asarray(x, dtype=np.int16) for x in (a, b, f, c))
        assert np.abs(a - b).max() <= 1  # uint8 rounding only
        assert np.abs(a - f).max() <= 2  # fusing reorders float sums
        assert np.abs(a - c).max() > 5  # and the adapter really changes the output


@pytest.mark.parametrize("model", ["tiny-sd", "tiny-flux"])
def test_interrupted_run_resumes_bit_for_bit(project, model):
    straight = recipe_for(project, model=model, steps=20, checkpoint_every=10)
    straight.checkpoint_dir = straight.checkpoint_dir.with_name("straight")
    straight.train()

    first = recipe_for(project, model=model, steps=20, checkpoint_every=10)
    first.spec.steps = 10  # "killed" right after the step-10 checkpoint
    first.train()
    first.spec.steps = 20
    first.save_checkpoint()
    resumed = recipe_for(project, model=model, steps=20, checkpoint_every=10)
    assert resumed.progress.step == 10
    resumed.train()

    assert resumed.progress.series == straight.progress.series
    a, b = diffusion.lora_state_dict(straight.denoiser), diffusion.lora_state_dict(resumed.denoiser)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
