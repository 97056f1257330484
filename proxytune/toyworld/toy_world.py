"""The toy world behind proxytune's `World` interface (`proxytune.builtins.World`), registered by plugin.py.

Specs name its subjects and styles as `images: toyworld:NAME`; the spec, curation, synthesis and the
evaluations reach it only through `proxytune.builtins.world("toyworld")`. Import-light: every method imports
the rendering, the oracle (torch) or the cache when it is called.
"""

from __future__ import annotations

from pathlib import Path

NAME = "toyworld"
NOTE = ("Toy world: models pretrained on proxytune's procedural world (proxytune/toyworld); CLIP-I, CLIP-T and DINO "
        "come from its toy encoders, subject and prompt accuracy from its oracle, which reads the attributes off "
        "each image.")


class ToyWorld:
    """proxytune's procedural 64x64 world: five held-out subjects, three rendering styles, an oracle."""

    name = NAME

    @property
    def classes(self) -> tuple[str, ...]:
        from proxytune.toyworld.world import CLASSES

        return CLASSES

    def subject_names(self) -> tuple[str, ...]:
        from proxytune.toyworld.subjects import SUBJECTS

        return tuple(SUBJECTS)

    def subject_class(self, subject: str) -> str:
        """The subject's class noun. Raises KeyError for an unknown subject."""
        from proxytune.toyworld.subjects import SUBJECTS

        return SUBJECTS[subject].cls

    def subject_references(self, subject: str) -> Path:
        """The subject's reference folder, rendered into the model cache on first use. Raises KeyError."""
        from proxytune.toyworld.subjects import reference_folder

        return reference_folder(subject)

    def style_names(self) -> tuple[str, ...]:
        from proxytune.toyworld.styles import STYLES

        return STYLES

    def style_references(self, style: str) -> Path:
        """The style's reference folder, rendered into the model cache on first use. Raises KeyError."""
        from proxytune.toyworld.styles import reference_folder

        return reference_folder(style)

    def subject_prompts(self, token: str, class_noun: str) -> list[str]:
        """The 25 evaluation prompts for a subject of `class_noun` (scenes, accessories, colours, both)."""
        from proxytune.toyworld.subjects import toy_prompts

        return toy_prompts(token, class_noun)

    def style_prompts(self, count: int, seed: int, exclude: set[str]) -> list[str]:
        """`count` distinct "a COLOUR CLASS SCENE" prompts, none of them the references' content or in `exclude`."""
        from proxytune.toyworld.styles import eval_prompts

        return eval_prompts(count, seed, exclude=exclude)

    def captions(self, count: int, seed: int) -> list[str]:
        """Up to `count` distinct captions of random attributes, deterministic in `seed` (fewer when the
        world composes fewer within 200 draws per caption)."""
        import numpy as np

        from proxytune.toyworld.world import caption, sample_attributes

        rng = np.random.default_rng(seed)
        seen: list[str] = []
        for _ in range(200 * count):
            text = caption(sample_attributes(rng), rng)
            if text not in seen:
                seen.append(text)
            if len(seen) == count:
                break
        return seen

    def raw_pairs(self, count: int, seed: int) -> list[tuple]:
        """`count` rendered scenes as ((64, 64, 3) uint8 array, caption), deterministic in `seed`."""
        from proxytune.toyworld.world import sample_world

        pixels, samples = sample_world(count, seed)
        return [(array, sample.caption) for array, sample in zip(pixels, samples)]

    def shows_subject(self, images: list, prompts: list[str], token: str, subject: str):
        """(N,) 1.0 where the oracle reads the whole subject off image i (drawn for prompts[i]), else 0.0."""
        from proxytune.toyworld.judges import shows_subject

        return shows_subject(images, prompts, token, subject)

    def shows_style(self, images: list, style: str):
        """(N,) 1.0 where the style detector finds `style` in image i, else 0.0."""
        from proxytune.toyworld.judges import shows_style

        return shows_style(images, style)

    def describe(self) -> dict:
        """What records say about the world: its name, a note for result tables, and its judge's weights."""
        from proxytune.toyworld.judges import oracle_weights

        return {"name": NAME, "note": NOTE, "judge": {"model": "toy-oracle", **oracle_weights()}}
