"""A subject: the thing to personalise, its class noun and its reference photos."""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from proxytune.builtins import world_ref
from proxytune.spec.common import SafeName, Strict


def toy_subject_name(images: str) -> str | None:
    """NAME of an `images: WORLD:NAME` reference (toyworld:NAME), else None."""
    ref = world_ref(images)
    return None if ref is None else ref[1]


def installed_world(prefix: str, *, folder_hint: bool = False):
    """The built-in world `prefix` (a `proxytune.builtins.World`).

    Args:
        prefix: the world's name, e.g. `toyworld`.
        folder_hint: for an `images` field, also say how to write a folder whose name looks like `WORLD:NAME`.
    Raises:
        ValueError: no installed plugin provides it; the message names the installed worlds and the fix.
    """
    from proxytune import builtins

    world = builtins.world(prefix)
    if world is None:
        known = ", ".join(builtins.world_names()) or "none"
        hint = f", or write ./{prefix}:NAME for a folder of that name" if folder_hint else ""
        raise ValueError(f"no built-in world {prefix!r} is installed (installed: {known}): install the plugin that "
                         f"provides it (the toy world comes with proxytune's own package){hint}")
    return world


class _WrongClass(str):
    """A class noun that contradicts the toy subject, carried to the class field's own validator so
    that the error names `subjects[i].class`."""

    expected: str


class SubjectSpec(Strict):
    name: SafeName = Field(description="Subject name; becomes a folder and part of registry names.")
    class_noun: str = Field(
        alias="class",
        min_length=1,
        description="Class noun of the subject, e.g. 'dog' or 'backpack' (prompts read 'a sks dog').",
    )
    images: str = Field(
        min_length=1,
        description=(
            "Folder of reference JPEG/PNG images, relative to the spec file, 'dreambench:NAME' for a "
            "DreamBench subject (looked up under $PROXYTUNE_DREAMBENCH, default ./data/dreambench), or "
            "'toyworld:NAME' for a held-out subject of the toy world (written once into the model cache; its "
            "class may be left out, and evaluation adds the oracle's subject and prompt accuracy)."
        ),
    )
    token: str = Field(
        default="sks",
        min_length=1,
        pattern=r"^\S+$",
        description=(
            "Identifier token bound to the subject (one word, no spaces), in the teacher's and the student's "
            "prompts. A llamagen student sees prompts through LlamaGen's caption cleaning (lower case, much "
            "punctuation removed): the default 'sks' passes unchanged, 'S*' reaches it as 's' (a warning), and "
            "one the cleaning removes ('<sks>', '@sks', 'jc6640') is refused."
        ),
    )

    model_config = Strict.model_config | {"populate_by_name": True}

    @model_validator(mode="before")
    @classmethod
    def _toy_class(cls, data):
        """A toy subject's class defaults to the subject's own; another class is an error."""
        if not isinstance(data, dict) or not isinstance(data.get("images"), str):
            return data
        from proxytune import builtins

        ref = world_ref(data["images"])
        if ref is None:
            return data
        world = builtins.world(ref[0])
        if world is None or ref[1] not in world.subject_names():
            # the images field reports it; a missing class must not hide that
            return data if ("class" in data or "class_noun" in data) else {**data, "class": "?"}
        expected = world.subject_class(ref[1])
        key = "class" if "class" in data or "class_noun" not in data else "class_noun"
        given = data.get(key)
        if given is None:
            return {**data, key: expected}
        if isinstance(given, str) and given != expected:
            wrong = _WrongClass(given)
            wrong.expected = expected
            return {**data, key: wrong}
        return data

    @field_validator("class_noun", mode="before")
    @classmethod
    def _class_matches_toy_subject(cls, value):
        if isinstance(value, _WrongClass):
            raise ValueError(f"{str(value)!r} is not the toy subject's class: it is a {value.expected} "
                             f"(write class: {value.expected}, or leave class out)")
        return value

    @field_validator("images")
    @classmethod
    def _known_toy_subject(cls, value: str) -> str:
        ref = world_ref(value)
        if ref is not None:
            known = installed_world(ref[0], folder_hint=True).subject_names()
            if ref[1] not in known:
                raise ValueError(f"unknown toy subject {ref[1]!r} (known: {', '.join(known)})")
        return value

    @property
    def toy_subject(self) -> str | None:
        """The world subject's name when `images` is `WORLD:NAME` (toyworld:NAME), else None."""
        return toy_subject_name(self.images)

    @property
    def world(self) -> str | None:
        """The built-in world `images` names (`toyworld` for toyworld:NAME), else None."""
        ref = world_ref(self.images)
        return None if ref is None else ref[0]
