"""How a student folder says which backend it is: names shared by the loaders and the model pre-flight.

Import-light on purpose (no torch): `preflight` checks student folders before any model is loaded.
"""

from __future__ import annotations

STUDENT_META = "proxytune_student.json"  # {"backend": ..., "image_size": S, and where the parts live}
STUDENT_BACKENDS = ("llamagen", "janus", "lumina-mgpt")
# config.json model_type -> backend, for checkpoints without a proxytune_student.json "backend"
STUDENT_MODEL_TYPES = {"janus": "janus", "chameleon": "lumina-mgpt"}

# deepseek-ai/Janus-Pro-1B / -7B as released: the Janus repository's own MultiModalityCausalLM layout, which
# transformers' JanusForConditionalGeneration does not read. One text for the pre-flight and detect_backend.
JANUS_ORIGINAL_MODEL_TYPE = "multi_modality"
JANUS_CONVERT_FIX = ("model_type 'multi_modality' is Janus-Pro as deepseek-ai releases it (the Janus repository's own "
                     "code), which proxytune does not load: convert it once with `proxytune convert janus {src} OUT` "
                     "and name OUT as student.model")
