"""Text-encoder LoRA (`teacher.train_text_encoder: true`) goes through peft's own API, not transformers'
PEFT integration (which transformers 5.24 gates on peft>=0.22): it gives the same adapter as
transformers' `add_adapter`, survives a checkpoint/resume bit for bit, and the saved adapter fused for
synthesis gives the images of the trained pipeline. The save -> `load_lora_weights` round trip itself is
tests/test_teacher_features.py::test_text_encoder_lora_round_trips_through_load_lora_weights."""

import numpy as np
import pytest
import torch

from conftest import make_params, tiny_spec
from proxytune.backends.teachers import diffusion
from proxytune.stages.teacher import TEXT_ENCODER_TARGETS, TeacherTrainer


def recipe_for(project, **teacher):
    recipe = TeacherTrainer(make_params(project, tiny_spec(teacher={"train_text_encoder": True, **teacher})))
    recipe.setup()
    return recipe


def test_peft_text_encoder_lora_equals_transformers_add_adapter(project):
    from peft import LoraConfig

    ours = diffusion.load_pipeline("tiny-sd").text_encoder
    theirs = diffusion.load_pipeline("tiny-sd").text_encoder
    torch.manual_seed(7)
    params = diffusion.add_lora(ours, rank=4, alpha=4, target_modules=TEXT_ENCODER_TARGETS)
    torch.manual_seed(7)
    try:
        theirs.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=TEXT_ENCODER_TARGETS))
    except ValueError as err:
        pytest.skip(f"this transformers' add_adapter refuses this peft: {err}")
    mine = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    reference = {n: p for n, p in theirs.named_parameters() if p.requires_grad}
    assert mine.keys() == reference.keys() and len(mine) == 4 * 2 * ours.config.num_hidden_layers  # q k v out, A B
    assert all(torch.equal(mine[n], reference[n]) for n in mine)
    assert [p.data_ptr() for p in params] == [p.data_ptr() for p in mine.values()]  # add_lora returns exactly these
    with torch.no_grad():  # a non-zero B so that the adapter shows in the output
        for module in (ours, theirs):
            torch.manual_seed(1)
            for name, p in module.named_parameters():
                if "lora_B" in name:
                    p.normal_()
    ids = torch.tensor([[0, 5, 9, 2]])
    with torch.no_grad():
        assert torch.equal(ours(ids).last_hidden_state, theirs(ids).last_hidden_state)


def test_text_encoder_lora_resumes_bit_for_bit(project):
    from peft.utils import get_peft_model_state_dict

    straight = recipe_for(project, steps=4, checkpoint_every=2, learning_rate=1e-2)
    straight.checkpoint_dir = straight.checkpoint_dir.with_name("straight")
    straight.train()

    first = recipe_for(project, steps=4, checkpoint_every=2, learning_rate=1e-2)
    first.spec.steps = 2  # "killed" right after the step-2 checkpoint
    first.train()
    first.spec.steps = 4
    first.save_checkpoint()
    resumed = recipe_for(project, steps=4, checkpoint_every=2, learning_rate=1e-2)
    assert resumed.progress.step == 2
    resumed.train()

    assert resumed.progress.series == straight.progress.series
    a, b = (get_peft_model_state_dict(r.pipe.text_encoder) for r in (straight, resumed))
    assert a.keys() == b.keys() and len(a) > 0 and all(torch.equal(a[k], b[k]) for k in a)
    assert any(v.abs().sum() > 0 for k, v in b.items() if "lora_B" in k)  # trained (B starts at zero) and restored


def test_saved_text_encoder_lora_fused_for_synthesis_gives_the_trained_images(project, tmp_path):
    recipe = recipe_for(project, steps=4, learning_rate=1e-2)
    recipe.train()
    folder = tmp_path / "adapter"
    diffusion.save_lora(recipe.pipe, folder, text_encoder=True)
    kwargs = dict(steps=3, guidance=4.0, size=64)
    trained = diffusion.generate(recipe.pipe, ["a S* dog"], [3], **kwargs)[0]
    fused = diffusion.generate(diffusion.load_pipeline_with_lora("tiny-sd", folder, fuse=True), ["a S* dog"], [3], **kwargs)[0]
    assert np.abs(np.asarray(trained, dtype=int) - np.asarray(fused, dtype=int)).max() <= 1
