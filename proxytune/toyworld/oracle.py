"""The oracle: a small CNN that reads a toy-world picture's attributes back off its pixels.

It gives model-free measures for any image generator of the world:
- prompt accuracy: of the attributes a prompt asks for (class, colour, pattern, scene, accessory),
  the fraction the image shows, averaged over images;
- subject accuracy: the fraction of images showing all of the subject's distinctive attributes
  (its class, colour, pattern and pattern colour, minus what the prompt changes).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from proxytune.toyworld import world

HEADS = {
    "cls": world.CLASSES,
    "colour": tuple(world.COLOURS),
    "pattern": world.PATTERNS,
    "pattern_colour": ("none", *world.PATTERN_COLOURS),
    "scene": world.SCENES,
    "accessory": world.ACCESSORIES,
}
WEIGHTS = "oracle.safetensors"
CONFIG = "oracle.json"


def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.SiLU())


class Oracle(nn.Module):
    """64 px RGB in [-1, 1] -> one logit vector per attribute head."""

    def __init__(self, width: int = 32):
        super().__init__()
        w = width
        self.width = width
        self.features = nn.Sequential(
            _block(3, w, 2), _block(w, w, 1), _block(w, 2 * w, 2), _block(2 * w, 2 * w, 1),
            _block(2 * w, 4 * w, 2), _block(4 * w, 4 * w, 1),
        )  # (B, 4w, 8, 8)
        self.heads = nn.ModuleDict({name: nn.Linear(8 * w, len(values)) for name, values in HEADS.items()})

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.features(pixels)
        pooled = torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)  # (B, 8w)
        return {name: head(pooled) for name, head in self.heads.items()}


def targets(attrs: list[world.Attributes]) -> dict[str, torch.Tensor]:
    """Class indices per head for a batch of attributes."""
    return {name: torch.tensor([values.index(getattr(a, name)) for a in attrs]) for name, values in HEADS.items()}


def to_pixels(images) -> torch.Tensor:
    """PIL images or a (B, 64, 64, 3) uint8 array -> (B, 3, 64, 64) in [-1, 1] (resized if needed)."""
    if isinstance(images, np.ndarray):
        arrays = images
    else:
        arrays = np.stack([
            np.asarray(im.convert("RGB").resize((world.IMAGE_SIZE,) * 2, Image.BICUBIC) if im.size != (world.IMAGE_SIZE,) * 2
                       else im.convert("RGB"), dtype=np.uint8)
            for im in images
        ])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def save(oracle: Oracle, folder: Path, *, dtype: torch.dtype = torch.float32, extra: dict | None = None) -> None:
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().to(dtype).contiguous() for k, v in oracle.state_dict().items()}, folder / WEIGHTS)
    (folder / CONFIG).write_text(json.dumps({"width": oracle.width, "heads": {k: list(v) for k, v in HEADS.items()},
                                             **(extra or {})}, indent=2) + "\n")


def load(folder: str | Path) -> Oracle:
    """An oracle from a folder written by `save` (safetensors), in eval mode, float32."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config = json.loads((folder / CONFIG).read_text())
    if {k: tuple(v) for k, v in config["heads"].items()} != HEADS:
        raise ValueError(f"{folder}: the oracle was trained on another version of the world")
    oracle = Oracle(width=config["width"])
    oracle.load_state_dict({k: v.float() for k, v in load_file(folder / WEIGHTS).items()})
    return oracle.eval().requires_grad_(False)


@torch.no_grad()
def read(oracle: Oracle, images, batch_size: int = 128) -> list[dict[str, str]]:
    """What the oracle sees in each image: {"cls": "box", "colour": "red", ...}."""
    pixels = to_pixels(images)
    out: list[dict[str, str]] = []
    for start in range(0, len(pixels), batch_size):
        logits = oracle(pixels[start : start + batch_size])
        idx = {name: lg.argmax(-1).tolist() for name, lg in logits.items()}
        for i in range(len(idx["cls"])):
            out.append({name: HEADS[name][idx[name][i]] for name in HEADS})
    return out


def shipped_reader():
    """The package's shipped oracle (toy-oracle) as a function: images -> one attribute reading per image."""
    from proxytune.toyworld.builtins import oracle_folder

    oracle = load(oracle_folder())
    return lambda images: read(oracle, images)


def prompt_accuracy(seen: dict[str, str], asked: dict[str, str]) -> float | None:
    """Fraction of the asked attributes the image shows (None when the prompt asks for nothing)."""
    if not asked:
        return None
    return sum(seen[k] == v for k, v in asked.items()) / len(asked)


def shows_subject(seen: dict[str, str], look: dict[str, str]) -> bool:
    """True when the image shows every one of the subject's distinctive attributes."""
    return all(seen[k] == v for k, v in look.items())
