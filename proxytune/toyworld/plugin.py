"""The toy world as a proxytune plugin: what it adds to proxytune's tables (entry point in pyproject.toml).

proxytune never imports the toy world; `proxytune.builtins` calls `register` through the
`proxytune.plugins` entry-point group, and from then on toy-* names resolve like any built-in.
"""

from __future__ import annotations

ROLES = {"toy-sd": "teacher", "toy-llamagen": "student", "toy-clip": "clip", "toy-dino": "dino", "toy-oracle": "judge"}


def register() -> None:
    from proxytune import metrics
    from proxytune.builtins import BuiltinModel, register_model, register_world
    from proxytune.toyworld import builtins as toy
    from proxytune.toyworld.metrics import register_metrics
    from proxytune.toyworld.style_metrics import TOY_STYLE_METRICS
    from proxytune.toyworld.toy_world import ToyWorld

    for name, role in ROLES.items():
        register_model(BuiltinModel(name=name, role=role, build=toy.builtin(name), random_init=False,
                                    provider="toyworld", digest=lambda name=name: toy.manifest().get(name, {}).get("digest")))
    register_world(ToyWorld())
    register_metrics()
    for metric in TOY_STYLE_METRICS:
        metrics.register(metric)
