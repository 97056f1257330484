"""Model families: diffusion teachers, AR students, encoders. No MLflow, no DVC, no spec files."""

from __future__ import annotations


def _lazy(module: str, table: str, name: str):
    """A folder maker that imports its backend (and torch) only when called."""

    def build():
        from importlib import import_module

        return getattr(import_module(module), table)[name]()

    return build


def register_builtins() -> None:
    """Register proxytune's own tiny random models in `proxytune.builtins` and its metrics (subject and style
    scopes) in `proxytune.metrics` (called once, by the table)."""
    from proxytune.backends import style_metrics
    from proxytune.backends.subject_scores import register_metrics
    from proxytune.builtins import BuiltinModel, register_model

    register_metrics()
    style_metrics.register()
    tiny = {
        "teacher": ("proxytune.backends.teachers.diffusion", "TINY_TEACHERS", ("tiny-sd", "tiny-sdxl", "tiny-sd3", "tiny-flux")),
        "clip": ("proxytune.backends.encoders", "TINY_CLIP", ("tiny-clip",)),
        "dino": ("proxytune.backends.encoders", "TINY_DINO", ("tiny-dino",)),
    }
    for role, (module, table, names) in tiny.items():
        for name in names:
            register_model(BuiltinModel(name=name, role=role, build=_lazy(module, table, name)))
    from proxytune.backends import students

    students.families()  # each student family's record registers its tiny students
