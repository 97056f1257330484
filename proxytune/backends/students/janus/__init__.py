"""Janus-Pro (DeepSeek 2025) on transformers' JanusForConditionalGeneration (config.json model_type "janus").

Janus-Pro as deepseek-ai releases it (model_type "multi_modality", the Janus repository's own code) is
refused with the fix: `proxytune convert janus` rewrites it once. Modules: backend (the StudentBackend),
convert (the release -> transformers' layout), tiny (tiny-janus), command (the CLI).
"""

from __future__ import annotations

from pathlib import Path

from proxytune.backends.students import SamplerDefaults, StudentFamily, TinyStudent, lazy, lazy_attribute

# Janus generation_inference.py: cfg_weight 5, temperature 1, softmax over every code (no top-k)
SAMPLING = SamplerDefaults(cfg_scale=5.0, top_k=None, temperature=1.0, source="Janus generation_inference.py")
# deepseek-ai/Janus-Pro-1B / -7B as released: the Janus repository's own MultiModalityCausalLM layout, which
# transformers' JanusForConditionalGeneration does not read. One text for the pre-flight and detection.
ORIGINAL_MODEL_TYPE = "multi_modality"
CONVERT_FIX = ("model_type 'multi_modality' is Janus-Pro as deepseek-ai releases it (the Janus repository's own "
               "code), which proxytune does not load: convert it once with `proxytune convert janus {src} OUT` "
               "and name OUT as student.model")


def check_folder(folder: Path, meta, config, checks) -> None:
    """A transformers checkpoint: config.json, weights and the tokenizer in the folder itself."""
    checks.weights(folder, "Janus checkpoint")
    checks.tokenizer(folder, "Janus checkpoint (its tokenizer)")


FAMILY = StudentFamily(
    name="janus", label="Janus-Pro", load=lazy(f"{__name__}.backend:load"), sampling=SAMPLING, model_types=("janus",),
    refused={ORIGINAL_MODEL_TYPE: CONVERT_FIX}, convert=lazy_attribute(f"{__name__}.command:convert_janus"),
    tiny={"tiny-janus": TinyStudent("tiny-janus-v2", lazy(f"{__name__}.tiny:build"))}, check_folder=check_folder,
    decoder_layers=("LlamaDecoderLayer",),
)
