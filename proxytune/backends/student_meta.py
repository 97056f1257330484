"""How a student folder says which backend it is: names shared by the loaders and the model pre-flight.

Import-light on purpose (no torch): `preflight` checks student folders before any model is loaded.
"""

from __future__ import annotations

STUDENT_META = "proxytune_student.json"  # {"backend": ..., "image_size": S, and where the parts live}
STUDENT_BACKENDS = ("llamagen", "janus", "lumina-mgpt")
# config.json model_type -> backend, for checkpoints without a proxytune_student.json "backend"
STUDENT_MODEL_TYPES = {"janus": "janus", "chameleon": "lumina-mgpt"}
