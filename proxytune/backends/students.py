"""Pick and load an AR student backend from the checkpoint's own files.

A folder (or hub repo) is one of:
- proxytune's LlamaGen layout: proxytune_student.json ({"backend": "llamagen", "image_size": S}),
  transformer/, vqvae/, text_encoder/, tokenizer/ (a missing "backend" key means llamagen);
- a transformers Janus checkpoint: config.json with model_type "janus" (a released deepseek-ai/Janus-Pro
  folder, model_type "multi_modality", is refused with the `proxytune convert janus` command to run);
- a Lumina-mGPT checkpoint: config.json with model_type "chameleon" (plus proxytune_student.json
  naming its VQ decoder folder, since transformers has no Chameleon VQ decoder).
"""

from __future__ import annotations

import json
from pathlib import Path

from proxytune.backends import tiny_cache
from proxytune.backends.student_api import StudentBackend
from proxytune.backends.student_meta import (JANUS_CONVERT_FIX, JANUS_ORIGINAL_MODEL_TYPE, STUDENT_BACKENDS, STUDENT_META,
                                             STUDENT_MODEL_TYPES)
from proxytune.toyworld.builtins import TOY_STUDENTS
from proxytune.errors import ProxytuneError



def _tiny(name: str):
    def build():
        if name == "tiny-llamagen":
            from proxytune.backends import llamagen

            return llamagen.TINY_STUDENTS[name]()
        if name == "tiny-janus":
            from proxytune.backends import janus

            return janus.materialize_tiny()
        from proxytune.backends import lumina_tiny

        return lumina_tiny.materialize_tiny()

    return build


TINY_STUDENTS = {name: _tiny(name) for name in ("tiny-llamagen", "tiny-janus", "tiny-lumina-mgpt")}
TINY_STUDENTS.update(TOY_STUDENTS)  # the toy world's pretrained toy-llamagen


def _read_json(path: str, name: str) -> dict | None:
    if Path(path).is_dir():
        file = Path(path) / name
        try:
            return json.loads(file.read_text()) if file.exists() else None
        except (OSError, ValueError) as err:  # unreadable, or not JSON: one line naming the file
            raise ProxytuneError(f"{file}: cannot read it ({err})") from None
    from huggingface_hub import hf_hub_download

    try:
        return json.loads(Path(hf_hub_download(path, name)).read_text())
    except Exception:  # not in the repo, or the hub is unreachable: the caller says what is missing
        return None


def detect_backend(path: str, ref: str) -> str:
    """The backend named by the checkpoint's files (see the module docstring)."""
    meta = _read_json(path, STUDENT_META)
    if meta is not None and meta.get("backend"):
        backend = meta["backend"]
        if backend not in STUDENT_BACKENDS:
            raise ProxytuneError(f"student model {ref!r}: {STUDENT_META}: unknown backend {backend!r} (known: {', '.join(STUDENT_BACKENDS)})")
        return backend
    config = _read_json(path, "config.json")
    if config is not None:
        model_type = config.get("model_type")
        if model_type == JANUS_ORIGINAL_MODEL_TYPE:  # deepseek-ai/Janus-Pro-* as released: converted once, never loaded
            raise ProxytuneError(f"student model {ref!r}: config.json: {JANUS_CONVERT_FIX.format(src=ref)}")
        if model_type in STUDENT_MODEL_TYPES:
            return STUDENT_MODEL_TYPES[model_type]
        raise ProxytuneError(f"student model {ref!r}: config.json model_type {model_type!r} is not an AR student proxytune trains")
    if meta is not None:
        return "llamagen"
    raise ProxytuneError(f"student model {ref!r}: neither {STUDENT_META} nor config.json found: not a student checkpoint")


def load_student(ref: str, *, device: str = "cpu") -> StudentBackend:
    """Load a student (built-in tiny name, local folder or hub id), frozen, in eval mode."""
    path = tiny_cache.resolve(ref, TINY_STUDENTS, what="student model")
    backend = detect_backend(path, ref)
    if backend == "llamagen":
        from proxytune.backends import llamagen

        return llamagen.load_student(ref if ref in llamagen.TINY_STUDENTS else path, device=device)
    if backend == "janus":
        from proxytune.backends import janus

        return janus.load(path, ref=ref, device=device)
    from proxytune.backends import lumina

    return lumina.load(path, ref=ref, device=device)
