"""Lumina-mGPT checkpoints -> a proxytune student folder (`proxytune convert lumina-mgpt`).

The folder holds Chameleon's VQGAN converted to a diffusers VQModel (`vq_decoder/`) and a
proxytune_student.json that names the Chameleon-format model (hub id or folder: its weights are not
copied), the image size and, optionally, the text tokenizer. `lumina.backend.load` opens it.
"""

from __future__ import annotations

from pathlib import Path

from proxytune.backends import vqgan

from proxytune.backends.students.lumina import layout as lumina_layout
from proxytune.backends.students import meta as student_meta
from proxytune.backends.students.meta import StudentMeta
from proxytune.errors import ProxytuneError
from proxytune.files import staged_dir

SIZE_STEP = 32  # Lumina-mGPT's size tokens count 32-pixel steps


def convert_to_student_folder(model: str, out_dir: str | Path, vqgan_checkpoint: str | Path, *, image_size: int,
                              tokenizer: str | None = None) -> dict:
    """Write the student folder `out_dir` (staged: complete or absent) and return its metadata.

    Raises:
        ProxytuneError: image_size not a multiple of 32, `out_dir` exists, the model's config.json
            (a folder's, or a hub id's already cached) is not a Lumina-mGPT layout proxytune loads,
            or the VQGAN checkpoint cannot be converted.
    """
    if image_size % SIZE_STEP:
        raise ProxytuneError(f"--image-size {image_size}: must be a multiple of {SIZE_STEP} "
                             f"(Lumina-mGPT's size tokens count {SIZE_STEP} px steps)")
    out = Path(out_dir)
    if out.exists():
        raise ProxytuneError(f"{out}: already exists; choose a new folder")
    try:
        config = lumina_layout.read_config(model)
    except ValueError as err:
        raise ProxytuneError(f"{model}: config.json is not JSON ({err})") from None
    problem = config is not None and lumina_layout.config_problem(config)
    if problem:
        raise ProxytuneError(f"{model}: config.json: {problem}")
    source = str(Path(model).resolve()) if Path(model).exists() else model
    meta = {"backend": "lumina-mgpt", "model": source, "vq_decoder": "vq_decoder", "image_size": image_size}
    if tokenizer:
        meta["tokenizer"] = str(Path(tokenizer).resolve()) if Path(tokenizer).exists() else tokenizer
    with staged_dir(out) as tmp:
        vqgan.convert_file(vqgan_checkpoint, tmp / "vq_decoder", layout="taming", image_size=image_size)
        student_meta.write(tmp, StudentMeta.parse(meta), indent=2)
    return meta
