"""Built-in names: one table of built-in models and one of built-in worlds, which backends and plugins fill.

A built-in model name (tiny-llamagen, toy-sd, ...) stands for a folder made on first use that then loads
through the same `from_pretrained` calls as a released checkpoint. proxytune's own tiny random models are
registered by the backends (`proxytune.backends.register_builtins`), a plugin's by the plugin, both through
the `proxytune.plugins` entry-point group (pyproject.toml). A plugin may also register a world: a source of
subjects, styles, prompts and judges that specs name as `WORLD:NAME` (the toy world is such a plugin, `toyworld`). Production code reaches a plugin only through these tables, never by importing it.

Import-light on purpose (no torch): the spec checks names against these tables before any model loads.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Callable, Literal, Protocol

Role = Literal["teacher", "student", "clip", "dino", "judge"]
PLUGIN_GROUP = "proxytune.plugins"
OWN = "proxytune"  # the entry point of proxytune's own tiny models and metrics


@dataclass(frozen=True)
class BuiltinModel:
    """One built-in model name.

    Attributes:
        name: what a spec writes (`tiny-sdxl`, `toy-llamagen`).
        role: which spec field takes it.
        build: makes (first call) or finds its folder; imports what it needs itself.
        random_init: True for random weights (reports say so), False for trained ones (the toy world's).
        provider: who registered it: "proxytune" or the plugin's entry-point name.
        digest: the weights' digest, for the records that name the base model; None when it has none.
    """

    name: str
    role: Role
    build: Callable[[], Path]
    random_init: bool = True
    provider: str = "proxytune"
    digest: Callable[[], str | None] | None = None


class World(Protocol):
    """A built-in world (`images: NAME:SUBJECT` in a spec): its subjects, styles, prompts and judges.

    A world is a plugin's; proxytune's stages read it only through this interface, and its judges' scores
    reach the evaluation as metrics registered in `proxytune.metrics`.
    """

    name: str
    classes: tuple[str, ...]

    def subject_names(self) -> tuple[str, ...]: ...
    def subject_class(self, subject: str) -> str: ...
    def subject_references(self, subject: str) -> Path: ...
    def style_names(self) -> tuple[str, ...]: ...
    def style_references(self, style: str) -> Path: ...
    def subject_prompts(self, token: str, class_noun: str) -> list[str]: ...
    def style_prompts(self, count: int, seed: int, exclude: set[str]) -> list[str]: ...
    def captions(self, count: int, seed: int) -> list[str]:
        """Up to `count` distinct captions of the world's scenes, deterministic in `seed` (curation prompts)."""
    def raw_pairs(self, count: int, seed: int) -> list[tuple[Any, str]]:
        """`count` (HxWx3 uint8 image, caption) pairs, deterministic in `seed` (a style student's raw data)."""
    def shows_subject(self, images: list, prompts: list[str], token: str, subject: str) -> Any:
        """(N,) 1.0 where the world's judge finds `subject` in image i (drawn for prompts[i]), else 0.0."""
    def shows_style(self, images: list, style: str) -> Any:
        """(N,) 1.0 where the world's judge finds `style` in image i, else 0.0."""
    def describe(self) -> dict:
        """What records say about the world: at least "name", "note" (a line for result tables) and "judge"."""


_MODELS: dict[str, BuiltinModel] = {}
_WORLDS: dict[str, World] = {}
_loaded = False


def register_model(model: BuiltinModel) -> None:
    """Add a built-in model name; a name taken by another provider is an error (two folders, one name)."""
    known = _MODELS.get(model.name)
    if known is not None and known.provider != model.provider:
        raise ValueError(f"built-in model {model.name!r}: registered by {known.provider} and by {model.provider}")
    _MODELS[model.name] = model


def register_world(world: World) -> None:
    _WORLDS[world.name] = world


def _load() -> None:
    """Fill the tables once from the `proxytune.plugins` entry points: proxytune's own (its tiny models and
    metrics, `proxytune.backends.register_builtins`) first, then every installed plugin by name.

    Raises:
        ProxytuneError: proxytune's own entry point is missing (proxytune imported from a source tree that
            was never installed).
    """
    global _loaded
    if _loaded:
        return
    _loaded = True
    entries = sorted(entry_points(group=PLUGIN_GROUP), key=lambda entry: (entry.name != OWN, entry.name))
    if not entries or entries[0].name != OWN:
        from proxytune.errors import ProxytuneError

        raise ProxytuneError("proxytune's built-in models are registered by its install: run `pip install -e .` "
                             "(README: Setup) in the repository, then retry")
    for entry in entries:
        entry.load()()


def model_names(role: Role) -> tuple[str, ...]:
    _load()
    return tuple(name for name, model in _MODELS.items() if model.role == role)


def model(name: str) -> BuiltinModel | None:
    """The built-in model `name`, or None when `name` is not one."""
    _load()
    return _MODELS.get(name)


def builders(role: Role) -> dict[str, Callable[[], Path]]:
    """name -> folder maker of every built-in of a role (`tiny_cache.resolve`'s table)."""
    _load()
    return {name: m.build for name, m in _MODELS.items() if m.role == role}


def world(name: str) -> World | None:
    """The built-in world `name` (the prefix of `images: NAME:...`), or None when none is installed."""
    _load()
    return _WORLDS.get(name)


def world_names() -> tuple[str, ...]:
    _load()
    return tuple(_WORLDS)


_WORLD_REF = re.compile(r"^([a-z][a-z0-9_-]*):([^/\\]+)$")  # WORLD:NAME; dreambench:NAME is a folder


def world_ref(images: str) -> tuple[str, str] | None:
    """(WORLD, NAME) of an `images: WORLD:NAME` reference to a built-in world (e.g. toyworld:NAME), else None."""
    match = _WORLD_REF.match(images)
    if match is None or match.group(1) == "dreambench":
        return None
    return match.group(1), match.group(2)


def world_item(images: str) -> tuple[World | None, str | None]:
    """(world, item) for a spec's `images: WORLD:NAME` of an installed world, else (None, None)."""
    ref = world_ref(images)
    found = world(ref[0]) if ref is not None else None
    return (found, ref[1]) if found is not None else (None, None)


WORLD_MARKER = "proxytune_toy.json"  # in every folder of a world's trained model (the toy world writes it)


def from_world(folder: str | Path) -> bool:
    """True for a model folder a world made (trained in that world, so its numbers are the world's)."""
    return (Path(folder) / WORLD_MARKER).exists()
