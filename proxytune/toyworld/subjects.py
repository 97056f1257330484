"""Held-out subjects: specific objects whose look never appears in pretraining, with a photo shoot each.

A subject is an object identity (class, body colour, pattern, pattern colour). Pretraining data is
drawn with every subject's identity excluded, so a base model asked for "a sks box" draws some box,
almost never this one: whatever a tuned model gets right about the subject, it learnt from the
subject's references.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from proxytune.toyworld.world import Attributes, Layout, parse_prompt, render


@dataclass(frozen=True)
class Subject:
    name: str
    look: Attributes  # scene and accessory unused

    @property
    def cls(self) -> str:
        return self.look.cls

    def description(self) -> str:
        a = self.look
        return f"a {a.colour} {a.cls} with {a.pattern_colour} {a.pattern}"


SUBJECTS = {
    s.name: s
    for s in (
        Subject("stripy-box", Attributes("box", "yellow", "stripes", "black")),
        Subject("dotty-ball", Attributes("ball", "blue", "dots", "white")),
        Subject("checked-cone", Attributes("cone", "purple", "checks", "white")),
        Subject("striped-kite", Attributes("kite", "green", "stripes", "white")),
        Subject("spotted-can", Attributes("can", "red", "dots", "black")),
    )
}
HELD_OUT = frozenset(s.look.identity() for s in SUBJECTS.values())

# The photo shoot: different scenes, positions and sizes, no accessory (as DreamBench's photos are
# of the bare subject).
SHOOT = (
    ("studio", 0.34, 0.50, 0.52),
    ("room", 0.28, 0.36, 0.60),
    ("street", 0.32, 0.62, 0.58),
    ("snow", 0.27, 0.45, 0.64),
    ("beach", 0.30, 0.58, 0.55),
)


def reference_images(subject: Subject, seed: int = 0) -> list[np.ndarray]:
    """The subject's 5 reference pictures, (64, 64, 3) uint8 each."""
    images = []
    for k, (scene, size, cx, cy) in enumerate(SHOOT):
        attrs = Attributes(subject.look.cls, subject.look.colour, subject.look.pattern, subject.look.pattern_colour, scene)
        images.append(render(attrs, Layout(size=size, cx=cx, cy=cy, seed=seed * 1000 + k)))
    return images


def write_subjects(out: Path, names: list[str] | None = None) -> list[Path]:
    """Write each subject's references as PNGs into out/NAME/ (a normal reference folder)."""
    from PIL import Image

    from proxytune.files import write_png_atomic

    folders = []
    for name in names or list(SUBJECTS):
        folder = Path(out) / name
        folder.mkdir(parents=True, exist_ok=True)
        for k, image in enumerate(reference_images(SUBJECTS[name])):
            write_png_atomic(folder / f"{k:02d}.png", Image.fromarray(image))
        folders.append(folder)
    return folders


def distinctive(subject: Subject, prompt: str) -> dict[str, str]:
    """The subject's attributes an image for `prompt` should still show: its look, minus what the
    prompt changes (a recolouring prompt changes the body colour)."""
    look = {"cls": subject.look.cls, "colour": subject.look.colour, "pattern": subject.look.pattern,
            "pattern_colour": subject.look.pattern_colour}
    for key in parse_prompt(prompt):
        if key != "cls":
            look.pop(key, None)
    return look


# DreamBench-style prompts for an object: 25 per class ({token} is the identifier).
_SCENE_PROMPTS = ["in the snow", "on the beach", "in the jungle", "on the street", "at night", "in a room"]
_ACCESSORY_PROMPTS = ["wearing a hat", "wearing a crown", "with a flag"]
_RECOLOURS = ["red", "yellow", "green", "blue", "purple", "pink"]
_COMBOS = [
    ("in the snow", "wearing a hat"), ("on the beach", "wearing a crown"), ("in the jungle", "with a flag"),
    ("on the street", "wearing a hat"), ("at night", "wearing a crown"), ("in a room", "with a flag"),
    ("in the snow", "wearing a crown"), ("on the beach", "with a flag"), ("at night", "wearing a hat"),
]


def toy_prompts(token: str, cls: str) -> list[str]:
    """The toy world's 25 evaluation prompts for a subject of class `cls`."""
    prompts = [f"a {token} {cls}"]
    prompts += [f"a {token} {cls} {scene}" for scene in _SCENE_PROMPTS]
    prompts += [f"a {token} {cls} {acc}" for acc in _ACCESSORY_PROMPTS]
    prompts += [f"a {colour} {token} {cls}" for colour in _RECOLOURS]
    prompts += [f"a {token} {cls} {scene} {acc}" for scene, acc in _COMBOS]
    assert len(prompts) == 25
    return prompts


# -----------------------------------------------------------------------------
# reference folders for specs (`images: toyworld:NAME`)

REF_PREFIX = "toyworld:"


def pixels_digest(label: str, images) -> str:
    """sha256 over a label and rendered pixels: changes exactly when the pictures would."""
    import hashlib

    digest = hashlib.sha256(label.encode())
    for image in images:
        digest.update(image.tobytes())
    return digest.hexdigest()


def cached_references(kind: str, name: str, digest: str, write) -> Path:
    """A reference folder (toy subject or style) in the model cache, keyed by its pixels' digest; `write(tmp)`
    writes TMP/NAME once (atomically), later calls reuse it."""
    from proxytune.backends import tiny_cache

    return tiny_cache.materialize(f"toyworld-{kind}-{name}-{digest[:16]}", write, random_init=False) / name


def reference_digest(name: str) -> str:
    return pixels_digest(name, reference_images(SUBJECTS[name]))


def reference_folder(name: str) -> Path:
    """The subject's reference folder in the model cache, written once (atomically) and then reused.

    Raises:
        KeyError: `name` is not one of SUBJECTS.
    """
    if name not in SUBJECTS:
        raise KeyError(name)
    return cached_references("subject", name, reference_digest(name), lambda tmp: write_subjects(tmp, [name]))
