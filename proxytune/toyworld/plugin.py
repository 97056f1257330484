"""The toy world as a proxytune plugin: what it adds to proxytune's tables (entry point in pyproject.toml).

proxytune never imports the toy world; `proxytune.builtins` calls `register` through the
`proxytune.plugins` entry-point group, and from then on toy-* names resolve like any built-in.
"""

from __future__ import annotations

ROLES = {"toy-sd": "teacher", "toy-llamagen": "student", "toy-clip": "clip", "toy-dino": "dino", "toy-oracle": "judge"}


class _SubjectWorld:
    """The toy world's subjects and prompts: the part of `proxytune.builtins.World` the subject evaluation reads.

    Stand-in until the full ToyWorld (slice "toyworld" of issue 28) registers here instead.
    """

    name = "toyworld"

    @property
    def classes(self) -> tuple[str, ...]:
        from proxytune.toyworld.world import CLASSES

        return CLASSES

    def subject_names(self) -> tuple[str, ...]:
        from proxytune.toyworld.subjects import SUBJECTS

        return tuple(SUBJECTS)

    def subject_prompts(self, token: str, class_noun: str) -> list[str]:
        from proxytune.toyworld.subjects import toy_prompts

        return toy_prompts(token, class_noun)


def register() -> None:
    from proxytune.builtins import BuiltinModel, register_model, register_world
    from proxytune.toyworld import builtins as toy
    from proxytune.toyworld.metrics import register_metrics

    for name, role in ROLES.items():
        register_model(BuiltinModel(name=name, role=role, build=toy.builtin(name), random_init=False,
                                    provider="toyworld", digest=lambda name=name: toy.manifest().get(name, {}).get("digest")))
    register_world(_SubjectWorld())
    register_metrics()
