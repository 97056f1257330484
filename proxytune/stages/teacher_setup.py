"""The teacher stage's pieces around its training loop: prior-preservation class images (generated once,
cached across subjects), the optimiser, and image-to-tensor conversion. Not a stage (the teacher stage
imports it)."""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from proxytune.backends.teachers import diffusion
from proxytune.errors import ProxytuneError
from proxytune.files import write_png_atomic
from proxytune.images import open_rgb
from proxytune.spec import TeacherSpec
from proxytune.stages import training
from proxytune.stages.runtime import config_key
from proxytune.stages.sampling import unfinished_blocks

CLASS_IMAGES = Path(".proxytune") / "class_images"  # under the project root (the stage's cwd)


def class_images(pipe, spec: TeacherSpec, class_prompt: str) -> list:
    """Prior-preservation class images from the frozen base model `pipe`, generated once and cached.

    The cache key covers everything the images depend on (model, revision, prompt, seeds,
    resolution, sampler settings), so a changed prompt regenerates them and other subjects of the
    same class reuse them. Finished images survive a crash; missing ones are generated.
    """
    pp = spec.prior_preservation
    key = config_key(spec.model, spec.revision, class_prompt, pp.seed, pp.num_class_images,
                     spec.resolution, pp.num_inference_steps, pp.guidance_scale)
    folder = CLASS_IMAGES / key
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{i:05d}.png" for i in range(pp.num_class_images)]
    todo = unfinished_blocks(paths, 4)
    if todo:
        tqdm.write(f"teacher: generating {sum(map(len, todo))} class images {class_prompt!r} into {folder}")
        for block in tqdm(todo, desc="teacher: class images", unit="batch"):
            images = diffusion.generate(pipe, [class_prompt] * len(block), [pp.seed + i for i in block],
                                        steps=pp.num_inference_steps, guidance=pp.guidance_scale, size=spec.resolution)
            for i, image in zip(block, images):
                write_png_atomic(paths[i], image)
    return [open_rgb(path) for path in paths]


def optimizer(groups: list[dict], spec: TeacherSpec) -> torch.optim.Optimizer:
    """AdamW over the LoRA parameter groups: torchao's 8-bit one with `use_8bit_adam` (as the student's,
    CPU and CUDA), else torch's (fused, `training.adamw`).

    torchao keeps each group's learning rate as a tensor and refuses a float in its place; torch's LR
    schedulers fill such a tensor in place, so the teacher's warmup schedule runs on it unchanged.

    Raises:
        ProxytuneError: `use_8bit_adam` without torchao installed.
    """
    if spec.use_8bit_adam:
        try:
            from torchao.optim import AdamW8bit  # its import-time noise: proxytune/__init__.py
        except ImportError:
            raise ProxytuneError("teacher.use_8bit_adam: needs torchao, which is not installed "
                                 "(pip install 'proxytune[quantize]')") from None
        return AdamW8bit(groups, lr=groups[0]["lr"], weight_decay=spec.weight_decay)
    return training.adamw(groups, weight_decay=spec.weight_decay)


def to_tensor(image) -> torch.Tensor:
    """PIL RGB -> (3, H, W) float in [-1, 1]."""
    import numpy as np

    array = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0)
    return array.permute(2, 0, 1).contiguous()
