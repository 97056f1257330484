"""Student stage recipe: trains on the proxy manifest only, and resumes bit for bit."""

import json

import torch
from PIL import Image

from conftest import make_params, tiny_spec
from proxytune.files import sha256_file
from proxytune.stages.student import StudentTrainer


def fake_proxy_set(params, count: int = 4) -> None:
    """A proxy folder as synthesis writes it (images, manifest, record), from solid-colour images."""
    proxy = params.out("proxy")
    (proxy / "images").mkdir(parents=True)
    entries = []
    for i in range(count):
        name = f"images/{i:05d}.png"
        Image.new("RGB", (64, 64), (60 * i, 255 - 50 * i, 120)).save(proxy / name)
        entries.append({"file": name, "prompt": "a S* dog", "seed": i, "sha256": sha256_file(proxy / name)})
    (proxy / "manifest.json").write_text(json.dumps({"images": entries}))
    (proxy / "record.json").write_text(json.dumps({"digest": "d" * 64, "prompts_digest": "p" * 64, "num_images": count,
                                                    "teacher_version": "t.dog.teacher@1", "run_id": "r"}))
    # the codes stage's output (its encoding, without the MLflow run)
    from safetensors.torch import save

    from proxytune.stages import codes

    tensors, metadata = codes.encode_proxies(params)
    params.out("codes").mkdir()
    (params.out("codes") / "codes.safetensors").write_bytes(save(tensors, metadata=metadata))


def recipe(params):
    r = StudentTrainer(params)
    r.setup()
    return r


def assert_resumes_bit_for_bit(params, straight, half: int) -> None:
    """A run stopped after `half` of `straight`'s steps, checkpointed and resumed ends with `straight`'s
    losses and LoRA weights exactly (same computation, same order)."""
    from peft.utils import get_peft_model_state_dict

    total = straight.spec.steps  # read first: the recipes may share one spec object
    first = recipe(params)
    first.spec.steps = half
    first.train()
    first.spec.steps = total
    first.save_checkpoint()
    resumed = recipe(params)
    assert resumed.progress.step == half
    resumed.train()
    assert resumed.progress.losses == straight.progress.losses
    a, b = (get_peft_model_state_dict(r.bundle.model, save_embedding_layers=False) for r in (straight, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_student_trains_on_proxies_and_resumes_bit_for_bit(project):
    params = make_params(project, tiny_spec(student={"steps": 12, "checkpoint_every": 6, "batch_size": 2}))
    fake_proxy_set(params)

    straight = recipe(params)
    straight.checkpoint_dir = straight.checkpoint_dir.with_name("straight")
    straight.train()
    assert straight.codes.shape == (4, 256)
    group = straight.optimizer.optimizer.param_groups[0]  # accelerate's wrapper around torch's AdamW
    assert group["fused"] and group["betas"] == (0.9, 0.95) and group["weight_decay"] == straight.spec.weight_decay

    assert_resumes_bit_for_bit(params, straight, half=6)
    assert straight.progress.losses[-1] < straight.progress.losses[0]


def test_codes_stage_output_is_checked_against_model_and_proxy_set(project):
    import pytest

    from proxytune.errors import ProxytuneError
    from proxytune.stages import codes_file

    params = make_params(project, tiny_spec())
    fake_proxy_set(params, 3)
    tensors = codes_file.load_codes(params.out("codes"), model="tiny-llamagen", proxy_digest="d" * 64)
    assert tensors["codes"].shape == (3, 256) and tensors["prompt_index"].tolist() == [0, 0, 0]
    with pytest.raises(ProxytuneError, match="made for model 'tiny-llamagen' and another proxy set"):
        codes_file.load_codes(params.out("codes"), model="tiny-janus", proxy_digest="d" * 64)
    with pytest.raises(ProxytuneError, match="made for model"):
        codes_file.load_codes(params.out("codes"), model="tiny-llamagen", proxy_digest="e" * 64)
