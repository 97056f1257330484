"""Synthesis: context templates, sharding over 2 accelerate CPU processes (byte-identical to one
process), and the optional quality filter."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import make_params, tiny_spec
from proxytune.backends.teachers import diffusion
from proxytune.files import sha256_file
from proxytune.images import list_images
from proxytune.outputs import write_record
from proxytune.stages import synthesis

SYNTH = {"num_images": 5, "batch_size": 2, "num_inference_steps": 2}


def with_teacher(project, **synth):
    """Compiled params plus a real (untrained) teacher LoRA and the teacher record synthesis reads."""
    params = make_params(project, tiny_spec(synthesis={**SYNTH, **synth}))
    pipe = diffusion.load_pipeline("tiny-sd")
    diffusion.add_lora(pipe.unet, rank=4, alpha=4, target_modules=["to_q", "to_v"])
    adapter = diffusion.save_lora(pipe, params.out("teacher") / "adapter")
    write_record(params.out("teacher"), {"stage": "teacher", "run_id": "0" * 32, "model": "t.dog.teacher",
                                                "version": "1", "adapter_digest": sha256_file(adapter)})
    return params


def test_templates_cycle_through_images_with_fixed_seeds(project):
    params = with_teacher(project, templates=["a {token} {class} on the beach", "a {token} {class} in snow"])
    prompts = synthesis.proxy_prompts(params)
    token = params.subject.token  # the spec default
    assert prompts == [f"a {token} dog", f"a {token} dog on the beach", f"a {token} dog in snow"]
    assert [synthesis.prompt_of(prompts, i) for i in range(5)] == [prompts[0], prompts[1], prompts[2], prompts[0], prompts[1]]


def test_two_processes_give_the_same_set_as_one(project, tmp_path):
    params = with_teacher(project, processes=2, templates=["a {token} {class} on the beach"])
    single = tmp_path / "single"
    single.mkdir()
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # torchrun gives each process one thread; CPU kernels round by thread count
    try:
        synthesis.generate_missing(params, params.out("teacher"), single)
    finally:
        torch.set_num_threads(threads)

    env = {**os.environ, "PROXYTUNE_LAUNCHED": ""}
    env.pop("PROXYTUNE_LAUNCHED")
    done = subprocess.run([sys.executable, "-m", "proxytune.cli", "stage", "synthesis", "--params", str(params.path)],
                          cwd=project, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "launching 2 processes" in done.stderr
    assert "synthesis [1/2]" in done.stderr and "synthesis [2/2]" in done.stderr  # both shards generated
    manifest = json.loads((params.out("proxy") / "manifest.json").read_text())
    assert [e["sha256"] for e in manifest["images"]] == [sha256_file(single / f"{i:05d}.png") for i in range(5)]
    token = params.subject.token
    assert [e["prompt"] for e in manifest["images"]] == [f"a {token} dog", f"a {token} dog on the beach"] * 2 + [f"a {token} dog"]


def test_quality_filter_scores_against_references_and_drops_the_least_similar(project, photos):
    params = with_teacher(project, filter={"enabled": True, "drop_fraction": 0.4})
    scratch = project / "scratch"
    scratch.mkdir()
    references = [Image.open(p).convert("RGB") for p in list_images(params.references_dir)]
    rng = np.random.default_rng(0)
    entries, images = [], []
    for i in range(5):  # two reference photos among noise
        image = references[i].resize((64, 64)) if i in (1, 3) else Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
        image.save(scratch / f"{i:05d}.png")
        images.append(image)
        entries.append({"file": f"images/{i:05d}.png", "prompt": "a S* dog", "seed": i, "sha256": sha256_file(scratch / f"{i:05d}.png")})
    kept, dropped = synthesis.quality_filter(params, [dict(e) for e in entries], scratch)

    # the score is the mean cosine of the proxy's DINO embedding to every reference's (computed here anew)
    from proxytune.backends import encoders

    dino = encoders.load_dino("tiny-dino")
    gen, ref = dino.image_embeds([Image.open(scratch / f"{i:05d}.png") for i in range(5)]), dino.image_embeds(references)
    expected = (gen @ ref.T).mean(dim=1).numpy()
    scores = {e["seed"]: e["similarity"] for e in kept + dropped}
    np.testing.assert_allclose([scores[i] for i in range(5)], expected, atol=1e-5)
    assert len(kept) == 3 and len(dropped) == 2  # 40 % of 5
    assert max(e["similarity"] for e in dropped) <= min(e["similarity"] for e in kept)
    again, _ = synthesis.quality_filter(params, [dict(e) for e in entries], scratch)
    assert again == kept  # deterministic

    threshold = float(np.median(expected))
    params.synthesis.filter = {"enabled": True, "min_similarity": threshold}
    kept, dropped = synthesis.quality_filter(params, [dict(e) for e in entries], scratch)
    assert {e["seed"] for e in dropped} == {i for i in range(5) if expected[i] < threshold - 1e-6}

    params.synthesis.filter = {"enabled": True, "min_similarity": 1.0}  # nothing is that close: a clear error, not an empty set
    from proxytune.errors import ProxytuneError

    with pytest.raises(ProxytuneError, match="every proxy image was dropped"):
        synthesis.quality_filter(params, [dict(e) for e in entries], scratch)
