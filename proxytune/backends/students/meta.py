"""proxytune_student.json: what a student folder says about itself, read and written in one place.

Import-light on purpose (no torch): the pre-flight and the spec read student folders before any model loads.
The file is optional for a transformers checkpoint (config.json's model_type names its family) and names,
for proxytune's own layouts, the backend, the image size and where the parts live (a subfolder, a folder
elsewhere or a hub id). Values are kept as written: the pre-flight says which one is wrong, with the file.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

STUDENT_META = "proxytune_student.json"


@dataclass(frozen=True)
class StudentMeta:
    """The fields of proxytune_student.json (every one optional).

    Attributes:
        backend: the student family ("llamagen", "janus", "lumina-mgpt"); None: detect from config.json
            (a folder with this file and no config.json is a llamagen one, as older folders are).
        image_size: pixels per side the student generates.
        prompt_len: prompt tokens a transformers student pads to.
        vqvae, text_encoder, tokenizer, model, vq_decoder: where a part lives when not in its usual
            subfolder (folder relative to the student's, absolute folder, or hub id).
        extra: any other key, kept so that a rewrite loses nothing.
    """

    backend: Any = None
    image_size: Any = None
    prompt_len: Any = None
    vqvae: Any = None
    text_encoder: Any = None
    tokenizer: Any = None
    model: Any = None
    vq_decoder: Any = None
    extra: dict = field(default_factory=dict)
    order: tuple = field(default=(), compare=False, repr=False)  # the keys as read: a rewrite keeps the bytes

    @classmethod
    def parse(cls, data: dict) -> "StudentMeta":
        known = {name for name in cls.__dataclass_fields__ if name not in ("extra", "order")}
        return cls(**{k: v for k, v in data.items() if k in known},
                   extra={k: v for k, v in data.items() if k not in known}, order=tuple(data))

    def to_dict(self) -> dict:
        """The JSON object: the keys in the order read (else fields, then extra keys), unset ones left out."""
        values = {k: v for k, v in asdict(self).items() if k not in ("extra", "order") and v is not None}
        values.update(self.extra)
        keys = [k for k in self.order if k in values] + [k for k in values if k not in self.order]
        return {k: values[k] for k in keys}

    def get(self, name: str, default: Any = None) -> Any:
        """A field (or extra key) by name, `default` when unset."""
        value = getattr(self, name, None) if name not in ("extra", "order") else None
        if value is None:
            value = self.extra.get(name)
        return default if value is None else value

    def __contains__(self, name: str) -> bool:
        return self.get(name) is not None


def read_file(path: Path) -> StudentMeta | None:
    """proxytune_student.json at `path`, or None when there is no such file.

    Raises:
        OSError, ValueError: unreadable, not JSON, or not a JSON object (callers name the file in their error).
    """
    if not path.is_file():
        return None
    data = json.loads(path.read_bytes())
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    return StudentMeta.parse(data)


def read(path: str) -> StudentMeta | None:
    """The file of a student folder, or of a hub repository (downloaded; None when the repo has none).

    Raises:
        OSError, ValueError: as `read_file`; hub errors other than a missing file.
    """
    if Path(path).is_dir():
        return read_file(Path(path) / STUDENT_META)
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return read_file(Path(hf_hub_download(path, STUDENT_META)))
    except EntryNotFoundError:
        return None


def write(folder: Path, meta: StudentMeta, *, indent: int | None = None) -> None:
    """Write `folder`/proxytune_student.json (callers write whole folders through a temp dir and a rename)."""
    (Path(folder) / STUDENT_META).write_text(json.dumps(meta.to_dict(), indent=indent) + "\n")
