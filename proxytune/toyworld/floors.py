"""Quality floors of the shipped toy models, measured by the oracle.

- oracle: per-attribute accuracy on fresh renders (floor 98 % each);
- toy-sd and toy-llamagen: prompt accuracy on generations of held-in prompts (full captions of
  pretraining-distribution pictures, held-out subjects excluded): of the attributes a caption
  names, the fraction the oracle reads off the image, averaged over images (floors 85 % and 70 %).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from proxytune.toyworld import oracle as oracle_lib
from proxytune.toyworld import world
from proxytune.toyworld.subjects import HELD_OUT

FLOORS = {"oracle": 0.98, "toy-sd": 0.85, "toy-llamagen": 0.70}
CHECK_SEED = 424242
# Sampler settings the toy generators are measured (and, by default, used) with.
SD_SAMPLER = {"steps": 25, "guidance": 5.0}
LLAMAGEN_SAMPLER = {"cfg_scale": 3.0, "top_k": 64, "temperature": 1.0}


def held_in_prompts(n: int, seed: int = CHECK_SEED) -> list[str]:
    rng = np.random.default_rng(seed)
    return [world.caption(world.sample_attributes(rng, exclude=HELD_OUT)) for _ in range(n)]


def prompt_accuracy(oracle: oracle_lib.Oracle, images, prompts: list[str]) -> dict:
    seen = oracle_lib.read(oracle, images)
    per_image = [oracle_lib.prompt_accuracy(s, world.parse_prompt(p)) for s, p in zip(seen, prompts)]
    per_attr: dict[str, list[bool]] = {}
    for s, p in zip(seen, prompts):
        for key, value in world.parse_prompt(p).items():
            per_attr.setdefault(key, []).append(s[key] == value)
    return {"prompt_accuracy": float(np.mean(per_image)),
            "per_attribute": {k: float(np.mean(v)) for k, v in sorted(per_attr.items())}}


def oracle_accuracy(oracle: oracle_lib.Oracle, n: int = 1000, seed: int = CHECK_SEED) -> dict[str, float]:
    images, samples = world.sample_world(n, seed, full_captions=True)
    seen = oracle_lib.read(oracle, images)
    return {k: float(np.mean([s[k] == getattr(x.attrs, k) for s, x in zip(seen, samples)])) for k in oracle_lib.HEADS}


@torch.no_grad()
def sd_images(prompts: list[str], seeds: list[int], *, batch: int = 25, model: str = "toy-sd"):
    from proxytune.backends.teachers import diffusion

    pipe = diffusion.load_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    images = []
    for i in range(0, len(prompts), batch):
        images += diffusion.generate(pipe, prompts[i : i + batch], seeds[i : i + batch], size=world.IMAGE_SIZE,
                                     **SD_SAMPLER)
    return images


@torch.no_grad()
def llamagen_images(prompts: list[str], seeds: list[int], *, batch: int = 50, model: str = "toy-llamagen"):
    from proxytune.backends.students import load_student

    bundle = load_student(model)
    images = []
    for i in range(0, len(prompts), batch):
        codes = bundle.generate(prompts[i : i + batch], seeds[i : i + batch], **LLAMAGEN_SAMPLER)
        images += bundle.decode_codes(codes)
    return images


def measure(samples: int = 200, models: tuple[str, ...] = ("oracle", "toy-sd", "toy-llamagen"),
            pretrained: Path | None = None) -> dict:
    """The floors' measures of the shipped models, or of a pretraining folder's (float32) models."""
    from proxytune.toyworld.builtins import oracle_folder

    oracle = oracle_lib.load(pretrained / "oracle" if pretrained else oracle_folder())
    sd = str(pretrained / "sd") if pretrained else "toy-sd"
    llamagen = str(pretrained / "llamagen") if pretrained else "toy-llamagen"
    result: dict = {}
    if "oracle" in models:
        result["oracle"] = oracle_accuracy(oracle)
    prompts = held_in_prompts(samples)
    seeds = list(range(CHECK_SEED, CHECK_SEED + samples))
    if "toy-sd" in models:
        result["toy-sd"] = prompt_accuracy(oracle, sd_images(prompts, seeds, model=sd), prompts)
    if "toy-llamagen" in models:
        result["toy-llamagen"] = prompt_accuracy(oracle, llamagen_images(prompts, seeds, model=llamagen), prompts)
    return result
