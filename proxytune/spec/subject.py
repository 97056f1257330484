"""A subject: the thing to personalise, its class noun and its reference photos."""

from __future__ import annotations

from pydantic import Field

from proxytune.spec.common import SafeName, Strict


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
            "Folder of reference JPEG/PNG images, relative to the spec file, or 'dreambench:NAME' for a "
            "DreamBench subject (looked up under $PROXYTUNE_DREAMBENCH, default ./data/dreambench)."
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
