"""The pixel multiple a teacher pipeline's resolution must be, read from its config files only (no torch, no
weights), so that `validate`, `compile` and `apply` refuse an unusable `teacher.resolution` before writing anything.

Per family (the pipeline class in model_index.json, as in `diffusion.FAMILIES`), with f = the VAE's
downsampling factor 2 ** (len(vae.block_out_channels) - 1):
- sd, sdxl  lcm(f, 8): diffusers' SD and SDXL pipelines refuse a height or width not divisible by 8
- sd3       f * transformer.patch_size: the MMDiT cuts the latent into patches
- flux      f * 2: latents are packed 2x2 (FLUX's own pipeline silently shrinks other sizes; training crashes)
"""

from __future__ import annotations

import json
import math
from pathlib import Path

# Built-in teachers, without materialising them (tests check these against the built folders).
BUILTIN_MULTIPLES = {"tiny-sd": 8, "tiny-sdxl": 8, "tiny-sd3": 8, "tiny-flux": 8, "toy-sd": 8}


def multiple_from_configs(model_index: dict, vae: dict, transformer: dict | None) -> int | None:
    """The resolution multiple of a pipeline given its parsed config files; None for an unknown pipeline."""
    factor = 2 ** (len(vae.get("block_out_channels", (0,) * 4)) - 1)
    kind = model_index.get("_class_name")
    if kind in ("StableDiffusionPipeline", "StableDiffusionXLPipeline"):
        return math.lcm(factor, 8)
    if kind == "StableDiffusion3Pipeline":
        return factor * int((transformer or {}).get("patch_size", 2))
    if kind == "FluxPipeline":
        return factor * 2
    return None


def config_file(ref: str, name: str, root: Path, revision: str | None = None) -> dict | None:
    """A config file of a local model folder (relative to `root`) or, when already in the hub cache, of a hub
    id; None if neither has it or it is not JSON. Reads no weights and downloads nothing."""
    local = root / Path(ref).expanduser()
    if local.is_dir():
        path = local / name
    else:
        if ref.startswith((".", "/", "~")):  # a folder that is not there: the model check says so
            return None
        try:
            from huggingface_hub import try_to_load_from_cache
            from huggingface_hub.errors import HFValidationError
        except ImportError:
            return None
        try:
            found = try_to_load_from_cache(ref, name, revision=revision)
        except (HFValidationError, ValueError):  # not a usable repo id or revision
            return None
        if not isinstance(found, str):
            return None
        path = Path(found)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def resolution_multiple(ref: str, root: Path, revision: str | None = None) -> int | None:
    """The multiple `teacher.resolution` must be for the teacher `ref`; None when it cannot be told without
    loading (a hub id not yet downloaded, a folder without configs: the model check reports those)."""
    if ref in BUILTIN_MULTIPLES:
        return BUILTIN_MULTIPLES[ref]
    model_index = config_file(ref, "model_index.json", root, revision)
    vae = config_file(ref, "vae/config.json", root, revision)
    if model_index is None or vae is None:
        return None
    return multiple_from_configs(model_index, vae, config_file(ref, "transformer/config.json", root, revision))
